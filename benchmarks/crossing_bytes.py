"""The bytes that cross between blocks per step, counted from the plans of the model-parallel
benchmark's two nets (``distbelief bench --only model-parallel``, part b): a Markdown table
on stdout and the plot of docs/partitions.md. No training, no timing: it holds on any machine.

    python benchmarks/crossing_bytes.py                      # width 512, as the full benchmark
    python benchmarks/crossing_bytes.py --plot docs/partitions-bytes.png
"""

from __future__ import annotations

import argparse

from distbelief.bench import FULL
from distbelief.bench import model_parallel as mp

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=FULL.model_parallel_width)
    parser.add_argument("--plot", default=None, help="write the plot to this PNG file")
    args = parser.parse_args()
    figures = mp.bytes_figures(args.width)
    print(mp.bytes_markdown(figures))
    if args.plot:
        print(f"plot: {mp.plot_bytes(figures, args.plot)}")
