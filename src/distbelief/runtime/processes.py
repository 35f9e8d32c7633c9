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
  (per-sender FIFO), written by a writer thread so that a full pipe never stalls a run loop
  (a worker writes an envelope under 4 KiB itself when its writer holds none and the pipe has
  room: ``DIRECT_BYTES``).
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
* **Supervision.** A worker whose actor raises reports it and stops, which ends the run with
  :class:`ActorFailed`. Deaths are survived as on ``local`` and Ray (``max_restarts`` per
  actor, the :class:`~.supervise.Supervisor`'s restart and replay): a worker that dies (end
  of file on its pipe to the driver) is replaced by a fork of the *fork server*, forked from
  the driver with the first workers, before the driver starts a thread and before any
  message, so that it holds every actor as built from its constructor arguments and the
  shared memory, locks and slot rings (unlinked at creation: no process started otherwise
  could open them). Its actors, marked ``restarted``, get their wiring before anything else;
  the new worker has two new pipes to the driver alone (their ends passed to the fork server
  over a Unix socket), and the driver hands on the mail between it and the other workers.
  A planned ``kill`` of an actor rebuilds it in its worker from its kept arguments; ``exit``
  crashes the worker. A shared actor (a shard) has no process of its own: its planned death,
  or a worker dying while it holds its lock (each lock records its holder; the driver breaks
  a dead holder's lock), means its state is lost: it is restarted in the driver's process,
  which serves it alone from then on, and holds its mail back until the master restores it.
  Workers ignore SIGINT (Ctrl-C and SIGTERM are the driver's: :func:`stop_signals_as_flag`)
  and die with the driver's process, even one killed with SIGKILL (a parent-death signal;
  a replacement with the fork server, which dies with the driver).
  :meth:`ProcessesRuntime.shutdown` kills and reaps every worker (the fork server reaps its
  own); shared memory uses torch's file-descriptor strategy (unlinked at creation), so
  nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import ctypes
import io
import multiprocessing
import os
import pickle
import queue
import random
import re
import select
import signal
import socket
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
from .supervise import Supervisor

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
DIRECT_BYTES = 4092
"""A worker writes an envelope this small (with its 4-byte header: at most ``PIPE_BUF``, one
atomic write that cannot block on a pipe with room) straight to the pipe from its run loop
when its writer thread has nothing queued: no hand-over to the writer thread (a wake-up and
the GIL passed each way), which halved a hop's latency between two workers."""
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

    __slots__ = ("index", "home", "restart_args")

    def __init__(self, name: str, index: int, actor: Actor, home: int) -> None:
        super().__init__(name, actor)
        self.index = index  # in _Host.names: what the shared slots of `current` hold
        self.home = home
        self.restart_args: tuple | None = None  # pristine constructor arguments (a kill)


class _Control:
    """Between the driver and a worker, about the run itself (not an actor's mail; not
    counted by the quiescence detection)."""


class _Died(_Control):
    """Worker -> driver: an actor of the worker died of its planned ``kill`` and was rebuilt
    in place (its wiring given again), or, not restartable, not."""

    def __init__(self, name: str, fault: str, rebuilt: bool) -> None:
        self.name, self.fault, self.rebuilt = name, fault, rebuilt


class _Lost(_Control):
    """Worker -> driver: a shared actor's planned death fired there: its state is lost."""

    def __init__(self, name: str, fault: str) -> None:
        self.name, self.fault = name, fault


class _Reroute(_Control):
    """Driver -> worker: send the mail of these actors to the driver's process from now on,
    which hands it on (``{name: 0}``): their worker was replaced, or a shared actor is served
    by the driver's process alone since its restart."""

    def __init__(self, routes: dict[str, int]) -> None:
        self.routes = routes


class _Once:
    """A planned fault that fires once in the whole run, whichever process meets it first
    (a shared actor's ``update=N`` is met by every process that hosts it); ``fired`` (shared
    bytes, by cell index) also tells a replacement worker which faults are spent."""

    __slots__ = ("fault", "kind", "_fired", "_index")

    def __init__(self, fault: fault_plans.Fault, fired: Any, index: int) -> None:
        self.fault, self.kind, self._fired, self._index = fault, fault.kind, fired, index

    def due(self, message: Any, delivered: int, actor: Any) -> bool:
        if self._fired[self._index] or not self.fault.due(message, delivered, actor):
            return False
        with self._fired.get_lock():
            if self._fired[self._index]:
                return False
            self._fired[self._index] = 1
            return True

    def __str__(self) -> str:
        return str(self.fault)


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
        self.queued = 0  # envelopes handed to the writer thread (the run loop counts)
        self.written = 0  # ... and written by it (the writer counts): equal, it holds none
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
        # Restarts (see ProcessesRuntime): the plan (delays), what the driver told each actor
        # before the start (its wiring), the shared locks by actor, the control messages the
        # driver's process got, and what it calls at a death in its own process.
        self.plan: tuple = ()
        self.told: dict[str, list[Any]] = {}
        self.locks: dict[str, _TimedLock] = {}
        self.controls: list[_Control] = []
        self.on_death: Any = None
        self.fired: Any = None  # shared bytes: planned faults spent, by cell index (_Once)
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
            if not self._direct(home, data):
                self.queue_out(home, data)
            self.sent[home] += 1
            if profile is not None:
                profile.add(profiling.SEND, profiling.thread_ns() - c0, profiling.wall_ns() - w0)
            return
        if name == DRIVER:
            if self.tapped(sender.name, DRIVER, message):
                self.inbox.append(message)
            return
        self.enqueue(self.cells[name], sender, message)

    def queue_out(self, home: int, data: bytes) -> None:
        """Hand an envelope for process ``home`` to the writer thread."""
        self.queued += 1
        self.out_queue.put((home, data))

    def _direct(self, home: int, data: bytes) -> bool:
        """Write a small envelope straight to its pipe (a worker only: see ``DIRECT_BYTES``);
        False if it must go through the writer thread: it is bigger, the writer holds
        envelopes (they go first: per-sender FIFO), or the pipe has no room."""
        if self.index == 0 or len(data) > DIRECT_BYTES or self.queued != self.written:
            return False
        conn = self.outbound.get(home)
        if conn is None:
            return False
        try:
            if not select.select((), (conn,), (), 0)[1]:
                return False
            conn.send_bytes(data)
        except (OSError, ValueError):  # the reader is gone: the run is ending anyway
            pass
        return True

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
            if home is None:  # a marker: everything queued before it is written
                data.set()
                continue
            try:
                self.outbound[home].send_bytes(data)
            except (OSError, ValueError):  # the reader is gone: the run is ending anyway
                pass
            self.written += 1

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
            if isinstance(message, _Control):
                if isinstance(message, _Reroute):
                    self.route.update(message.routes)
                else:
                    self.controls.append(message)
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

    def control(self, to: int, message: _Control) -> None:
        """Send a control message to process ``to`` (uncounted, untapped)."""
        self.queue_out(to, pickle.dumps((DRIVER, "", message)))

    def _die(self, cell: _Cell, message: Any) -> None:
        """The planned death of ``cell``'s actor, instead of handling ``message`` (see
        ProcessesRuntime): ``exit`` in a worker crashes the worker (inside the shard's locked
        section for a shared actor); ``kill`` rebuilds the actor in place; a shared actor's
        kill is reported to the driver, which has its state restored."""
        fault, cell.fault = cell.fault, None  # a planned fault happens once
        if fault.kind == "exit" and self.index > 0:
            if cell.home == SHARED:
                self.locks[cell.name].__enter__()  # the worst moment: holding its lock
            self.current[self.index] = cell.index  # the driver names the actor it was handling
            os._exit(70)  # a crash of the process itself
        if cell.home == SHARED:
            lost = _Lost(cell.name, str(fault))
            self.on_death(lost) if self.index == 0 else self.control(0, lost)
            return
        rebuilt = cell.restart_args is not None
        self.discard(cell)  # what was on its way to the dead actor is lost with it
        if rebuilt:
            self.rebuild(cell)
        died = _Died(cell.name, str(fault), rebuilt)
        self.on_death(died) if self.index == 0 else self.control(0, died)

    def rebuild(self, cell: _Cell) -> None:
        """Respawn ``cell``'s actor from its pristine constructor arguments, as ``restarted``,
        with its wiring first in its mailbox (before any actor's message can reach it)."""
        (args, kwargs), cell.restart_args = cell.restart_args, None  # (a fault fires once)
        cell.actor = type(cell.actor)(*args, **kwargs)
        self.renew(cell)

    def renew(self, cell: _Cell) -> None:
        """``cell``'s actor is a new incarnation: mark it ``restarted``, bind it, give it its
        wiring again."""
        cell.actor.restarted = True  # before anything is delivered (see Actor.restarted)
        cell.actor.bind(_Context(self, cell.name))
        cell.handlers = fault_plans.slowed(
            cell.actor.bound_handlers(), fault_plans.delay_of(self.plan, cell.name)
        )
        for message in self.told.get(cell.name, ()):
            self.enqueue(cell, ProcRef(DRIVER), message)


PROBE_AFTER_S = 0.25
"""How long the driver's process waits idle before it probes the workers for a deadlock."""
LOCK_TIMEOUT_S = 60.0
"""Longest a process waits for a shared actor's lock (held for one handler at a time; a
holder that died is noticed by the driver, which breaks the lock, long before)."""
LOCK_POLL_S = 0.05
"""How often a wait for a shared actor's lock looks whether its holder died."""
_BREAKER: Any = None
"""In the driver's process while a run is on: called with a ``_TimedLock`` that a wait finds
held for a while (it breaks the lock of a holder that died); None in workers."""


def _pid_dead(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:  # pragma: no cover - no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


class _TimedLock:
    """A lock across processes for a shared actor's critical sections, as a context manager
    whose wait is bounded, and which records its holder (a process id, in shared memory): a
    worker that dies while holding it is found by the driver, which breaks the lock (and has
    the actor's state, perhaps torn in the middle of an update, restored). An actor may ask
    for ``sibling`` locks (before the fork) for parts of its state: a shard's segments. With a
    ``host`` whose run is profiled, the waits and the time held are counted."""

    __slots__ = ("_ctx", "_lock", "_label", "_actor", "_holder", "_host", "_held", "siblings")

    def __init__(
        self, ctx: Any, name: str, host: _Host | None = None, *, label: str | None = None
    ) -> None:
        self._ctx, self._lock, self._holder = ctx, ctx.Lock(), ctx.RawValue("i", 0)
        self._actor, self._label = name, label or name
        self._host = host if host is not None and host.profile is not None else None
        self._held = 0
        self.siblings: list[_TimedLock] = []

    def sibling(self, part: str) -> _TimedLock:
        """Another lock of the same actor (made before the fork): for ``part`` of its state."""
        lock = _TimedLock(self._ctx, self._actor, self._host, label=f"{self._actor} ({part})")
        self.siblings.append(lock)
        return lock

    def __enter__(self) -> None:
        if self._host is not None:
            w0 = profiling.wall_ns()
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            if _BREAKER is not None:
                _BREAKER(self)
            if time.monotonic() > deadline:
                raise RunTimeout(
                    f"waited {LOCK_TIMEOUT_S:.0f} s for the lock of shared actor {self._label!r}"
                )
        self._holder.value = os.getpid()
        if self._host is not None:
            self._held = profiling.wall_ns()
            self._host.profile.add(profiling.LOCK_WAIT, 0, self._held - w0)

    def __exit__(self, *exc: object) -> None:
        self._holder.value = 0
        self._lock.release()
        if self._host is not None:
            held = profiling.wall_ns() - self._held
            self._host.profile.add(profiling.LOCK_HELD, 0, held, nested=False)

    @property
    def name(self) -> str:
        """The shared actor's name."""
        return self._actor

    @property
    def holder(self) -> int:
        """The process id holding this lock (0: free)."""
        return self._holder.value

    def break_if_dead(self, dead: Any = _pid_dead) -> bool:
        """Release this lock and its siblings where their holder died (``dead(pid)``); True if
        any was. Only the driver's process breaks locks (one breaker: a lock is never released
        twice)."""
        broken = False
        for lock in (self, *self.siblings):
            holder = lock._holder.value
            if not holder or holder == os.getpid() or not dead(holder):
                continue
            lock._holder.value = 0
            lock._lock.release()
            broken = True
        return broken


def _group(name: str) -> int | None:
    """``"replica1.stage0"`` -> 1, ``"data3"`` -> 3, ``"master"`` -> None."""
    match = re.search(r"\d+", name)
    return int(match.group()) if match else None


def _member(name: str) -> int:
    """``"replica1.stage2"`` -> 2 (the number after the last dot); ``"data1"`` -> 0."""
    _, dot, tail = name.rpartition(".")
    match = re.search(r"\d+", tail) if dot else None
    return int(match.group()) if match else 0


def _part(name: str) -> int:
    """``"replica1.stage0.part2"`` -> 2 (a stage's partition); any other name -> 0."""
    match = re.search(r"\.part(\d+)$", name)
    return int(match.group(1)) if match else 0


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
        # its stages hand activations over in memory (spread, the main job ran 0.6x as fast);
        # but the partitions of a stage (``.part<b>``) work at once: block b goes b workers on.
        return {
            name: (order[g] + _part(name)) % n + 1
            for name in names
            if (g := _group(name)) is not None
        }
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 1 << 30
"""What a worker's allocator keeps of the memory it frees (:func:`_keep_freed_memory`)."""


def _keep_freed_memory() -> None:
    """Have glibc's allocator keep what this process frees, up to ``KEEP_FREED_BYTES``, instead
    of handing it back to the kernel: otherwise every tensor of a few MiB (an activation, a
    fetched version of a stage's parameters, a flat gradient) is a fresh mapping that faults
    in page by page on first write; a stage of 26 MB paid about 15,000 page faults a step.
    What a worker once held it keeps for the rest of the run, as jemalloc or tcmalloc would.
    Nothing happens where the call is not available (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _worker_main(host: _Host, threads: int, parent: int) -> None:
    """A worker's life: run its actors until the driver kills it (or is gone)."""
    _die_with_parent(parent)
    _keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the driver's stop handler it inherited
    if threads > 0:
        torch.set_num_threads(threads)
    if host.index > 1 and host.seed is not None:
        torch.manual_seed(host.seed + 7919 * host.index)  # workers draw different numbers
    host.queued = host.written = 0  # its own writer thread, from here on
    host.writer = threading.Thread(target=host._write, name="distbelief-writer", daemon=True)
    host.writer.start()
    alive = True
    while True:
        host.receive(0.0)
        if host.probe is not None:
            idle = not (alive and host.ready)
            reply = _ProbeReply(host.probe.wave, host.index, idle, host.sent[:], host.received[:])
            host.queue_out(0, pickle.dumps((DRIVER, "", reply)))
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


class _Slot:
    """Worker ``i`` as the driver sees it: its process id, its pipe to the driver (end of
    file there: it died), and its ``multiprocessing.Process`` if the driver forked it (a
    replacement is the fork server's child)."""

    __slots__ = ("pid", "reader", "process")

    def __init__(self, pid: int, reader: Connection, process: Any = None) -> None:
        self.pid, self.reader, self.process = pid, reader, process


class ProcessesRuntime:
    """Hosts actors in forked worker processes of this machine (see the module doc).

    Options (:class:`~.options.ProcessesOptions`): ``processes`` (workers; default: one per
    (group, member) pair, i.e. per (replica, stage), at most the machine's CPUs),
    ``threads_per_process`` (torch intra-op threads per worker, default 1; 0 leaves torch's),
    ``faults`` (a fault plan, :mod:`.faults`: a delayed actor sleeps in its handler; a planned
    death is survived as on ``local`` and Ray, see the module doc's *Supervision*; a
    ``message=N`` count of a shared actor counts the messages handled in each process),
    ``max_restarts`` (restarts allowed per actor, default 5), ``shard_updates``: ``"locked"``
    (default: a shard applies one push at a time to each segment, exactly as in one process)
    or ``"hogwild"``
    (pushes from different processes apply at the same time, unsynchronized as in Hogwild;
    versions, staleness and counters still counted exactly: see ``ParameterShard``), ``tap``
    (sees every message, in the process that hosts its receiver: :data:`~.options.Tap`; a
    worker inherits it), ``profile`` (time every handler, the wire and the waits in each
    process: ``describe()["profile"]``, :mod:`.profile`).
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
        self._host.plan = self._plan
        self._supervisor = Supervisor(self.options.max_restarts)
        self.restarts = self._supervisor.restarts
        """Restarts per actor name."""
        self._classes: dict[str, type[Actor]] = {}
        self._grouped: list[str] = []  # grouped actors spawned before the start, in order
        self._workers: list[Any] = []  # multiprocessing.Process of the first workers
        self._slots: dict[int, _Slot] = {}  # worker index -> its current process
        self._replacements: list[int] = []  # pids of workers the fork server forked
        self._forks: Any = None  # the fork server: (its Process, the driver's socket end)
        self._rerouted: dict[str, int] = {}  # shared actors served by the driver's process
        self._replaced = False  # a worker was replaced: its message counts are gone
        self._driver_ref = ProcRef(DRIVER)
        self._closed = False
        self._wave: tuple[int, tuple] | None = None  # the probe wave out: number, own counts
        self._waves_sent = 0
        self._last_quiet: tuple | None = None  # counts of the last wave that found all quiet
        self._next_probe = 0.0
        self._wire: torch.Tensor | None = None  # shared counters, a row per process (WIRE)
        self._broken: list[str] = []  # shared actors whose lock a dead holder left held

    # -------------------------------------------------------------- the Runtime protocol

    def spawn(self, name: str, cls: type[Actor], *args: Any, **kwargs: Any) -> ProcRef:
        host = self._host
        if name in host.cells or name == DRIVER:
            raise ValueError(f"an actor named {name!r} already exists")
        fault = self._faults.get(name)
        # A kill rebuilds the actor in its process from the arguments as they were given (a
        # stage binds its layers' parameters to buffers of its own): kept for such an actor.
        restart = fault is not None and cls.restartable and not cls.shareable
        pristine = copy.deepcopy((args, kwargs)) if restart else None
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
        cell.fault, cell.restart_args = fault, pristine
        # A delay is a sleep in the handler; a shared actor's in each process that handles
        # its messages, outside its lock (the lock guards its shared state only).
        cell.handlers = fault_plans.slowed(cell.handlers, fault_plans.delay_of(self._plan, name))
        host.names.append(name)
        actor.bind(_Context(host, name))
        host.cells[name] = cell
        host.route[name] = home
        self._classes[name] = cls
        return ProcRef(name)

    def actor(self, ref: ProcRef) -> Actor:
        """The object behind a ref, as this (the driver's) process holds it."""
        return self._host.cells[ref.name].actor

    def tell(self, ref: ProcRef, message: Any) -> None:
        if not self._host.started:  # before the run starts: its wiring
            self._supervisor.wiring(ref.name, message)
        self._host.post(ref.name, message, self._driver_ref)

    def converse(self, ref: ProcRef, message: Any, *, timeout: float) -> Iterator[Any]:
        deadline = time.monotonic() + timeout
        if not self._host.started:
            self._host.check_targets(self._plan)  # none that cannot fire
            self._supervisor.partner = ref
            self._start()
        self.tell(ref, message)
        yield from replies(self._run_until_reply, self._host.inbox, deadline)

    def _run_until_reply(self, deadline: float, interrupted: StopFlag) -> None:
        global _BREAKER
        host = self._host
        _BREAKER = self._break_lock
        try:
            while not host.inbox:
                interrupted.raise_if_set()  # between two messages: every actor is whole
                if time.monotonic() > deadline:
                    raise RunTimeout("the run did not finish within its timeout")
                host.receive(0.0)
                self._check_workers(deadline)
                if host.ready:
                    host.deliver(BATCH)
                    self._last_quiet = None
                    self._next_probe = time.monotonic() + PROBE_AFTER_S
                    continue
                if host.inbox:
                    break
                if not self._slots:
                    raise Deadlock(
                        "no actor has a message to handle, but the driver got no reply: "
                        "a message was lost or an actor is waiting for a reply that never comes"
                    )
                if not self._replaced:  # (a dead worker's counts died with it)
                    self._look_for_deadlock()
                w0 = time.perf_counter_ns()
                wait([*host.inbound], min(0.1, max(0.0, deadline - time.monotonic())))
                if host.profile is not None:
                    idle = time.perf_counter_ns() - w0
                    host.profile.add(profiling.IDLE, 0, idle, nested=False)
        finally:
            _BREAKER = None
        interrupted.raise_if_set()  # a stop while the reply was on its way: not lost with it

    def _look_for_deadlock(self) -> None:
        """Called while the driver's process is idle. Every ``PROBE_AFTER_S`` it asks every
        worker whether it is idle and what it has sent and received (a probe *wave*). When two
        successive waves find every process idle, every message sent received, and no count
        changed in between, no message is left anywhere and none can appear: the run is
        deadlocked (the four-counter method of termination detection). Not after a worker
        was replaced (what it had counted died with it): the run's timeout still holds."""
        host = self._host
        counts = (host.sent[:], host.received[:])
        now = time.monotonic()
        wave = self._wave
        if wave is not None and len(host.probe_replies) == len(self._slots):
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
            for i in self._slots:
                host.queue_out(i, probe)

    # -------------------------------------------------------------- supervision

    def _failed(self) -> None:
        f = self._host.failed
        if f is not None:
            raise ActorFailed(f.actor, f.message, f.error)

    def _check_workers(self, deadline: float) -> None:
        """Restart what died since the last look: actors killed in a worker (rebuilt there),
        shared actors whose state is lost, and workers that died (replaced)."""
        host = self._host
        self._failed()
        while host.controls:
            self._on_control(host.controls.pop(0))
        for i, slot in list(self._slots.items()):
            gone = slot.reader not in host.inbound  # end of file: its process died
            if not gone and (slot.process is None or slot.process.exitcode is None):
                continue
            host.receive(0.0)  # what it said before dying (a failure report) comes first
            self._failed()
            while host.controls:
                self._on_control(host.controls.pop(0))
            self._replace_worker(i, slot)
        while self._broken:
            self._restart_shared(self._broken.pop(0), "its lock's holder died")

    def _on_control(self, message: _Control) -> None:
        """A worker's report of a planned death (see ``_Host._die``); in the driver's
        process, called by ``_die`` itself, while the dead actor's mail is being delivered."""
        if isinstance(message, _Lost):
            self._restart_shared(message.name, f"died ({message.fault})")
        elif isinstance(message, _Died):

            def refuse(why: str, count: int) -> ActorFailed:
                why = "its class is not restartable" if why == "not restartable" else why
                return ActorFailed(message.name, "a message", RuntimeError(
                    f"died ({message.fault}); {why}"))  # fmt: skip

            # rebuilt in its process, its wiring given (_Host.rebuild)
            self._restart(message.name, message.rebuilt, refuse, lambda: None)

    def _break_lock(self, lock: _TimedLock) -> None:
        """A wait in the driver's process for a shared actor's lock: break it if its holder
        died; the actor's state is then restored (see :meth:`_restart_shared`)."""
        if lock.break_if_dead() and lock.name not in self._broken:
            self._broken.append(lock.name)

    def _restart_shared(self, name: str, why: str) -> None:
        """A shared actor's state is lost (its planned death, or a worker that died holding
        its lock may have torn it): restart it as a restarted actor is, in the driver's
        process, which serves it alone from now on (the workers send it their mail there);
        it holds its mail back until the master restores its state."""
        host = self._host

        def refuse(reason: str, count: int) -> ActorFailed:
            reason = "its class is not restartable" if reason == "not restartable" else reason
            return ActorFailed(name, "a message", RuntimeError(f"{why}; {reason}"))

        def respawn() -> None:
            cell = host.cells[name]
            host.discard(cell)  # what was on its way to the lost state is lost with it
            host.renew(cell)  # (same memory: the restore writes over it)
            if name not in self._rerouted:
                self._rerouted[name] = 0
                for i in self._slots:
                    host.control(i, _Reroute({name: 0}))

        self._restart(name, self._classes[name].restartable, refuse, respawn)

    def _restart(self, name: str, restartable: bool, refuse: Any, respawn: Any) -> None:
        """Have the supervisor restart ``name`` (counted, refused past ``max_restarts``) as
        ``respawn`` does it; its wiring is not replayed: a rebuilt actor keeps what it was told
        before the start, and the driver's process passes its mail on."""
        self._supervisor.restart(
            name,
            ProcRef(name),
            restartable=restartable,
            refuse=refuse,
            respawn=respawn,
            send=lambda ref, m: self._host.post(ref.name, m, self._driver_ref),
            replay_wiring=False,
        )

    def _replace_worker(self, i: int, slot: _Slot) -> None:
        """Worker ``i`` died: break the locks it held, then restart each of its actors (in
        spawn order) in a new worker forked by the fork server, which rebuilds them from
        their constructor arguments and gives them their wiring; the other workers send
        their mail to them through the driver's process from then on."""
        host = self._host
        index = host.current[i]
        doing = host.names[index] if index >= 0 else None
        code = slot.process.exitcode if slot.process is not None else None
        if slot.process is not None:
            slot.process.join(5.0)
            code = slot.process.exitcode
        for lock in host.locks.values():
            if lock.break_if_dead(lambda pid: pid == slot.pid) and lock.name not in self._broken:
                self._broken.append(lock.name)
        names = [n for n, home in self._homes.items() if home == i]
        cause = RuntimeError(f"its process {slot.pid} died (exit code {code})")
        if not names:
            raise ActorFailed(f"worker {i}", "no message (idle)", cause)
        del self._slots[i]  # dead from now on (a refusal ends the run with it so)
        self._replaced = True
        done: list[bool] = []

        def respawn() -> None:
            if not done:
                self._fork_worker(i)
                done.append(True)

        for name in sorted(names, key=lambda n: n != doing):  # the one it was handling first
            what = "a message" if name == doing else "no message (idle)"

            def refuse(why: str, count: int, name: str = name, what: str = what) -> ActorFailed:
                why = "its class is not restartable" if why == "not restartable" else why
                return ActorFailed(name, what, RuntimeError(f"{cause}; {why}"))

            self._restart(name, self._classes[name].restartable, refuse, respawn)

    def _fork_worker(self, i: int) -> None:
        """Have the fork server fork a new worker ``i`` (see ``_serve_forks``), wired to the
        driver's process by two new pipes; the other workers are told to send its actors'
        mail through the driver's process."""
        host = self._host
        flushed = threading.Event()  # mail queued for the dead worker goes to its dead pipe
        host.out_queue.put((None, flushed))
        flushed.wait(10.0)
        old = host.outbound.pop(i, None)
        if old is not None:
            old.close()
        down_r, down_w = multiprocessing.Pipe(duplex=False)  # driver -> worker
        up_r, up_w = multiprocessing.Pipe(duplex=False)  # worker -> driver
        sock = self._forks[1]
        sock.settimeout(30.0)
        request = pickle.dumps((i, dict(self._rerouted)))
        try:
            socket.send_fds(sock, [request], [down_r.fileno(), up_w.fileno()])
            reply = sock.recv(16)
        except OSError as exc:
            raise ActorFailed(f"worker {i}", "its replacement", exc) from None
        finally:
            down_r.close()
            up_w.close()
        if len(reply) != 8:
            raise ActorFailed(f"worker {i}", "its replacement", RuntimeError("no fork server"))
        pid = int.from_bytes(reply, "little")
        self._replacements.append(pid)
        host.outbound[i] = down_w
        host.inbound[up_r] = i
        host.current[i] = -1
        self._slots[i] = _Slot(pid, up_r)
        routes = {n: 0 for n, home in self._homes.items() if home == i}
        for j in self._slots:
            if j != i:
                host.control(j, _Reroute(routes))

    # -------------------------------------------------------------- start and shutdown

    def _start(self) -> None:
        """Share the shared actors' memory, fork the workers and the fork server, wire the
        pipes."""
        host = self._host
        ctx = multiprocessing.get_context("fork")
        placed = place(self._grouped, self._processes)  # (group, member) pairs to workers
        n = max(placed.values(), default=0)
        fired = ctx.Array("b", len(host.names))  # planned faults spent, by cell index
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
                lock = host.locks[name] = _TimedLock(ctx, name, host)
                cell.actor.share_memory(lock, hogwild=self._hogwild)
            elif name in placed:
                cell.home = placed[name]
            homes[name] = host.route[name] = cell.home
            if cell.fault is not None:
                cell.fault = _Once(cell.fault, fired, cell.index)
        self._homes = homes
        host.told = self._supervisor.told
        host.fired = fired
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
            self._slots[i] = _Slot(worker.pid, pipes[i, 0][0], worker)
        if n and self._supervisor.max_restarts:
            # Forked now, before the driver starts a thread: it forks the replacements.
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            server = ctx.Process(
                target=_serve_forks,
                args=(host, (theirs, mine), pipes, self._threads, parent, self._wire),
                name="distbelief-forks",
                daemon=True,
            )
            server.start()
            theirs.close()
            self._forks = (server, mine)
        _keep_ends(host, 0, pipes)
        _keep_cells(host, 0)
        host.on_death = self._on_control
        host.writer = threading.Thread(target=host._write, name="distbelief-writer", daemon=True)
        host.writer.start()

    def describe(self) -> dict[str, Any]:
        """What a run's stats record: ``processes`` (actor -> the process it ran in: 0 is the
        driver's, "shared" all of them: the placement), ``worker_pids`` (replacements too),
        ``restarts_by_actor`` and ``wire`` (what crossed between processes: :data:`WIRE`); with
        the ``profile`` option, ``profile``: where each process's time went (:mod:`.profile`)."""
        homes = getattr(self, "_homes", {})
        wire = self._wire.sum(0).tolist() if self._wire is not None else [0] * len(WIRE)
        out = {
            "processes": {n: ("shared" if h == SHARED else h) for n, h in homes.items()},
            "worker_pids": [w.pid for w in self._workers] + self._replacements,
            "restarts_by_actor": dict(self.restarts),
            "wire": dict(zip(WIRE, wire, strict=True)),
        }
        if self._host.profile is not None:
            out["profile"] = self._host.profile.summary(homes, self._kinds)
        return out

    def hosted(self) -> list[str]:
        """Names of the actors the driver's process hosts now (none once it is shut down)."""
        return list(self._host.cells)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        host = self._host
        for worker in self._workers:
            if worker.exitcode is None:
                worker.kill()
        for pid in self._replacements:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        stuck = []
        if self._forks is not None:
            server, sock = self._forks
            sock.close()  # end of file: the fork server kills and reaps its workers and exits
            server.join(10.0)
            if server.exitcode is None:
                server.kill()
                server.join(5.0)
                stuck.append(server.pid)
            else:
                server.close()
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
        host.locks.clear()
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
            if cell.home == SHARED and index == 0 and cell.fault and cell.fault.kind == "exit":
                cell.fault = None  # a crash is a worker's (holding the lock): see _Host._die
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


def _serve_forks(
    host: _Host, socks: tuple, pipes: dict, threads: int, parent: int, wire: torch.Tensor
) -> None:
    """The fork server: forked from the driver with the workers, before the driver starts any
    thread, it holds every actor as it was before the first message (with the shared memory,
    locks and slot rings, which no process started otherwise could open) and forks a
    replacement worker when the driver asks (``ProcessesRuntime._fork_worker``). It reaps
    them, and at the end of file on its socket (the driver's shutdown) kills, reaps and
    exits; it dies with the driver."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock, driver_end = socks
    driver_end.close()  # (the driver's shutdown must be end of file here)
    for reader, writer in pipes.values():  # (a worker's death must be end of file)
        reader.close()
        writer.close()
    me, children = os.getpid(), set()
    while True:
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
        if os.getppid() != parent:
            break
        if not wait([sock], 0.5):
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        except OSError:
            break
        if not data:
            break
        index, routes = pickle.loads(data)
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                _run_replacement(host, index, fds, routes, threads, me, wire)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        sock.sendall(pid.to_bytes(8, "little"))
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _run_replacement(
    host: _Host, index: int, fds: list, routes: dict, threads: int, parent: int, wire: Any
) -> None:
    """A replacement worker ``index`` (forked by the fork server): its actors rebuilt, as they
    were before the first message, marked ``restarted`` and given their wiring; it talks to
    the driver's process alone, which hands its mail on."""
    host.rng = random.Random(None if host.seed is None else host.seed * 1_000_003 + index)
    host.wire = wire[index].numpy()
    host.channels = {}
    host.inbound = {Connection(fds[0], writable=False): 0}
    host.outbound = {0: Connection(fds[1], readable=False)}
    host.sent = [0] * len(host.sent)
    host.received = [0] * len(host.received)
    _keep_cells(host, index)
    host.ready.clear()
    for cell in host.cells.values():
        cell.mailbox.clear()
        cell.ready = False
        if cell.home == index:
            if cell.fault is not None and host.fired[cell.index]:
                cell.fault = None  # spent
            host.renew(cell)
    for name, home in host.route.items():
        if home not in (index, SHARED):
            host.route[name] = 0
    host.route.update(routes)
    host.inbox.clear()
    _worker_main(host, threads, parent)


__all__ = ["SHARD_UPDATES", "ProcRef", "ProcessesRuntime", "place"]  # SHARD_UPDATES: for the CLI
