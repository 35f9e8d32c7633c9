"""Run distbelief's side-by-side benchmarks: ``python benchmarks/run.py [--quick] [--json]``.

The same as ``distbelief bench``; the measurements live in ``distbelief.bench`` so that they
are importable and tested. See benchmarks/README.md for what each comparison means.
"""

from __future__ import annotations

import sys

from distbelief.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
