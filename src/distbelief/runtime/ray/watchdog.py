"""Removes a private Ray instance's processes and files when the driver that started it dies.

:func:`.runtime.local_ray` starts this file as a script beside the Ray instance it
starts, with the instance's temp dir as its argument and a pipe from the driver as its standard
input. A driver that ends normally stops Ray, removes the temp dir itself and writes ``done``
before closing the pipe. A driver killed before that (SIGKILL, a crash) closes the pipe without
it: the watchdog then kills every process of that instance (those whose command line names the
temp dir, and their descendants: Ray's workers and agents rename themselves, so it records them
while the driver lives) and removes the temp dir, so nothing of the run outlives its driver by
more than a moment.

Standard library only, and run by path: it must start in milliseconds, without torch.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
from pathlib import Path

DONE = b"done"
"""What a driver that cleaned up after itself writes before closing the pipe."""


RESCAN_S = 1.0
"""How often the watchdog records the instance's processes while the driver lives: once the
driver is gone, Ray's processes start to exit and their children are re-parented, so who
belongs to the instance must be known before."""


def _processes() -> dict[int, tuple[int, bytes, bytes]]:
    """Every process's parent pid, start time and command line, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # it ended while we looked
        fields = stat.rsplit(b")", 1)[1].split()
        found[int(entry.name)] = (int(fields[1]), fields[19], cmdline)  # ppid, starttime
    return found


def instance_processes(temp_dir: str) -> dict[int, bytes]:
    """The processes of a Ray instance whose files live in ``temp_dir``, as pid -> start time:
    those whose command line names it, and all their descendants (not this process)."""
    table = _processes()
    marker = os.fsencode(temp_dir)
    found = {pid for pid, (_, _, cmdline) in table.items() if marker in cmdline}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    return {pid: table[pid][1] for pid in found}


def clean_up(temp_dir: str, known: dict[int, bytes]) -> None:
    """Kill the instance's processes (those known before, if they are still the same
    processes, and those found now) and remove its temp dir."""
    now = _processes()
    for pid, started in {**known, **instance_processes(temp_dir)}.items():
        if pid in now and now[pid][1] == started:  # not a new process that reuses the pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """``watchdog.py TEMP_DIR``: record the instance's processes until the driver's pipe
    closes, then clean up unless the driver said it did."""
    temp_dir = argv[1]
    known: dict[int, bytes] = {}
    said = b""
    stdin = sys.stdin.fileno()
    while True:
        known.update(instance_processes(temp_dir))
        ready, _, _ = select.select([stdin], [], [], RESCAN_S)
        if ready:
            chunk = os.read(stdin, 64)
            if not chunk:  # end of file: the driver closed the pipe, or died
                break
            said += chunk
    if said != DONE:
        clean_up(temp_dir, known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
