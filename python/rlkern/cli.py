"""The ``rlkern`` command: ``rlkern --version``, ``rlkern info`` and ``rlkern bench``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import __version__


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rlkern", description="rlkern kernels: information and benchmarks")
    parser.add_argument("--version", action="version", version=f"rlkern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version and the backends compiled in and runnable here")
    from .bench.runner import add_arguments

    add_arguments(sub.add_parser("bench", help="run the kernel benchmarks on the local device"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        print(json.dumps(info(), indent=2))
        return 0
    from .bench.runner import run_from_args

    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
