"""The processes runtime: one machine's cores, actors in forked processes over shared memory.

The in-process runtime uses one core; the Ray runtime pays a process per actor, a socket and a
serializer per hop, and seconds of start-up. On one multi-core machine this one is faster:

* **Fork, don't start.** Every actor is built in the driver's process (which has imported torch
  already) by :meth:`ProcessesRuntime.spawn`; the worker processes are forked from it when the
  run starts, so a worker is ready in milliseconds and inherits its actors and their mail.
* **Placement: a replica per worker, or its stages spread when workers would idle.** An
  actor's *group* is the first number in its name (``"data1"``, ``"replica1.stage0"`` -> group
  1) and its *member* the number after its last dot (``"replica1.stage2"`` -> 2; none: 0).
  With at least as many replicas as workers, each replica lives whole in one worker
  (``r % processes + 1``): every core has replicas to run, and a hop between a replica's actors
  is a function call on that worker's run queue (seeded, one message at a time). Spreading
  such a job's stages measured 0.6x the examples/s of the main job (4 x 2 x 2 on 2 cores): a
  pipe hop each way per step, for cores that were busy anyway. With fewer replicas than
  workers, the (group, member) pairs, ordered by group (in order of first appearance) then
  member, are dealt to the workers in turn: stage s of replica r is pair ``r * S + s``, so
  successive stages of a replica are on different workers and can work at the same time (a
  pipelined replica, ``pipeline_depth`` > 1), and every worker holds the same number of
  stages, within one. A data shard is member 0: it stays with its replica's first stage, the
  one it talks to on every step. Actors without a number (the master) live in the driver's
  process. ``describe()["processes"]`` records where each actor ran.
* **Shared actors.** An actor whose class is ``shareable`` (the parameter shards) is hosted in
  every process at once over shared memory (see ``Actor.shareable``): each process handles the
  messages its own actors send it, under one lock per actor across processes (and more
  that the actor asks for before the fork, ``sibling``: a shard's lock per segment). A fetch
  or a push is a function call that moves no byte through a pipe; the update still goes
  through the shard's update rule, and its versions count staleness.
* **Between processes**, messages are pickled onto one pipe per ordered pair of processes
  (per-sender FIFO), written by a writer thread so that a full pipe never stalls a run loop.
  A plain CPU tensor in a message is pickled as its raw bytes (pickle protocol 5), not through
  torch's own pickling (which serialises each storage with ``torch.save``: ten times slower).
  Between two workers that host neighbouring stages of a replica, a tensor of 4 KiB to 1 MiB
  (activations, and their gradients) does not go through the pipe at all: the sender copies it
  into a free slot of a ring of shared-memory slots for that ordered pair of workers (made
  before the fork), the pipe carries only the slot's number, and the receiver copies it out
  and frees the slot as it reads the message: one copy on each side instead of four (pickle
  stream, pipe write, pipe read, unpickle), and a message of a few hundred bytes through the
  pipe instead of one bigger than the pipe's buffer (64 KiB: written in turns). When
  every slot is taken (the receiver is behind) the tensor is pickled instead: a send never
  waits. ``describe()["wire"]`` counts both paths.
* **Supervision.** A worker whose actor raises reports it and stops; a worker that dies is named
  by the actor it was handling (one shared slot per worker). Either ends the run with
  :class:`ActorFailed`. There are no restarts here: a run on one machine is simply run again.
  Workers ignore SIGINT (Ctrl-C and SIGTERM are the driver's: :func:`stop_signals_as_flag`)
  and die with the driver's process, even one killed with SIGKILL (a parent-death signal).
  :meth:`ProcessesRuntime.shutdown` kills and reaps every worker; shared memory uses torch's
  file-descriptor strategy (unlinked at creation), so nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

import copyreg
import ctypes
import io
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
from . import profile as profiling
from .base import DRIVER, Actor, Failure, NamedRef, StopFlag
from .options import SHARD_UPDATES, ProcessesOptions, Tap, parse
from .runqueue import Cell, RunQueue, replies

SHARED = -1
"""Home of an actor hosted in every process."""
BATCH = 64
"""Messages a run loop delivers between two looks at its pipes."""
PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal a process gets when its parent dies."""
SLOTS = 8
"""Shared-memory slots per ordered pair of workers that host neighbouring stages: room for
several mini-batches in flight each way (a pipelined replica) before a tensor is pickled."""
SLOT_BYTES = 1 << 20
"""Size of a slot; a bigger tensor is pickled. Untouched bytes of a slot cost no memory (the
pages of ``/dev/shm`` are allocated when first written)."""
SLOT_MIN_BYTES = 4096
"""Smaller tensors ride in the pickle: for them a slot saves nothing."""
PLAIN_DTYPES = frozenset(
    (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
     torch.int16, torch.int8, torch.uint8, torch.bool)
)  # fmt: skip
"""Tensors of these types travel as their raw bytes (see the module doc); others (complex,
quantized, ...) through torch's own pickling."""
WIRE = ("tensors_in_slots", "slot_bytes", "tensors_pickled", "pickled_tensor_bytes", "pipe_bytes")
"""The counters of ``describe()["wire"]``, summed over the processes: tensors (and their bytes)
that went through a shared-memory slot, tensors (and bytes) pickled as raw bytes, and every
byte written to a pipe (the pickled envelopes: messages, headers, pickled tensors)."""


def _shared_bytes(n: int) -> torch.Tensor:
    """``n`` bytes of shared memory (torch's file-descriptor strategy: unlinked at creation),
    whose pages are allocated only when written."""
    try:
        storage = torch.UntypedStorage._new_shared(n)
    except (AttributeError, RuntimeError):  # pragma: no cover - another torch
        return torch.empty(n, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class _Channel:
    """A ring of shared-memory slots carrying tensors from one process to another, made before
    the fork. One process fills slots (its run loop: one thread), the other empties them; a
    slot's flag says which may touch it. The sender writes the bytes, then the flag, then the
    slot's number through the pipe; the receiver reads them only after the pipe delivered that
    number, so it never sees a slot half written. A slot that is never emptied (its receiver
    died) only makes later tensors take the pickled path."""

    __slots__ = ("data", "full", "next", "slot_bytes", "_flags")

    def __init__(self, slots: int = SLOTS, slot_bytes: int = SLOT_BYTES) -> None:
        self.slot_bytes = slot_bytes
        self.data = _shared_bytes(slots * slot_bytes)
        self._flags = torch.zeros(slots, dtype=torch.int8).share_memory_()
        self.full = self._flags.numpy()  # 1: written, not yet read (numpy: cheap to index)
        self.next = 0

    def put(self, flat: torch.Tensor) -> int | None:
        """Copy ``flat`` (bytes) into a free slot and return its number; None if none is free."""
        full, n = self.full, len(self.full)
        for i in range(n):
            slot = (self.next + i) % n
            if not full[slot]:
                start = slot * self.slot_bytes
                self.data[start : start + flat.numel()].copy_(flat)
                full[slot] = 1
                self.next = (slot + 1) % n
                return slot
        return None

    def take(self, slot: int, nbytes: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        """A fresh tensor holding what ``slot`` carries; the slot is free again."""
        out = torch.empty(shape, dtype=dtype)
        start = slot * self.slot_bytes
        out.view(-1).view(torch.uint8).copy_(self.data[start : start + nbytes])
        self.full[slot] = 0
        return out


def _from_bytes(buffer: Any, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """Unpickle a tensor pickled as its raw bytes (over the unpickled bytearray: no copy)."""
    if len(buffer) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def _from_slot(*args: Any) -> torch.Tensor:
    """Stands for :meth:`_Host.take` in a pickle: only a process runtime's receiver, which maps
    this name to its own channels, can unpickle a tensor that came through a slot."""
    raise pickle.UnpicklingError("a tensor in a shared-memory slot, outside its runtime")


class _Pickler(pickle.Pickler):
    """Pickles a host's envelopes: plain tensors as raw bytes or through a slot."""

    def __init__(self, file: io.BytesIO, table: dict) -> None:
        self.dispatch_table = table  # read by Pickler.__init__
        super().__init__(file, protocol=5)


class _Unpickler(pickle.Unpickler):
    """Unpickles an envelope in the process that received it: ``_from_slot`` is its host's."""

    def __init__(self, data: bytes, take: Any) -> None:
        super().__init__(io.BytesIO(data))
        self._take = take

    def find_class(self, module: str, name: str) -> Any:
        if name == "_from_slot" and module == __name__:
            return self._take
        return super().find_class(module, name)


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
        # The wire (see the module doc): slot rings by (sender, receiver) process, the ring of
        # the message being pickled, and this process's row of the shared counters (``WIRE``).
        self.channels: dict[tuple[int, int], _Channel] = {}
        self.to: _Channel | None = None
        self.wire: Any = [0] * len(WIRE)
        self.table = dict(copyreg.dispatch_table)
        self.table[torch.Tensor] = self._reduce_tensor
        self.profile: profiling.Profile | None = None  # runtime_options profile=True

    # ------------------------------------------------------------------ posting

    def post(self, name: str, message: Any, sender: ProcRef) -> None:
        """Put ``message`` in the mailbox of ``name``, here or in its home process."""
        home = self.route.get(name, 0) if self.started else self.index
        if home != self.index and home != SHARED:
            profile = self.profile
            if profile is not None:
                c0, w0 = profiling.thread_ns(), profiling.wall_ns()
            self.to = self.channels.get((self.index, home))
            buffer = io.BytesIO()
            _Pickler(buffer, self.table).dump((name, sender.name, message))
            data = buffer.getvalue()
            self.wire[4] += len(data)
            self.out_queue.put((home, data))
            self.sent[home] += 1
            if profile is not None:
                profile.add(profiling.SEND, profiling.thread_ns() - c0, profiling.wall_ns() - w0)
            return
        if name == DRIVER:
            if self.tapped(sender.name, DRIVER, message):
                self.inbox.append(message)
            return
        self.enqueue(self.cells[name], sender, message)

    def _reduce_tensor(self, t: torch.Tensor) -> Any:
        """How a tensor in a message is pickled: a plain CPU tensor through a slot of the ring
        to the receiving process if it has one (see the module doc), else as its raw bytes;
        any other tensor as torch pickles it. Either way the receiver gets the same values,
        bit for bit, in a tensor of its own."""
        if (
            t.dtype not in PLAIN_DTYPES
            or t.device.type != "cpu"
            or t.requires_grad
            or t.layout != torch.strided
            or t.is_conj()
            or t.is_neg()
        ):
            return t.__reduce_ex__(5)
        flat = t.contiguous().view(-1).view(torch.uint8)
        nbytes = flat.numel()
        channel = self.to
        if channel is not None and SLOT_MIN_BYTES <= nbytes <= channel.slot_bytes:
            slot = channel.put(flat)
            if slot is not None:
                self.wire[0] += 1
                self.wire[1] += nbytes
                return _from_slot, (self.index, slot, nbytes, t.dtype, tuple(t.shape))
        self.wire[2] += 1
        self.wire[3] += nbytes
        return _from_bytes, (pickle.PickleBuffer(flat.numpy()), t.dtype, tuple(t.shape))

    def take(
        self, source: int, slot: int, nbytes: int, dtype: torch.dtype, shape: tuple
    ) -> torch.Tensor:
        """Unpickle a tensor that came from process ``source`` through a slot."""
        return self.channels[(source, self.index)].take(slot, nbytes, dtype, shape)

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
        if timeout > 0 and self.profile is not None:
            w0 = profiling.wall_ns()
            readers = wait(list(self.inbound), timeout)
            self.profile.add(profiling.IDLE, 0, profiling.wall_ns() - w0, nested=False)
        else:
            readers = wait(list(self.inbound), timeout) if timeout > 0 else self._readable()
        for conn in readers:
            self._drain(conn)
        return readers

    def _readable(self) -> list[Connection]:
        return [conn for conn in self.inbound if conn.poll()]

    def _drain(self, conn: Connection) -> None:
        profile = self.profile
        while conn.poll():
            if profile is not None:
                c0, w0 = profiling.thread_ns(), profiling.wall_ns()
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                del self.inbound[conn]  # the writer is gone (its death is noticed elsewhere)
                return
            name, sender, message = _Unpickler(data, self.take).load()
            if profile is not None:
                profile.add(
                    profiling.RECEIVE,
                    profiling.thread_ns() - c0,
                    profiling.wall_ns() - w0,
                    nested=False,
                )
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
    whose wait is bounded: a holder that died is noticed by the driver long before. With a
    ``host`` whose run is profiled, the waits and the time held are counted."""

    __slots__ = ("_lock", "_name", "_host", "_held", "_make")

    def __init__(self, make: Any, name: str, host: _Host | None = None) -> None:
        self._lock, self._name, self._make = make(), name, make
        self._host = host if host is not None and host.profile is not None else None
        self._held = 0

    def sibling(self, part: str) -> _TimedLock:
        """Another lock for the same actor (before the fork): for ``part`` of its state."""
        return _TimedLock(self._make, f"{self._name} ({part})", self._host)

    def __enter__(self) -> None:
        if self._host is not None:
            w0 = profiling.wall_ns()
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise RunTimeout(
                f"waited {LOCK_TIMEOUT_S:.0f} s for the lock of shared actor {self._name!r}"
            )
        if self._host is not None:
            self._held = profiling.wall_ns()
            self._host.profile.add(profiling.LOCK_WAIT, 0, self._held - w0)

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self._host is not None:
            held = profiling.wall_ns() - self._held
            self._host.profile.add(profiling.LOCK_HELD, 0, held, nested=False)


def _group(name: str) -> int | None:
    """``"replica1.stage0"`` -> 1, ``"data3"`` -> 3, ``"master"`` -> None."""
    match = re.search(r"\d+", name)
    return int(match.group()) if match else None


def _member(name: str) -> int:
    """``"replica1.stage2"`` -> 2 (the number after the last dot); ``"data1"`` -> 0."""
    _, dot, tail = name.rpartition(".")
    match = re.search(r"\d+", tail) if dot else None
    return int(match.group()) if match else 0


def place(names: list[str], workers: int | None = None) -> dict[str, int]:
    """The worker (1..n) of every grouped actor in ``names`` (spawn order; others are not
    placed). n is ``workers`` if given (else the machine's CPUs), at most one per (group,
    member) pair. With at least n groups (replicas), each group goes whole to one worker,
    round-robin; with fewer, the pairs, by group in order of first appearance then member, are
    dealt round-robin, so that a replica's stages work on different cores (see the module
    doc): ``"replica0.stage0"``, ``"replica0.stage1"`` on 2 workers -> 1, 2."""
    order: dict[int, int] = {}
    pairs: set[tuple[int, int]] = set()
    for name in names:
        group = _group(name)
        if group is not None:
            order.setdefault(group, len(order))
            pairs.add((order[group], _member(name)))
    n = min(len(pairs), workers or os.cpu_count() or 1)
    if len(order) >= n:
        # Replicas enough to keep every worker busy: each stays whole in one worker, where
        # its stages hand activations over in memory (spread, the main job ran 0.6x as fast).
        return {name: order[g] % n + 1 for name in names if (g := _group(name)) is not None}
    rank = {pair: k for k, pair in enumerate(sorted(pairs))}
    out = {}
    for name in names:
        group = _group(name)
        if group is not None:
            out[name] = rank[(order[group], _member(name))] % n + 1
    return out


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

    Options (:class:`~.options.ProcessesOptions`): ``processes`` (workers; default: one per
    (group, member) pair, i.e. per (replica, stage), at most the machine's CPUs),
    ``threads_per_process`` (torch intra-op threads per worker, default 1; 0 leaves torch's),
    ``faults`` (a fault plan, :mod:`.faults`: a delayed actor sleeps in its handler; the
    planned actor dies and, as this runtime restarts nothing, the run ends with
    ``ActorFailed`` naming it; a ``message=N`` count of a shared actor counts the messages
    handled in each process), ``max_restarts`` (accepted for the other runtimes' sake;
    nothing is restarted here), ``shard_updates``: ``"locked"`` (default: a shard applies
    one push at a time to each segment, exactly as in one process) or ``"hogwild"``
    (pushes from different processes apply at the same time, unsynchronized as in Hogwild;
    versions, staleness and counters still counted exactly: see ``ParameterShard``),
    ``tap`` (sees every message, in the process that hosts its receiver:
    :data:`~.options.Tap`; a worker inherits it), ``profile`` (time every handler, the wire
    and the waits in each process: ``describe()["profile"]``, :mod:`.profile`).
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
        self._grouped: list[str] = []  # grouped actors spawned before the start, in order
        self._workers: list[Any] = []  # multiprocessing.Process, worker i at [i - 1]
        self._driver_ref = ProcRef(DRIVER)
        self._closed = False
        self._wave: tuple[int, tuple] | None = None  # the probe wave out: number, own counts
        self._waves_sent = 0
        self._last_quiet: tuple | None = None  # counts of the last wave that found all quiet
        self._next_probe = 0.0
        self._wire: torch.Tensor | None = None  # shared counters, a row per process (WIRE)

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
            if _group(name) is not None and not host.started:
                self._grouped.append(name)
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
            w0 = time.perf_counter_ns()
            wait([*host.inbound, *sentinels], min(0.1, max(0.0, deadline - time.monotonic())))
            if host.profile is not None:
                host.profile.add(profiling.IDLE, 0, time.perf_counter_ns() - w0, nested=False)
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
        placed = place(self._grouped, self._processes)  # (group, member) pairs to workers
        n = max(placed.values(), default=0)
        if self.options.profile:
            # Every handler of every actor gets a row in each process's block (see .profile).
            keys = [(name, t.__name__) for name, c in host.cells.items() for t in c.handlers]
            host.profile = profiling.Profile(keys, n + 1)
            self._kinds = {name: type(c.actor).__name__ for name, c in host.cells.items()}
            for name, cell in host.cells.items():
                cell.handlers = host.profile.timed(name, cell.handlers)
        homes = {}
        for name, cell in host.cells.items():
            if cell.home == SHARED:
                # The actor holds the lock itself, around its critical sections only.
                lock = _TimedLock(ctx.Lock, name, host)
                cell.actor.share_memory(lock, hogwild=self._hogwild)
            elif name in placed:
                cell.home = placed[name]
            homes[name] = host.route[name] = cell.home
        self._homes = homes
        # A ring of slots each way between two workers that host neighbouring members of a
        # group (stage s and s + 1 of a replica): the hops activations and gradients take.
        for a in placed:
            for b in placed:
                if (
                    placed[a] != placed[b]
                    and "." in a
                    and "." in b
                    and _group(a) == _group(b)
                    and abs(_member(a) - _member(b)) == 1
                ):
                    host.channels.setdefault((placed[a], placed[b]), _Channel())
        self._wire = torch.zeros((n + 1, len(WIRE)), dtype=torch.int64).share_memory_()
        host.wire = self._wire[0].numpy()
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
                args=(host, i, pipes, self._threads, parent, self._wire),
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
        driver's, "shared" all of them: the placement), ``worker_pids``, ``restarts_by_actor``
        and ``wire`` (what crossed between processes: :data:`WIRE`); with the ``profile``
        option, ``profile``: where each process's time went (:mod:`.profile`)."""
        homes = getattr(self, "_homes", {})
        wire = self._wire.sum(0).tolist() if self._wire is not None else [0] * len(WIRE)
        out = {
            "processes": {n: ("shared" if h == SHARED else h) for n, h in homes.items()},
            "worker_pids": [w.pid for w in self._workers],
            "restarts_by_actor": {},  # as the other runtimes report; nothing restarts here
            "wire": dict(zip(WIRE, wire, strict=True)),
        }
        if self._host.profile is not None:
            out["profile"] = self._host.profile.summary(homes, self._kinds)
        return out

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
        host.channels.clear()
        if self._wire is not None:
            self._wire = self._wire.clone()  # the counters stay readable; their memory goes
            host.wire = [0] * len(WIRE)
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


def _run_worker(
    host: _Host, index: int, pipes: dict, threads: int, parent: int, wire: torch.Tensor
) -> None:
    host.rng = random.Random(None if host.seed is None else host.seed * 1_000_003 + index)
    host.wire = wire[index].numpy()  # this worker's row of the shared counters
    if host.profile is not None:
        host.profile.attach(index)
    host.channels = {k: c for k, c in host.channels.items() if index in k}
    _keep_ends(host, index, pipes)
    _keep_cells(host, index)
    host.inbox.clear()
    _worker_main(host, threads, parent)


__all__ = ["SHARD_UPDATES", "ProcRef", "ProcessesRuntime", "place"]  # SHARD_UPDATES: for the CLI
