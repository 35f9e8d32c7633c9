"""The Ray runtime: every actor of a run is a Ray actor, placed on the nodes of a Ray cluster.

One generic Ray actor class, :class:`_Host`, hosts any :class:`~.base.Actor` subclass: the
classes the in-process runtime hosts run here unchanged and never import Ray.

* **Control plane: Ray.** Ray starts each host on the node the placement plan names
  (:mod:`.placement`), reports its death, and kills it at the end.
* **Data plane: direct connections** (:mod:`.wire`): each host listens on its node's
  address and dials its peers over TCP, authenticated with a per-run secret that only the
  run's actors get (through Ray). A hop costs ~0.1 ms here against ~1 ms for a Ray actor
  call. One connection per sender and receiver keeps the protocol's per-sender FIFO; what an
  actor tells during one delivery goes out as one frame per receiver; tensors travel as numpy
  buffers, out of band (no ``torch.save`` round trip, no copy into a pickle stream).
* **Supervision** (Akka's DeathWatch, in the driver): every host is pinged once per health
  period; a dead host fails its ping. The driver respawns a dead actor whose class is
  ``restartable`` from its constructor arguments (on its node if alive, else another), gives
  every host its new address, replays what the driver had told it (its wiring), and then tells
  the actor the driver converses with :class:`~distbelief.runtime.base.ActorRestarted`. Any other
  death, or a handler that raises, ends the run with :class:`ActorFailed`.
* **Faults by plan** (:mod:`.faults`, the same plan as the in-process runtime's), keyed on
  an actor and a count it makes visible: ``faults=["kill:replica1.stage0@step=30"]`` makes
  that actor die at the first message whose ``step`` is 30 (dropping it): it reports the fault
  point and the driver ``ray.kill``\\ s it; ``exit:...`` makes the process exit on the spot
  instead (a crash). ``@update=N`` (shards) and ``@message=N`` (any actor) count updates
  applied and messages delivered.
* **Lifecycle.** Without ``address`` and with Ray not yet initialised, the runtime starts a
  private single-node Ray instance (:func:`local_ray`: token authentication on, every server on
  127.0.0.1, no dashboard, its own temp dir) and stops it at shutdown. With ``address`` it joins
  that cluster; when Ray is already initialised it uses it and leaves it running. Either way
  :meth:`RayRuntime.shutdown` kills every actor the run started and waits until they are dead,
  except on an instance :func:`local_ray` started around several runs: there the hosts of a
  run that ended normally let their actors go and stay idle for the next runs (:class:`_Pool`;
  ``reuse_hosts=False`` opts out).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ...errors import ActorFailed, ConfigError, RunStopped, RunTimeout
from .. import faults as fault_plans
from ..base import DRIVER, Actor, Failure, NamedRef, stop_signals_as_flag
from ..faults import Fault
from ..options import RayOptions, parse
from ..runqueue import handle
from ..supervise import Supervisor
from .placement import plan_placement, replace_node
from .watchdog import DONE
from .wire import Address, Endpoint, FlowControl, flow_control, listening_socket

LOCAL_SYSTEM_CONFIG = {
    # Ray lowers its workers' priority (nice 15) to keep the driver responsive; here the
    # workers are the training, and on a busy machine nice 15 starves them.
    "worker_niceness": 0,
}
"""Ray settings of a local instance started by :func:`local_ray`."""

_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class RayRef(NamedRef):
    """Address of an actor hosted by a RayRuntime: its name, which every host resolves to the
    actor's current address (so a ref stays valid when its actor is respawned elsewhere)."""

    __slots__ = ()


class _FaultPoint:
    """Host -> driver: the fault plan says this actor dies now; kill it."""

    def __init__(self, actor: str, fault: str) -> None:
        self.actor, self.fault = actor, fault


# ------------------------------------------------------------------------------ the hosts


class _HostContext:
    """What a hosted actor sees of the runtime (the :class:`~.base.Context` protocol)."""

    __slots__ = ("_outbox", "name", "self_ref")

    def __init__(self, name: str, outbox: dict[str, list]) -> None:
        self.name = name
        self.self_ref = RayRef(name)
        self._outbox = outbox

    def tell(self, ref: RayRef, message: Any) -> None:
        out = self._outbox.get(ref.name)
        if out is None:
            self._outbox[ref.name] = out = []
        out.append(message)


class _Host:
    """One Ray actor (an asyncio one: its event loop runs the data plane and the hosted actor's
    handlers, one at a time) hosting one distbelief actor at a time: :meth:`adopt` takes one,
    :meth:`release` lets it go, after which the process can adopt another (of a later run in
    the same Ray instance: see :class:`_Pool`) as a fresh process would."""

    def __init__(self) -> None:
        # What a fresh process has, to give each adopted actor the same (see _reset).
        self._seed = torch.initial_seed()
        self._threads = torch.get_num_threads()
        self._dtype = torch.get_default_dtype()
        self._deterministic = torch.are_deterministic_algorithms_enabled()
        self.name = ""
        self.fault: Fault | None = None
        self.dead = False
        self.actor: Actor | None = None
        self.endpoint: Endpoint | None = None
        self.sock: socket.socket | None = None
        self.driver_progress: asyncio.Event | None = None

    def _reset(self, threads: int) -> None:
        """Put back the process-wide state an earlier actor may have changed: torch's
        default RNG (at its start-up seed), Python's and numpy's global RNGs (fresh entropy,
        as at start-up), torch's thread count, default dtype, grad mode and determinism."""
        torch.manual_seed(self._seed)
        random.seed()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        # many actors share a node's cores
        torch.set_num_threads(threads if threads > 0 else self._threads)
        torch.set_default_dtype(self._dtype)
        torch.set_grad_enabled(True)
        torch.use_deterministic_algorithms(self._deterministic)

    def adopt(
        self,
        name: str,
        cls: type[Actor],
        args: tuple,
        kwargs: dict,
        fault: Fault | None,
        threads: int,
        secret: bytes,
        delay: float = 0.0,
        flow: FlowControl | None = None,
        restarted: bool = False,
    ) -> None:
        """Host a new actor: ``cls(*args, **kwargs)`` named ``name``, its data plane not yet
        listening (:meth:`start`)."""
        if self.actor is not None or self.dead:
            raise RuntimeError(f"this host already hosts {self.name!r}")
        self._reset(threads)
        self.name = name
        self.fault = fault
        self.delivered = 0  # messages given to the actor (what a message= fault counts)
        self.dead = False  # past its planned fault point, or its actor raised
        self.outbox: dict[str, list] = {}
        self.refs: dict[str, RayRef] = {}
        self.from_driver = 0
        self.driver_progress: asyncio.Event | None = None
        self.sock = listening_socket(ray.util.get_node_ip_address())
        self.endpoint = Endpoint(
            name, secret, self._deliver, self._undecodable, flow=flow, exempt=(DRIVER,)
        )
        self.actor = cls(*args, **kwargs)
        if restarted:  # before anything is delivered (see Actor.restarted)
            self.actor.restarted = True
        self.actor.bind(_HostContext(name, self.outbox))
        # A planned delay sleeps in the handler, on this host's event loop: nothing else of
        # this actor runs meanwhile, as on a slow machine.
        self.handlers = fault_plans.slowed(self.actor.bound_handlers(), delay)

    async def release(self) -> bool:
        """Let the actor go: close its data plane, drop it. Returns whether this host can
        adopt another: its actor never raised nor reached its planned fault point."""
        clean = self.actor is not None and not self.dead
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.actor = self.handlers = None  # type: ignore[assignment]
        self.outbox, self.refs, self.fault = {}, {}, None
        await asyncio.sleep(0)  # let closed connections report it before the actor goes
        gc.collect()
        self.dead = self.dead or not clean
        return clean

    async def start(self, addresses: dict[str, Address]) -> tuple[str, int, Address]:
        """Listen, learn the peers' addresses; returns node id, pid and listening address."""
        self.driver_progress = asyncio.Event()
        await self.endpoint.listen(self.sock)
        self.endpoint.set_addresses(addresses)
        host, port = self.sock.getsockname()[:2]
        return ray.get_runtime_context().get_node_id(), os.getpid(), (host, port)

    async def update(self, addresses: dict[str, Address]) -> None:
        """Learn new addresses (of respawned actors)."""
        self.endpoint.set_addresses(addresses)

    async def barrier(self, count: int) -> None:
        """Return once ``count`` messages from the driver have been handled."""
        while self.from_driver < count:
            self.driver_progress.clear()
            await self.driver_progress.wait()

    async def ping(self) -> None:
        """Answered while alive: the driver's death watch."""

    async def flow_stats(self) -> dict[str, Any]:
        """What flow control did in this host (see ``wire.Endpoint.flow_stats``)."""
        return self.endpoint.flow_stats()

    def _deliver(self, sender: str, batch: list) -> None:
        """Handle a batch of messages from one sender, then send what they told."""
        if sender == DRIVER:
            self.from_driver += len(batch)
            self.driver_progress.set()
        if self.dead:
            return
        ref = self.refs.get(sender)
        if ref is None:
            ref = self.refs[sender] = RayRef(sender)
        message = None
        try:
            for message in batch:
                if self.fault is not None:
                    self.delivered += 1
                    if self.fault.due(message, self.delivered, self.actor):
                        self._die()
                        return
                handle(self, message, ref)
            outbox = self.outbox
            if outbox:
                send = self.endpoint.send
                for name, messages in outbox.items():
                    send(name, messages)
                outbox.clear()
        except ActorFailed as exc:  # reported to the driver, which ends the run
            self._fail(exc.message, exc.cause)
        except Exception as exc:  # noqa: BLE001 - sending what it told failed: reported too
            self._fail(type(message).__name__ if message is not None else "a message", exc)

    def _undecodable(self, sender: str, exc: BaseException) -> None:
        self._fail(f"a frame from {sender!r} that does not unpickle", exc)

    def _fail(self, what: str, exc: BaseException) -> None:
        self.dead = True
        self.outbox.clear()
        failure = Failure(self.name, what, exc, traceback.format_exc())
        self.endpoint.send(DRIVER, [failure])

    def _die(self) -> None:
        self.dead = True
        self.outbox.clear()
        if self.fault.kind == "exit":
            os._exit(1)  # a crash: the process is gone, nothing more is sent
        self.endpoint.send(DRIVER, [_FaultPoint(self.name, str(self.fault))])


_RemoteHost = ray.remote(_Host)


class _DriverEndpoint:
    """The driver's end of the data plane: an event loop in a thread of its own; what arrives
    goes into a queue the driver reads."""

    def __init__(self, secret: bytes) -> None:
        self.mail: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.loop = asyncio.new_event_loop()
        self.endpoint = Endpoint(DRIVER, secret, self._deliver)
        self.sock = listening_socket(ray.util.get_node_ip_address())
        self.address: Address = tuple(self.sock.getsockname()[:2])  # type: ignore[assignment]
        self.thread = threading.Thread(target=self._run, name="distbelief-driver", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.endpoint.listen(self.sock), self.loop).result(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _deliver(self, sender: str, batch: list) -> None:
        for message in batch:
            self.mail.put((sender, message))

    def set_addresses(self, addresses: dict[str, Address]) -> None:
        """Learn peers' addresses (applied before any later :meth:`send`)."""
        self.loop.call_soon_threadsafe(self.endpoint.set_addresses, addresses)

    def send(self, name: str, message: Any) -> None:
        """Send one message to ``name``, after everything sent before."""
        self.loop.call_soon_threadsafe(self.endpoint.send, name, [message])

    def close(self) -> None:
        """Close every connection and stop the thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.endpoint.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


# ------------------------------------------------------------------------------ idle hosts

IDLE_PER_NODE = 32
"""Most idle hosts kept per node (the excess is killed)."""


def _instance() -> str:
    """What tells this Ray instance from a later one (a new one may reuse the address)."""
    node = getattr(ray._private.worker, "_global_node", None)
    session = getattr(node, "session_name", None)
    return f"{ray.get_runtime_context().gcs_address}/{session}"


@dataclasses.dataclass
class _Idle:
    """A host whose actor was released: it can adopt the next run's."""

    handle: Any
    pid: int


class _Pool:
    """The idle hosts of the Ray instance that :func:`local_ray` started in this process, by
    node: a run takes its hosts from here before it starts processes, and gives back the clean
    ones when it ends normally. Open only inside ``local_ray`` (which kills them before it stops
    Ray): on a cluster joined by address a run leaves nothing behind."""

    def __init__(self) -> None:
        self.instance: str | None = None
        self.idle: dict[str, list[_Idle]] = {}

    def open(self) -> None:
        """Pool hosts of the current Ray instance from now on."""
        self.instance, self.idle = _instance(), {}

    def active(self) -> bool:
        """Whether runs pool their hosts: the instance ``local_ray`` started is the current
        one (if it is gone, its idle hosts went with it and are forgotten)."""
        if self.instance is None:
            return False
        if not ray.is_initialized() or _instance() != self.instance:
            self.instance, self.idle = None, {}
            return False
        return True

    def take(self, node: str) -> _Idle | None:
        """An idle host on ``node``, if any (it is no longer idle)."""
        hosts = self.idle.get(node)
        return hosts.pop() if hosts else None

    def give(self, node: str, host: _Idle) -> bool:
        """Keep ``host`` idle on ``node``; False (the caller kills it) if the node has enough."""
        hosts = self.idle.setdefault(node, [])
        if len(hosts) >= IDLE_PER_NODE:
            return False
        hosts.append(host)
        return True

    def close(self) -> None:
        """Kill every idle host, wait until they are dead, and pool nothing more."""
        hosts = [h.handle for hs in self.idle.values() for h in hs]
        self.instance, self.idle = None, {}
        _kill(hosts)


_pool = _Pool()


def idle_host_pids() -> list[int]:
    """Process ids of the idle hosts kept for later runs (see :class:`_Pool`)."""
    return [h.pid for hs in _pool.idle.values() for h in hs] if _pool.active() else []


def _kill(handles: list[Any], timeout: float = 30.0) -> None:
    """Kill Ray actors and wait (up to ``timeout``) until Ray reports each of them dead."""
    for h in handles:
        with contextlib.suppress(Exception):
            ray.kill(h, no_restart=True)
    probes = []
    for h in handles:
        with contextlib.suppress(Exception):
            probes.append(h.ping.remote())
    if probes:
        ray.wait(probes, num_returns=len(probes), timeout=timeout)


# ------------------------------------------------------------------------------ local Ray


def _refresh_auth() -> None:
    """Make this process re-read RAY_AUTH_* (Ray caches them at import)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Let ``_node_ip_address="127.0.0.1"`` stand: on Linux Ray swaps a loopback node address
    for the machine's external one unless clusters are disabled, which is what we want here."""
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, **init_options: Any) -> Iterator[None]:
    """Run the block with a fresh single-node Ray instance of this process, then stop it.

    Token authentication is on (``RAY_AUTH_MODE=token``; a random token unless the environment
    provides one), every server listens on 127.0.0.1, no dashboard, and Ray's files live in a
    temp dir of their own that is removed afterwards (nothing is left in /tmp/ray), even when
    this process is killed (a watchdog process then stops the instance: :mod:`.watchdog`).
    The process's RAY_AUTH_* environment is restored on exit.
    """
    if ray.is_initialized():
        raise RuntimeError("local_ray: Ray is already initialised in this process")
    saved = {k: os.environ.get(k) for k in _AUTH_ENV}
    temp_dir = tempfile.mkdtemp(prefix="distbelief-ray-")
    watchdog = _start_watchdog(temp_dir)
    try:
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        _refresh_auth()
        options: dict[str, Any] = {
            "address": "local",
            "include_dashboard": False,
            "num_cpus": num_cpus or os.cpu_count(),
            "_node_ip_address": "127.0.0.1",
            "_temp_dir": temp_dir,
            "_system_config": dict(LOCAL_SYSTEM_CONFIG),
            "logging_level": logging.WARNING,
        }
        options.update(init_options)
        with _loopback_node_ip(), _sigterm_kept():
            ray.init(**options)
        _pool.open()
        yield
    finally:
        if _pool.active():
            _pool.close()  # the idle hosts of this instance's runs
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_auth()
        shutil.rmtree(temp_dir, ignore_errors=True)
        _stop_watchdog(watchdog)


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """``ray.init`` replaces the driver's SIGTERM handler twice: with a Python one that exits
    and with a C-level one that dumps a stack and aborts. Put back the one this process had,
    so that SIGTERM stops a run as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


def _start_watchdog(temp_dir: str) -> subprocess.Popen:
    """Start the process that removes this Ray instance (its processes and ``temp_dir``) if
    this process dies without stopping it (see :mod:`.watchdog`). Its own session, so a
    Ctrl-C to the terminal's process group does not reach it."""
    script = os.path.join(os.path.dirname(__file__), "watchdog.py")
    return subprocess.Popen(
        [sys.executable, "-I", "-S", script, temp_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop_watchdog(watchdog: subprocess.Popen) -> None:
    """Tell the watchdog this process cleaned up after itself, and reap it."""
    try:
        watchdog.communicate(DONE, timeout=10.0)
    except (OSError, subprocess.TimeoutExpired):  # pragma: no cover - it died or hangs
        watchdog.kill()
        watchdog.wait()


# ------------------------------------------------------------------------------ the runtime


@dataclasses.dataclass
class _Spec:
    """How to (re)build one actor, and where its current incarnation is."""

    cls: type[Actor]
    args: tuple
    kwargs: dict
    fault: Fault | None
    delay: float = 0.0
    """Seconds added to each message it handles (a planned delay, :mod:`.faults`)."""
    handle: Any = None
    node: str | None = None
    pid: int | None = None
    address: Address | None = None
    sent: int = 0
    """Messages the driver sent to the current incarnation."""
    adopted: Any = None
    """The Ray call by which the current host adopts the actor (see :meth:`_Host.adopt`)."""
    pooled: bool = False
    """Whether the current host was an idle one of an earlier run (:class:`_Pool`)."""
    restarted: bool = False


class RayRuntime:
    """Hosts every actor as a Ray actor; the driver (this object) supervises them.

    Options (``runtime_options`` of :func:`distbelief.train`; :class:`~..options.RayOptions`):

    * ``address``: join the Ray cluster at this address (``ray start --head`` printed it);
      default: use Ray if this process already initialised it, else start a local instance.
    * ``placement``: ``"spread"`` (default: stages of a replica on distinct nodes, shards
      spread), ``"pack"`` (all on the driver's node), or ``{actor name: node id}`` to pin some.
    * ``faults``: a fault plan (:mod:`.faults`), e.g. ``["kill:replica1.stage0@step=30"]``,
      or the older ``{actor name: step}`` / ``{actor name: (step, "ray.kill" | "exit")}``.
    * ``max_restarts``: restarts allowed per actor (default 5).
    * ``health_period_s``: how often the driver checks that actors are alive (default 0.5).
    * ``startup_timeout_s``: longest wait for actors to start (default 600).
    * ``threads_per_actor``: torch threads per actor process (default 1; 0 leaves Ray's).
    * ``num_cpus``: CPUs of a local instance (default: the machine's).
    * ``flow_window_bytes``: an actor that has more than this many bytes buffered towards one
      peer waits, handling nothing more, until that peer takes them (default 1 MiB; 0 turns
      flow control off). See ``wire`` (flow control) for how cycles cannot deadlock.
    * ``flow_timeout_s``: longest such wait before one more message is handled anyway,
      counted and logged (default 5).
    * ``reuse_hosts``: inside a :func:`local_ray` block, take the actor processes that earlier
      runs left idle, and leave this run's idle for later ones when it ends normally (a failed
      run kills them all); default True. False: start fresh processes and leave none. (Never
      on a cluster joined by address, nor on the instance a run starts for itself.)
    """

    name = "ray"
    single_threaded = False

    def __init__(self, seed: int | None = None, **options: Any) -> None:
        self.options: RayOptions = parse("ray", options)  # type: ignore[assignment]
        opts = self.options
        self._flow = flow_control(opts.flow_window_bytes, opts.flow_timeout_s)
        self.seed = seed  # Ray interleaves as it will: only the in-process runtime is seeded
        self._placement = opts.placement
        self._plan = opts.faults
        self._faults = fault_plans.kills(self._plan)
        self._delays = fault_plans.delays(self._plan)
        self._supervisor = Supervisor(opts.max_restarts)
        self._period = opts.health_period_s
        self._startup_timeout = opts.startup_timeout_s
        self._threads = opts.threads_per_actor
        address, num_cpus = opts.address, opts.num_cpus
        self._secret = secrets.token_bytes(32)
        self._stack = contextlib.ExitStack()
        self._specs: dict[str, _Spec] = {}
        self._pending: list[str] = []
        self._pings: dict[Any, str] = {}
        self._next_watch = 0.0
        self._closed = False
        self._own_instance = False  # a local_ray of its own: nothing to keep hosts for
        self._failed = False  # the run ended in an error of the runtime's: kill every host
        self.restarts = self._supervisor.restarts
        """Restarts per actor name."""
        self.pids: dict[str, list[int]] = {}
        """Every process id each actor ran in (several after restarts)."""
        try:
            if not ray.is_initialized():
                if address is None:
                    self._stack.enter_context(local_ray(num_cpus=num_cpus))
                    self._own_instance = True
                else:
                    check_address(address)  # ray.init retries a dead address for minutes
                    with _sigterm_kept():
                        ray.init(address=address, logging_level=logging.WARNING)
                    self._stack.callback(ray.shutdown)  # disconnects; the cluster stays up
            elif not _same_address(address, ray.get_runtime_context().gcs_address):
                raise ConfigError(
                    f"runtime_options: address {address!r}, but this process is connected to "
                    f"Ray at {ray.get_runtime_context().gcs_address}; one process, one cluster"
                )
            self._driver = _DriverEndpoint(self._secret)
            self._stack.callback(self._driver.close)
        except BaseException:
            self._stack.close()
            raise

    # -------------------------------------------------------------- the Runtime protocol

    def spawn(self, name: str, cls: type[Actor], *args: Any, **kwargs: Any) -> RayRef:
        if name in self._specs or name == DRIVER:
            raise ValueError(f"an actor named {name!r} already exists")
        fault = self._faults.pop(name, None)
        if fault is not None:
            fault_plans.check_targets([fault], {name: cls})
        delay = fault_plans.delay_of(self._delays, name)
        self._specs[name] = _Spec(cls, args, kwargs, fault, delay)
        self._pending.append(name)  # created together at the first send: placement sees all
        return RayRef(name)

    def tell(self, ref: RayRef, message: Any) -> None:
        with self._failing():
            self._start_pending(time.monotonic() + self._startup_timeout)
            self._supervisor.wiring(ref.name, message)
            self._send(ref.name, message)

    def converse(self, ref: RayRef, message: Any, *, timeout: float) -> Iterator[Any]:
        deadline = time.monotonic() + timeout
        # A stop during start-up counts after it.
        with self._failing(), stop_signals_as_flag() as interrupted:
            self._start_pending(min(deadline, time.monotonic() + self._startup_timeout))
            self._supervisor.partner = ref
            self._barrier(list(self._specs), deadline)  # the wiring is in place before any flow
            interrupted.raise_if_set()
            self._send(ref.name, message)
            while True:
                interrupted.raise_if_set()  # the caller's clean-up (shutdown) runs from here
                mail = self._poll(deadline)
                interrupted.raise_if_set()  # a stop while it waited: not lost with a reply
                yield from mail

    def shutdown(self) -> None:
        """Kill every host of the run and wait until they are dead; after a run that ended
        normally (finished, or stopped by a stop signal) with pooling on, the hosts that
        release their actor cleanly are kept idle for later runs instead (:class:`_Pool`)."""
        if self._closed:
            return
        self._closed = True
        try:
            if ray.is_initialized():
                specs = [s for s in self._specs.values() if s.handle is not None]
                if not self._failed and self._reuse():
                    specs = self._release(specs)
                _kill([s.handle for s in specs])  # none outlives the run
        finally:
            self._stack.close()

    def _reuse(self) -> bool:
        """Whether this run takes and leaves idle hosts (see ``reuse_hosts``)."""
        return self.options.reuse_hosts and not self._own_instance and _pool.active()

    def _release(self, specs: list[_Spec], timeout: float = 10.0) -> list[_Spec]:
        """Have each host let its actor go; keep the clean ones idle. Returns the others."""
        self._pings.clear()  # the watch is over
        calls = {s.handle.release.remote(): s for s in specs}
        done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        kept = set()
        for ref in done:
            spec = calls[ref]
            try:
                clean = ray.get(ref) is True
            except Exception:  # noqa: BLE001 - a host that died or failed is killed
                clean = False
            if clean and _pool.give(spec.node, _Idle(spec.handle, spec.pid)):
                kept.add(id(spec))
        return [s for s in specs if id(s) not in kept]

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Note a run that ends in an error here (an actor failed or died for good, a
        timeout): its hosts are all killed. A stop signal between two messages is no error."""
        try:
            yield
        except (RunStopped, GeneratorExit):
            raise
        except BaseException:
            self._failed = True
            raise

    # -------------------------------------------------------------- introspection

    @property
    def nodes(self) -> dict[str, str]:
        """Actor name -> id of the Ray node it runs on (its latest incarnation)."""
        return {name: s.node for name, s in self._specs.items() if s.node is not None}

    def describe(self) -> dict[str, Any]:
        """What a run's stats record of the runtime: ``nodes`` (actor -> node id), ``pids``
        (actor -> every process id it ran in), ``restarts_by_actor`` and ``flow`` (see
        :meth:`flow_stats`)."""
        return {
            "nodes": self.nodes,
            "pids": {name: list(p) for name, p in self.pids.items()},
            "restarts_by_actor": dict(self.restarts),
            "flow": self.flow_stats(),
        }

    def flow_stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """What flow control did so far, per live actor (``wire.Endpoint.flow_stats``:
        ``waits``, ``waited_s``, ``timeouts``, ``peak_buffered`` bytes towards one peer), and
        over all of them: ``peak_buffered`` (the largest), ``waits`` and ``timeouts`` (sums).
        Actors that do not answer within ``timeout`` are left out."""
        calls = {s.handle.flow_stats.remote(): n for n, s in self._specs.items() if s.handle}
        done = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)[0] if calls else []
        by_actor = {}
        for ref in done:
            with contextlib.suppress(Exception):
                by_actor[calls[ref]] = ray.get(ref)
        stats = by_actor.values()
        return {
            "window_bytes": self._flow.window if self._flow else 0,
            "peak_buffered": max((s["peak_buffered"] for s in stats), default=0),
            "waits": sum(s["waits"] for s in stats),
            "timeouts": sum(s["timeouts"] for s in stats),
            "by_actor": by_actor,
        }

    # -------------------------------------------------------------- internals

    def _live_nodes(self) -> list[str]:
        """Node ids of live nodes, the driver's first, the rest in a stable order."""
        me = ray.get_runtime_context().get_node_id()
        alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        return [me, *(n for n in alive if n != me)] if me in alive else alive

    def _create(self, name: str, node: str, restarted: bool = False, fresh: bool = False) -> None:
        """Give the actor a host on ``node``: an idle one if pooling is on and there is one
        (unless ``fresh``), else a new process. :meth:`_start` waits for it."""
        spec = self._specs[name]
        spec.node, spec.sent, spec.restarted = node, 0, restarted
        idle = None if fresh or not self._reuse() else _pool.take(node)
        spec.pooled = idle is not None
        if idle is not None:
            spec.handle = idle.handle
        else:
            spec.handle = _RemoteHost.options(
                num_cpus=0,
                max_restarts=0,
                max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote()
        # An async actor may start calls out of order: _start waits for this before start.
        spec.adopted = spec.handle.adopt.remote(
            name, spec.cls, spec.args, spec.kwargs, spec.fault, self._threads, self._secret,
            spec.delay, self._flow, restarted,
        )  # fmt: skip

    def _addresses(self) -> dict[str, Address]:
        out = {n: s.address for n, s in self._specs.items() if s.address is not None}
        out[DRIVER] = self._driver.address
        return out

    def _start_pending(self, deadline: float) -> None:
        """Create the actors spawned since the last send, start their data plane, and tell
        everyone where everyone listens."""
        if not self._pending:
            return
        if self._faults or self._delays:  # for actors never spawned: a plan that cannot fire
            planned = (*self._faults.values(), *self._delays)
            fault_plans.check_targets(planned, dict.fromkeys(self._specs))
        names, self._pending = self._pending, []
        placed = {n: s.node for n, s in self._specs.items() if s.node is not None}
        try:
            plan = plan_placement(names, self._live_nodes(), self._placement, taken=placed)
        except ValueError as exc:
            raise ConfigError(f"runtime_options: {exc}") from None
        for name in names:
            self._create(name, plan[name])
        self._start(names, deadline)
        new = {n: self._specs[n].address for n in names}
        self._update(list(self._specs), new, deadline)  # new hosts learn each other too

    def _adopt(self, names: list[str], deadline: float) -> None:
        """Wait until the new hosts have built their actors; an idle host that died
        meanwhile is replaced by a new process, once."""
        for attempt in (0, 1):
            calls = {self._specs[n].adopted: n for n in names}
            remaining = max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(list(calls), num_returns=len(calls), timeout=remaining)
            if pending:
                late = ", ".join(sorted({calls[r] for r in pending}))
                raise RunTimeout(f"actors did not start within the timeout: {late}")
            retry = []
            for ref in done:
                name, spec = calls[ref], self._specs[calls[ref]]
                try:
                    ray.get(ref)
                except RayActorError as exc:
                    if not (spec.pooled and attempt == 0):
                        raise ActorFailed(name, "its constructor", exc) from None
                    retry.append(name)
                except Exception as exc:  # noqa: BLE001 - the actor's constructor raised
                    raise ActorFailed(name, "its constructor", exc) from None
            for name in retry:
                spec = self._specs[name]
                self._create(name, spec.node, spec.restarted, fresh=True)  # type: ignore[arg-type]
            names = retry
            if not names:
                return

    def _start(self, names: list[str], deadline: float) -> None:
        """Start the data plane of new hosts (once they have built their actors)."""
        self._adopt(names, deadline)
        addresses = self._addresses()
        calls = {self._specs[n].handle.start.remote(addresses): n for n in names}
        for name, result in self._wait(calls, deadline, "start").items():
            if isinstance(result, Exception):
                raise ActorFailed(name, "its constructor", result) from None
            spec = self._specs[name]
            spec.node, spec.pid, spec.address = result[0], result[1], tuple(result[2])
            self.pids.setdefault(name, []).append(spec.pid)
        self._driver.set_addresses({n: self._specs[n].address for n in names})

    def _update(self, names: list[str], addresses: dict[str, Address], deadline: float) -> None:
        """Tell live hosts new addresses; one that died meanwhile is left to the watch."""
        calls = {self._specs[n].handle.update.remote(addresses): n for n in names}
        self._wait(calls, deadline, "take new addresses")

    def _barrier(self, names: list[str], deadline: float) -> None:
        """Wait until each host has handled everything the driver sent it."""
        calls = {self._specs[n].handle.barrier.remote(self._specs[n].sent): n for n in names}
        self._wait(calls, deadline, "handle the driver's messages")

    def _wait(self, calls: dict[Any, str], deadline: float, what: str) -> dict[str, Any]:
        """Results (or errors) of Ray calls, by actor name; a timeout names the late ones."""
        if not calls:
            return {}
        remaining = max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(list(calls), num_returns=len(calls), timeout=remaining)
        if pending:
            late = ", ".join(sorted({calls[r] for r in pending}))
            raise RunTimeout(f"actors did not {what} within the timeout: {late}")
        out = {}
        for r in done:
            try:
                out[calls[r]] = ray.get(r)
            except RayActorError as exc:
                out[calls[r]] = exc
        return out

    def _send(self, name: str, message: Any) -> None:
        self._specs[name].sent += 1
        self._driver.send(name, message)

    def _watch(self) -> None:
        """Once per health period, ping every actor that has no ping outstanding: a dead actor
        fails its ping (a live one answers, and is asked again next period)."""
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + self._period
        watched = set(self._pings.values())
        for name, spec in self._specs.items():
            if name not in watched and spec.handle is not None:
                self._pings[spec.handle.ping.remote()] = name

    def _poll(self, deadline: float) -> list[Any]:
        """Wait up to one health period for the driver's mail; check the watch; handle both."""
        self._watch()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RunTimeout("the run did not finish within its timeout")
        wait = min(remaining, max(0.0, self._next_watch - time.monotonic()))
        mail = self._driver.mail
        out: list[Any] = []
        try:
            out.extend(self._driver_mail(*mail.get(timeout=wait)))
            while True:
                out.extend(self._driver_mail(*mail.get_nowait()))
        except queue.Empty:
            pass
        if self._pings:
            ready, _ = ray.wait(list(self._pings), num_returns=len(self._pings), timeout=0)
            for r in ready:
                name = self._pings.pop(r)
                try:
                    ray.get(r)
                except ActorUnavailableError:
                    pass  # unreachable for now (network): ask again next period
                except (ActorDiedError, RayActorError) as exc:
                    self._restart(name, exc, deadline)
        return out

    def _driver_mail(self, sender: str, message: Any) -> list[Any]:
        if isinstance(message, Failure):
            error = message.error
            with contextlib.suppress(Exception):
                error.add_note(f"in actor {message.actor!r}:\n{message.trace}")
            raise ActorFailed(message.actor, message.message, error)
        if isinstance(message, _FaultPoint):
            ray.kill(self._specs[message.actor].handle, no_restart=True)
            return []
        return [message]

    def _restart(self, name: str, cause: Exception, deadline: float) -> None:
        """Respawn a dead actor from its constructor arguments and tell the run it did."""
        spec = self._specs[name]
        limit = min(deadline, time.monotonic() + self._startup_timeout)

        def refuse(why: str, count: int) -> ActorFailed:
            died = "its process died" if why == "not restartable" else f"died {count} times"
            return ActorFailed(name, f"(none: {died})", cause)

        def respawn() -> None:
            with contextlib.suppress(Exception):
                ray.kill(spec.handle, no_restart=True)
            placed = {n: s.node for n, s in self._specs.items() if s.node is not None}
            spec.fault = None  # a planned fault happens once
            self._create(name, replace_node(name, self._live_nodes(), placed, spec.node), True)
            self._start([name], limit)
            self._update([n for n in self._specs if n != name], {name: spec.address}, limit)

        self._supervisor.restart(
            name,
            RayRef(name),
            restartable=getattr(spec.cls, "restartable", False),
            refuse=refuse,
            respawn=respawn,
            send=lambda ref, message: self._send(ref.name, message),
            settle=lambda: self._barrier([name], limit),
        )


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse, within seconds, a cluster address that is malformed or where nothing answers:
    ``ray.init`` would print a traceback for the first, and keep retrying the second for
    minutes. ``"auto"`` (the cluster this machine started) is left to Ray."""
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"runtime_options: address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, "
            "as `ray start --head` prints it) or 'auto'"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"runtime_options: address {address!r}: no Ray cluster answers there ({reason})"
        ) from None


def _same_address(wanted: str | None, connected: str) -> bool:
    """Whether ``wanted`` (None and "auto" want whatever is connected) names ``connected``."""
    if wanted in (None, "auto") or wanted == connected:
        return True
    try:
        (host, _, port), (chost, _, cport) = wanted.rpartition(":"), connected.rpartition(":")
        return port == cport and socket.gethostbyname(host) == socket.gethostbyname(chost)
    except OSError:
        return False


__all__ = ["RayRef", "RayRuntime", "idle_host_pids", "local_ray"]
