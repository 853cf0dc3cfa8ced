"""Suite-wide settings: tiny models run faster (and far more steadily on a busy 2-core machine)
with one torch thread; subprocesses the tests start inherit it through the environment."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
