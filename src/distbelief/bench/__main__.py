"""``python -m distbelief.bench worker SPEC_JSON``: one scaling configuration in a fresh
process (internal: the scaling benchmark starts these)."""

from __future__ import annotations

import sys

from .scaling import worker_main

if __name__ == "__main__":
    worker_main(sys.argv[1:])
