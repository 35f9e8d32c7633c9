"""The processes runtime: one machine's cores, actors in forked processes over shared memory.

The in-process runtime uses one core; the Ray runtime pays a process per actor, a socket and a
serializer per hop, and seconds of start-up. On one multi-core machine this one is faster:

* **Fork, don't start.** Every actor is built in the driver's process (which has imported torch
  already) by :meth:`ProcessesRuntime.spawn`; the worker processes are forked from it when the
  run starts, so a worker is ready in milliseconds and inherits its actors and their mail.
* **Fewer processes, function-call hops.** An actor's *group* is the first number in its name
  (``"data1"``, ``"replica1.stage0"`` -> group 1); group g lives in worker ``g % processes``.
  A replica's data shard and stages thus share a worker, and a hop between them is a function
  call on that worker's run queue (the in-process runtime's: seeded, one message at a time).
  Actors without a number (the master) live in the driver's process.
* **Shared actors.** An actor whose class is ``shareable`` (the parameter shards) is hosted in
  every process at once over shared memory (see ``Actor.shareable``): each process handles the
  messages its own actors send it, under one lock per actor across processes. A fetch or a
  push is a function call that moves no byte through a pipe; the update still goes through the
  shard's update rule, and its versions count staleness.
* **Between processes**, messages are pickled (a copy at the boundary) onto one pipe per
  ordered pair of processes (per-sender FIFO), written by a writer thread so that a full pipe
  never stalls a run loop.
* **Supervision.** A worker whose actor raises reports it and stops; a worker that dies is named
  by the actor it was handling (one shared slot per worker). Either ends the run with
  :class:`ActorFailed`. There are no restarts here: a run on one machine is simply run again.
  Workers ignore SIGINT (Ctrl-C and SIGTERM are the driver's: :func:`stop_signals_as_flag`)
  and die with the driver's process, even one killed with SIGKILL (a parent-death signal).
  :meth:`ProcessesRuntime.shutdown` kills and reaps every worker; shared memory uses torch's
  file-descriptor strategy (unlinked at creation), so nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import queue
import random
import re
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from ..errors import ActorFailed, ConfigError, Deadlock, RunTimeout
from . import faults as fault_plans
from .base import DRIVER, Actor, Failure, NamedRef, StopFlag
from .options import SHARD_UPDATES, ProcessesOptions, Tap, parse
from .runqueue import Cell, RunQueue, replies

SHARED = -1
"""Home of an actor hosted in every process."""
BATCH = 64
"""Messages a run loop delivers between two looks at its pipes."""
PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal a process gets when its parent dies."""


class ProcRef(NamedRef):
    """Address of an actor hosted by a ProcessesRuntime: its name (valid in every process)."""

    __slots__ = ()


class _Probe:
    """Driver -> worker: is the worker idle, and how many messages has it sent to and received
    from each process? (Quiescence detection: see ``ProcessesRuntime._look_for_deadlock``.)"""

    def __init__(self, wave: int) -> None:
        self.wave = wave


class _ProbeReply:
    """Worker -> driver: the answer to a :class:`_Probe`."""

    def __init__(self, wave: int, index: int, idle: bool, sent: list, received: list) -> None:
        self.wave, self.index, self.idle = wave, index, idle
        self.sent, self.received = sent, received


class _Cell(Cell):
    """One hosted actor in one process, and where it lives."""

    __slots__ = ("index", "home")

    def __init__(self, name: str, index: int, actor: Actor, home: int) -> None:
        super().__init__(name, actor)
        self.index = index  # in _Host.names: what the shared slots of `current` hold
        self.home = home


class _Context:
    __slots__ = ("name", "self_ref", "_host")

    def __init__(self, host: _Host, name: str) -> None:
        self.name = name
        self.self_ref = ProcRef(name)
        self._host = host

    def tell(self, ref: ProcRef, message: Any) -> None:
        self._host.post(ref.name, message, self.self_ref)


class _Host(RunQueue):
    """The actors one process runs (its run queue) and its ends of the pipes."""

    def __init__(self, seed: int | None, tap: Tap | None = None) -> None:
        super().__init__(seed, self._die, tap)
        self.index = 0  # 0: the driver's process; 1..N: the workers
        self.seed = seed
        self.route: dict[str, int] = {}  # actor name -> home process (SHARED: every one)
        self.inbox: deque[Any] = deque()  # the driver's mail (process 0 only)
        self.started = False
        self.inbound: dict[Connection, int] = {}  # reader -> the process writing to it
        self.outbound: dict[int, Connection] = {}
        self.out_queue: queue.SimpleQueue | None = None
        self.writer: threading.Thread | None = None
        self.current: Any = None  # shared ints: the cell index each process is handling
        self.names: list[str] = []  # cell index -> actor name
        self.failed: Failure | None = None
        # Messages sent to / received from each process (probes not counted), for the
        # quiescence detection; a probe seen by a worker, answered after its pipes are drained.
        self.sent: list[int] = []
        self.received: list[int] = []
        self.probe: _Probe | None = None
        self.probe_replies: dict[int, _ProbeReply] = {}

    # ------------------------------------------------------------------ posting

    def post(self, name: str, message: Any, sender: ProcRef) -> None:
        """Put ``message`` in the mailbox of ``name``, here or in its home process."""
        home = self.route.get(name, 0) if self.started else self.index
        if home != self.index and home != SHARED:
            data = pickle.dumps((name, sender.name, message), protocol=pickle.HIGHEST_PROTOCOL)
            self.out_queue.put((home, data))
            self.sent[home] += 1
            return
        if name == DRIVER:
            if self.tapped(sender.name, DRIVER, message):
                self.inbox.append(message)
            return
        self.enqueue(self.cells[name], sender, message)

    def _write(self) -> None:
        """The writer thread: pickled envelopes to their processes' pipes, in order."""
        out = self.out_queue
        while True:
            item = out.get()
            if item is None:
                return
            home, data = item
            try:
                self.outbound[home].send_bytes(data)
            except (OSError, ValueError):  # the reader is gone: the run is ending anyway
                pass

    def receive(self, timeout: float) -> list[Connection]:
        """Move what the pipes hold into mailboxes; wait up to ``timeout`` s for some first."""
        readers = wait(list(self.inbound), timeout) if timeout > 0 else self._readable()
        for conn in readers:
            self._drain(conn)
        return readers

    def _readable(self) -> list[Connection]:
        return [conn for conn in self.inbound if conn.poll()]

    def _drain(self, conn: Connection) -> None:
        while conn.poll():
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                del self.inbound[conn]  # the writer is gone (its death is noticed elsewhere)
                return
            name, sender, message = pickle.loads(data)
            if isinstance(message, _Probe):
                self.probe = message
                continue
            if isinstance(message, _ProbeReply):
                self.probe_replies[message.index] = message
                continue
            self.received[self.inbound[conn]] += 1
            if isinstance(message, Failure) and name == DRIVER:
                self.failed = message
                return
            self.post(name, message, ProcRef(sender))

    # ------------------------------------------------------------------ delivering

    def deliver(self, budget: int) -> int:  # type: ignore[override]
        """Deliver up to ``budget`` messages, one at a time; returns how many."""
        return super().deliver(budget, self.inbox, self.current, self.index)

    def _die(self, cell: _Cell, message: Any) -> None:
        """The planned death of ``cell``'s actor, instead of handling ``message``. There are no
        restarts on this runtime, so a planned death ends the run naming the actor."""
        fault = cell.fault
        if fault.kind == "exit" and self.index > 0:
            self.current[self.index] = cell.index  # the driver names the actor it was handling
            os._exit(70)  # a crash of the process itself
        raise ActorFailed(
            cell.name,
            type(message).__name__,
            RuntimeError(f"killed by the fault plan ({fault}); this runtime does not restart"),
        )


PROBE_AFTER_S = 0.25
"""How long the driver's process waits idle before it probes the workers for a deadlock."""
LOCK_TIMEOUT_S = 60.0
"""Longest a process waits for a shared actor's lock (held for one handler at a time; a
holder that died is noticed by the driver long before)."""


class _TimedLock:
    """A lock across processes for a shared actor's critical sections, as a context manager
    whose wait is bounded: a holder that died is noticed by the driver long before."""

    __slots__ = ("_lock", "_name")

    def __init__(self, lock: Any, name: str) -> None:
        self._lock, self._name = lock, name

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise RunTimeout(
                f"waited {LOCK_TIMEOUT_S:.0f} s for the lock of shared actor {self._name!r}"
            )

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _group(name: str) -> int | None:
    """``"replica1.stage0"`` -> 1, ``"data3"`` -> 3, ``"master"`` -> None."""
    match = re.search(r"\d+", name)
    return int(match.group()) if match else None


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the driver's process dies (Linux's
    parent-death signal), so that a driver killed with SIGKILL leaves no worker behind; the run
    loop also checks for a new parent, where the call is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the driver died before the call took effect
        os._exit(1)


def _worker_main(host: _Host, threads: int, parent: int) -> None:
    """A worker's life: run its actors until the driver kills it (or is gone)."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the driver's stop handler it inherited
    if threads > 0:
        torch.set_num_threads(threads)
    if host.index > 1 and host.seed is not None:
        torch.manual_seed(host.seed + 7919 * host.index)  # workers draw different numbers
    host.writer = threading.Thread(target=host._write, name="distbelief-writer", daemon=True)
    host.writer.start()
    alive = True
    while True:
        host.receive(0.0)
        if host.probe is not None:
            idle = not (alive and host.ready)
            reply = _ProbeReply(host.probe.wave, host.index, idle, host.sent[:], host.received[:])
            host.out_queue.put((0, pickle.dumps((DRIVER, "", reply))))
            host.probe = None
        if alive and host.ready:
            try:
                host.deliver(BATCH)
            except ActorFailed as exc:
                # Stop handling anything; the driver ends the run and kills this process.
                alive = False
                failure = Failure(
                    exc.actor, exc.message, exc.cause, "".join(traceback.format_exception(exc))
                )
                host.post(DRIVER, failure, ProcRef(exc.actor))
        else:
            host.receive(0.5)
        if os.getppid() != parent:
            os._exit(1)  # the driver is gone: nobody will collect what this process does


class ProcessesRuntime:
    """Hosts actors in forked worker processes of this machine (see the module doc).

    Options (:class:`~.options.ProcessesOptions`): ``processes`` (workers; default: as many
    as groups, at most the machine's CPUs),
    ``threads_per_process`` (torch intra-op threads per worker, default 1; 0 leaves torch's),
    ``faults`` (a fault plan, :mod:`.faults`: a delayed actor sleeps in its handler; the
    planned actor dies and, as this runtime restarts nothing, the run ends with
    ``ActorFailed`` naming it; a ``message=N`` count of a shared actor counts the messages
    handled in each process), ``max_restarts`` (accepted for the other runtimes' sake;
    nothing is restarted here), ``shard_updates``: ``"locked"`` (default: a shard applies
    one push at a time, exactly as in one process) or ``"hogwild"`` (pushes from different
    processes apply at the same time, unsynchronized as in Hogwild; versions, staleness and
    counters still counted exactly: see ``ParameterShard``), ``tap`` (sees every message, in
    the process that hosts its receiver: :data:`~.options.Tap`; a worker inherits it).
    """

    name = "processes"
    single_threaded = False

    def __init__(self, seed: int | None = None, **options: Any) -> None:
        self.options: ProcessesOptions = parse("processes", options)  # type: ignore[assignment]
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError("runtime: 'processes' forks its workers; this platform cannot fork")
        self._hogwild = self.options.shard_updates == "hogwild"
        self._plan = self.options.faults
        self._faults = fault_plans.kills(self._plan)
        self._processes = self.options.processes
        self._threads = self.options.threads_per_process
        self._host = _Host(seed, self.options.tap)
        self._groups: dict[int, int] = {}  # group number -> order of first appearance
        self._workers: list[Any] = []  # multiprocessing.Process, worker i at [i - 1]
        self._driver_ref = ProcRef(DRIVER)
        self._closed = False
        self._wave: tuple[int, tuple] | None = None  # the probe wave out: number, own counts
        self._waves_sent = 0
        self._last_quiet: tuple | None = None  # counts of the last wave that found all quiet
        self._next_probe = 0.0

    # -------------------------------------------------------------- the Runtime protocol

    def spawn(self, name: str, cls: type[Actor], *args: Any, **kwargs: Any) -> ProcRef:
        host = self._host
        if name in host.cells or name == DRIVER:
            raise ValueError(f"an actor named {name!r} already exists")
        actor = cls(*args, **kwargs)
        if cls.shareable:
            if host.started:
                raise ValueError(f"{name!r}: a shared actor must be spawned before the run starts")
            home = SHARED
        else:
            group = _group(name)
            if group is not None and not host.started:
                self._groups.setdefault(group, len(self._groups))
            home = 0  # grouped actors get their worker at the start (see _start)
        cell = _Cell(name, len(host.names), actor, home)
        cell.fault = self._faults.get(name)
        # A delay is a sleep in the handler; a shared actor's in each process that handles
        # its messages, outside its lock (the lock guards its shared state only).
        cell.handlers = fault_plans.slowed(cell.handlers, fault_plans.delay_of(self._plan, name))
        host.names.append(name)
        actor.bind(_Context(host, name))
        host.cells[name] = cell
        host.route[name] = home
        return ProcRef(name)

    def actor(self, ref: ProcRef) -> Actor:
        """The object behind a ref, as this (the driver's) process holds it."""
        return self._host.cells[ref.name].actor

    def tell(self, ref: ProcRef, message: Any) -> None:
        self._host.post(ref.name, message, self._driver_ref)

    def converse(self, ref: ProcRef, message: Any, *, timeout: float) -> Iterator[Any]:
        deadline = time.monotonic() + timeout
        if not self._host.started:
            self._host.check_targets(self._plan)  # none that cannot fire
            self._start()
        self.tell(ref, message)
        yield from replies(self._run_until_reply, self._host.inbox, deadline)

    def _run_until_reply(self, deadline: float, interrupted: StopFlag) -> None:
        host = self._host
        while not host.inbox:
            interrupted.raise_if_set()  # between two messages: every actor is whole
            if time.monotonic() > deadline:
                raise RunTimeout("the run did not finish within its timeout")
            host.receive(0.0)
            self._check_workers()
            if host.ready:
                host.deliver(BATCH)
                self._last_quiet = None
                self._next_probe = time.monotonic() + PROBE_AFTER_S
                continue
            if host.inbox:
                break
            if not self._workers:
                raise Deadlock(
                    "no actor has a message to handle, but the driver got no reply: "
                    "a message was lost or an actor is waiting for a reply that never comes"
                )
            self._look_for_deadlock()
            sentinels = [w.sentinel for w in self._workers]
            wait([*host.inbound, *sentinels], min(0.1, max(0.0, deadline - time.monotonic())))
        interrupted.raise_if_set()  # a stop while the reply was on its way: not lost with it

    def _look_for_deadlock(self) -> None:
        """Called while the driver's process is idle. Every ``PROBE_AFTER_S`` it asks every
        worker whether it is idle and what it has sent and received (a probe *wave*). When two
        successive waves find every process idle, every message sent received, and no count
        changed in between, no message is left anywhere and none can appear: the run is
        deadlocked (the four-counter method of termination detection)."""
        host = self._host
        counts = (host.sent[:], host.received[:])
        now = time.monotonic()
        wave = self._wave
        if wave is not None and len(host.probe_replies) == len(self._workers):
            replies = sorted(host.probe_replies.values(), key=lambda r: r.index)
            host.probe_replies = {}
            self._wave = None
            sent = [counts[0], *(r.sent for r in replies)]
            received = [counts[1], *(r.received for r in replies)]
            quiet = all(r.idle and r.wave == wave[0] for r in replies) and counts == wave[1]
            balanced = all(
                sent[a][b] == received[b][a] for a in range(len(sent)) for b in range(len(sent))
            )
            snapshot = (sent, received)
            if quiet and balanced and snapshot == self._last_quiet:
                raise Deadlock(
                    "no actor in any process has a message to handle, but the driver got no "
                    "reply: a message was lost or an actor is waiting for a reply that never comes"
                )
            self._last_quiet = snapshot if quiet and balanced else None
            self._next_probe = now + (0.0 if self._last_quiet else PROBE_AFTER_S)
        if self._wave is None and now >= self._next_probe:
            number = self._waves_sent = self._waves_sent + 1
            self._wave = (number, counts)
            probe = pickle.dumps(("", DRIVER, _Probe(number)))
            for i in range(1, len(self._workers) + 1):
                host.out_queue.put((i, probe))

    def _check_workers(self) -> None:
        host = self._host
        if host.failed is not None:
            f = host.failed
            raise ActorFailed(f.actor, f.message, f.error)
        for i, worker in enumerate(self._workers, start=1):
            if worker.exitcode is None:
                continue
            host.receive(0.0)  # what it said before dying (a failure report) comes first
            if host.failed is not None:
                f = host.failed
                raise ActorFailed(f.actor, f.message, f.error)
            slot = host.current[i]
            if slot >= 0:
                name = host.names[slot]
            else:
                name = ", ".join(c for c, home in self._homes.items() if home == i) or f"worker {i}"
            raise ActorFailed(
                name,
                "a message" if slot >= 0 else "no message (idle)",
                RuntimeError(f"its process {worker.pid} died (exit code {worker.exitcode})"),
            )

    # -------------------------------------------------------------- start and shutdown

    def _start(self) -> None:
        """Share the shared actors' memory, fork the workers, wire the pipes."""
        host = self._host
        ctx = multiprocessing.get_context("fork")
        groups = len(self._groups)
        n = min(groups, self._processes or os.cpu_count() or 1) if groups else 0
        # Groups to workers: the g-th group to appear goes to worker g % n + 1.
        homes = {}
        for name, cell in host.cells.items():
            if cell.home == SHARED:
                # The actor holds the lock itself, around its critical sections only.
                cell.actor.share_memory(_TimedLock(ctx.Lock(), name), hogwild=self._hogwild)
            elif n and _group(name) is not None:
                cell.home = self._groups[_group(name)] % n + 1
            homes[name] = host.route[name] = cell.home
        self._homes = homes
        host.current = ctx.RawArray("i", [-1] * (n + 1))
        pipes = {
            (a, b): ctx.Pipe(duplex=False) for a in range(n + 1) for b in range(n + 1) if a != b
        }
        host.started = True
        host.sent, host.received = [0] * (n + 1), [0] * (n + 1)
        host.out_queue = queue.SimpleQueue()
        parent = os.getpid()
        for i in range(1, n + 1):
            worker = ctx.Process(
                target=_run_worker,
                args=(host, i, pipes, self._threads, parent),
                name=f"distbelief-worker{i}",
                daemon=True,
            )
            worker.start()
            self._workers.append(worker)
        _keep_ends(host, 0, pipes)
        _keep_cells(host, 0)
        host.writer = threading.Thread(target=host._write, name="distbelief-writer", daemon=True)
        host.writer.start()

    def describe(self) -> dict[str, Any]:
        """What a run's stats record: ``processes`` (actor -> the process it ran in: 0 is the
        driver's, "shared" all of them), ``worker_pids`` and ``restarts_by_actor``."""
        homes = getattr(self, "_homes", {})
        return {
            "processes": {n: ("shared" if h == SHARED else h) for n, h in homes.items()},
            "worker_pids": [w.pid for w in self._workers],
            "restarts_by_actor": {},  # as the other runtimes report; nothing restarts here
        }

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        host = self._host
        for worker in self._workers:
            if worker.exitcode is None:
                worker.kill()
        stuck = []
        for worker in self._workers:
            worker.join(10.0)
            if worker.exitcode is None:
                stuck.append(worker.pid)
            else:
                worker.close()
        if host.writer is not None:
            host.out_queue.put(None)
            host.writer.join(10.0)
        for conn in [*host.inbound, *host.outbound.values()]:
            conn.close()
        host.inbound.clear()
        host.outbound.clear()
        host.cells.clear()  # the actors, and with them the shared memory, are freed
        host.ready.clear()
        host.inbox.clear()
        if stuck:
            raise RunTimeout(f"worker processes {stuck} did not exit within 10 s of SIGKILL")


def _keep_ends(host: _Host, index: int, pipes: dict) -> None:
    """Keep this process's ends of the pipes; close every other end it inherited."""
    for (a, b), (reader, writer) in pipes.items():
        if b == index:
            host.inbound[reader] = a
        else:
            reader.close()
        if a == index:
            host.outbound[b] = writer
        else:
            writer.close()


def _keep_cells(host: _Host, index: int) -> None:
    """Keep the actors this process runs (shared ones too); mail for shared actors that the
    driver told before the start is the driver's process's to handle."""
    host.index = index
    for name in list(host.cells):
        cell = host.cells[name]
        if cell.home == index or cell.home == SHARED:
            if cell.home == SHARED and index != 0:
                cell.mailbox.clear()
            continue
        del host.cells[name]
    host.ready[:] = [cell for cell in host.cells.values() if cell.mailbox]
    for cell in host.cells.values():
        cell.ready = bool(cell.mailbox)


def _run_worker(host: _Host, index: int, pipes: dict, threads: int, parent: int) -> None:
    host.rng = random.Random(None if host.seed is None else host.seed * 1_000_003 + index)
    _keep_ends(host, index, pipes)
    _keep_cells(host, index)
    host.inbox.clear()
    _worker_main(host, threads, parent)


__all__ = ["SHARD_UPDATES", "ProcRef", "ProcessesRuntime"]  # SHARD_UPDATES: for the CLI
