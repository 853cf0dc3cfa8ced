"""Suite-wide settings: tiny models run faster (and far more steadily on a busy 2-core machine)
with one torch thread; subprocesses the tests start inherit it through the environment."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)




def pytest_collection_modifyitems(config, items):
    """The slow tests first: pytest-xdist hands out whole files (--dist loadfile, so that a
    module-scoped fixture trains once) in the order their first test comes, and a long file
    started last would leave one process working alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
