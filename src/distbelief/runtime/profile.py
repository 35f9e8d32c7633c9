"""Where each process of the ``processes`` runtime spends its time (``runtime_options={"profile":
True}``; the run's ``stats["profile"]``).

Every handler is timed in the process that runs it: its count, the CPU time of the run loop's
thread (``time.thread_time``) and its wall time, less what it spent sending to other processes
(pickling, slot copies: counted as ``send``) and waiting for a shared actor's lock (counted as
``lock_wait``; CPU spent spinning, none: the lock blocks). Beside the handlers each process
counts the messages it took off its pipes (``receive``: reading and unpickling, slot copies
out), the time its run loop sat waiting for mail with nothing to do (``idle``), the time it
held a shared actor's lock (``lock_held``, inside the handlers' time), and its span: from the
start of its first handler to the end of its last, with the process's CPU time (every thread:
the pipe writer's too) and its minor page faults (pages touched for the first time: memory the
allocator took fresh from the kernel) over it. What a span leaves unaccounted (``other``) is
the run loop itself: polling the pipes, picking the next message.

It costs about 10 us per message (clock and page fault reads, several of them system calls), so
it is off unless asked for. The table lives in shared memory, a block of rows per process, made
before the fork: every process writes its own rows, the driver reads them all at the end.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch

LOOP = ("send", "receive", "idle", "lock_wait", "lock_held")
"""Rows of each process's block after the handlers' (count, CPU ns, wall ns)."""
SEND, RECEIVE, IDLE, LOCK_WAIT, LOCK_HELD = range(len(LOOP))
SPAN = len(LOOP)
"""Index (after the handlers') of the span's rows: at the start of the first handler and at
the end of the last, the wall clock, the process's CPU clock and the run loop thread's (ns),
and the process's minor page faults."""

thread_ns = time.thread_time_ns
wall_ns = time.perf_counter_ns
process_ns = time.process_time_ns


def page_faults() -> int:
    """Minor page faults of this process so far (pages it touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Profile:
    """The shared table of one run and this process's view of it (see the module doc).

    ``keys`` are (actor, message type) pairs, a row each in every process's block; the blocks
    are made for ``processes`` processes (0: the driver's)."""

    def __init__(self, keys: list[tuple[str, str]], processes: int) -> None:
        self.keys = keys
        self.index = {key: i for i, key in enumerate(keys)}
        self.base = len(keys)
        self.table = torch.zeros((processes, len(keys) + len(LOOP) + 2, 4), dtype=torch.int64)
        self.table.share_memory_()
        self.rows: Any = self.table[0].numpy()
        # Sends and lock waits inside the handler being timed (CPU ns, wall ns): subtracted.
        self.nested = [0, 0]

    def attach(self, process: int) -> None:
        """Write into ``process``'s block from now on (in that process, after the fork)."""
        self.rows = self.table[process].numpy()

    def timed(self, actor: str, handlers: dict[type, Callable]) -> dict[type, Callable]:
        """``handlers`` of ``actor``, each timed into its row."""
        return {t: self._timed(self.index[actor, t.__name__], h) for t, h in handlers.items()}

    def _timed(self, key: int, handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        nested, span = self.nested, self.base + SPAN

        def timed(message: Any, sender: Any) -> None:
            c0, w0 = thread_ns(), wall_ns()
            n0, n1 = nested
            try:
                handler(message, sender)
            finally:
                c1, w1 = thread_ns(), wall_ns()
                rows = self.rows
                row = rows[key]
                row[0] += 1
                row[1] += c1 - c0 - (nested[0] - n0)
                row[2] += w1 - w0 - (nested[1] - n1)
                if rows[span][0] == 0:
                    rows[span] = (w0, process_ns(), c0, page_faults())
                rows[span + 1] = (w1, process_ns(), c1, page_faults())

        return timed

    def add(self, what: int, cpu: int, wall: int, nested: bool = True) -> None:
        """Count one ``LOOP[what]`` of ``cpu`` and ``wall`` ns; ``nested``: inside a handler
        (taken off its time). Waits before the first handler (the start) are not counted."""
        rows = self.rows
        if what == IDLE and rows[self.base + SPAN][0] == 0:
            return
        row = rows[self.base + what]
        row[0] += 1
        row[1] += cpu
        row[2] += wall
        if nested:
            self.nested[0] += cpu
            self.nested[1] += wall

    def summary(self, homes: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
        """Per process (``"driver"``, ``"worker1"``, ...): the actors it hosted, its span with
        the CPU time of the process and of its run loop's thread over it and the page faults
        it took, per actor (its class
        as ``kind``) each handler's count and CPU and wall seconds, the loop's rows and
        ``other_s``, the span's wall time none of them accounts for."""
        table = self.table.tolist()
        out: dict[str, Any] = {}
        for p, block in enumerate(table):
            start, end = block[self.base + SPAN], block[self.base + SPAN + 1]
            actors: dict[str, dict[str, Any]] = {}
            for (actor, message), (n, cpu, wall, _) in zip(self.keys, block, strict=False):
                if n:
                    entry = actors.setdefault(actor, {"kind": kinds.get(actor, ""), "handlers": {}})
                    entry["handlers"][message] = _times(n, cpu, wall)
            loop = {name: _times(*block[self.base + i][:3]) for i, name in enumerate(LOOP)}
            span = (end[0] - start[0]) / 1e9
            busy = sum(t["wall_s"] for a in actors.values() for t in a["handlers"].values())
            busy += sum(loop[k]["wall_s"] for k in ("send", "receive", "idle", "lock_wait"))
            name = "driver" if p == 0 else f"worker{p}"
            out[name] = {
                "hosts": sorted(a for a, h in homes.items() if h == p),
                "span_s": round(span, 4),
                "process_cpu_s": round((end[1] - start[1]) / 1e9, 4),
                "loop_cpu_s": round((end[2] - start[2]) / 1e9, 4),
                "page_faults": end[3] - start[3],
                "actors": actors,
                **loop,
                "other_s": round(max(0.0, span - busy), 4) if start[0] else 0.0,
            }
        return out


def _times(n: int, cpu: int, wall: int) -> dict[str, Any]:
    return {"n": n, "cpu_s": round(cpu / 1e9, 4), "wall_s": round(wall / 1e9, 4)}
