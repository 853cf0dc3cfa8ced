"""What the analysis commands share at their command line."""
from __future__ import annotations

import sys
import time
from typing import Callable


def run_command(run: Callable, args, expected: type[Exception]) -> int:
    """Run `run(args)` (which returns the output folder) for a command: exit status 0 and
    'wrote DIR in S s' on stderr; 2 and one 'error: ...' line for an `expected` error (bad input)
    and, unless args.debug asks for the traceback, for an error nobody foresaw."""
    start = time.perf_counter()
    try:
        out_dir = run(args)
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an input we did not foresee: say so without a traceback
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", file=sys.stderr)
        return 2
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
