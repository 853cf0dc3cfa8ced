"""Suite-wide settings: tiny models run faster (and far more steadily on a busy 2-core machine)
with one torch thread; subprocesses the tests start inherit it through the environment."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# The files that take longest on 2 cores (pytest --durations=0), longest first. pytest-xdist hands
# out whole files in the order their first test comes (--no-loadscope-reorder; by default it orders
# them by their number of tests, which starts these long sweeps last, each then running alone).
LONGEST_FILES = ("test_end_to_end.py", "test_science.py", "test_sweeps.py", "test_distributed.py", "test_slurm.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other slow tests, then the rest."""
    def order(item):
        name = item.path.name
        return (LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES),
                item.get_closest_marker("slow") is None)

    items.sort(key=order)


def pytest_xdist_auto_num_workers(config):
    """-n auto: one process more than the cores. Several long tests mostly wait (a SLURM queue, a
    rank's timeout, a signal) with the CPU idle, and the extra process fills that time.
    --maxprocesses still caps it."""
    return len(os.sched_getaffinity(0)) + 1
