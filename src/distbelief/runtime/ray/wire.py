"""The Ray runtime's data plane: authenticated TCP connections between the actors of one run.

Ray starts, places, watches and stops the actors; their messages travel here, because an actor
call through Ray cost ~1 ms per hop on a loaded 2-core machine and one of these ~0.1 ms.

* **One connection per (sender, receiver)**, so a sender's messages arrive in the order sent
  (the runtime protocol's per-sender FIFO). The receiver knows the sender from the handshake.
* **Handshake**: mutual HMAC-SHA256 challenge-response over a per-run secret that only the
  run's actors get (through Ray). A peer without it is dropped before anything is unpickled,
  and a frame before authentication may not exceed 4 KiB.
* **Frames** carry a pickled list of messages (protocol 5). Tensors are pickled as numpy
  arrays, out of band: the sender writes their memory straight to the socket, the receiver
  reads each frame into one buffer of its own and rebuilds tensors over it (no further copy;
  the tensors are writable and owned by the receiver).

* **Flow control** (:class:`FlowControl`): a receiver that handles its messages slowly stops
  reading its sockets; what its senders write then piles up in their transports' buffers, and
  without a bound a sender's memory grows as long as it goes on. So a sender whose buffer
  towards some peer passes ``window`` bytes *waits*: it stops reading (hence handling) what
  its own peers send it until the buffer drains, and the wait propagates back to whoever
  produces the traffic (the data shards, which send a step only when the previous one is
  done). What breaks the cycles that could deadlock: one frame alone never makes its sender
  wait, however big (so a reply never waits for its requester, which sends no second request
  before reading it); a waiting endpoint still reads from the peer it waits for (a stage
  waiting on a shard still takes that shard's replies) and from the driver. Any other cycle is
  broken by a timeout: after ``timeout_s`` of waiting the endpoint handles one more frame and
  waits again, counted and logged, never a silent deadlock.

Nothing here imports Ray; an :class:`Endpoint` lives in one asyncio event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

MAGIC = b"DBRAY\x00\x01\x00"
_LEN = struct.Struct("<Q")
_HANDSHAKE_MAX = 4096
_SCRATCH = 1 << 16  # frames up to this size are read with their neighbours, in one recv
_NONCE = 32

Address = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class FlowControl:
    """How much one sender may have buffered towards one receiver before it waits."""

    window: int = 1 << 20
    """Bytes buffered towards one peer (written, not yet taken by the kernel) above which,
    not counting the last frame written, the sender waits; it goes on once they fall to a
    quarter of it. 1 MiB: a few pushes of a mid-sized model, far below what a slow shard would
    pile up. (The last frame is not counted so that one frame, however big, never waits.)"""
    timeout_s: float = 5.0
    """Longest wait before one more frame is handled anyway (see the module doc)."""


def flow_control(window_bytes: int, timeout_s: float = FlowControl.timeout_s) -> FlowControl | None:
    """The flow control of a run's ``flow_window_bytes`` and ``flow_timeout_s`` options: none
    at all for a window of 0 (an endpoint without it never waits, whatever it buffers)."""
    return FlowControl(window_bytes, float(timeout_s)) if window_bytes else None


Deliver = Callable[[str, list], None]
"""Called as ``deliver(sender, messages)`` on the loop thread for every frame received."""

# ------------------------------------------------------------------------------ boxing


def _tensor_from_buffer(buffer: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not len(buffer):  # torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=dtype)
    return flat if len(shape) == 1 else flat.view(shape)


class _TensorBox:
    """Pickles a CPU tensor as its raw memory, out of band (sent as is, no copy); unpickles to
    a tensor over the received buffer."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple:
        t = self.tensor.detach()
        try:
            # numpy() shares the memory (and refuses what has no plain layout, e.g. bfloat16).
            data = pickle.PickleBuffer(t.contiguous().numpy())
        except (TypeError, RuntimeError):
            return _identity, (self.tensor,)  # torch pickles it (a copy)
        return _tensor_from_buffer, (data, t.dtype, tuple(t.shape))


def _identity(x: Any) -> Any:
    return x


_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


class _MessageBox:
    """Pickles a dataclass message field by field, its tensors boxed."""

    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message

    def __reduce__(self) -> tuple:
        m = self.message
        cls = type(m)
        return _rebuild, (cls, tuple(box(getattr(m, f)) for f in _fields(cls)))


def _rebuild(cls: type, values: tuple) -> Any:
    obj = object.__new__(cls)
    for name, value in zip(_fields(cls), values):
        object.__setattr__(obj, name, value)  # frozen dataclasses: past the frozen guard
    return obj


def box(value: Any) -> Any:
    """Wrap the tensors in ``value`` (also inside dicts, lists, tuples and dataclasses) so that
    pickling sends their memory out of band."""
    if isinstance(value, torch.Tensor):
        return _TensorBox(value) if value.device.type == "cpu" else value
    t = type(value)
    if t is dict:
        return {k: box(v) for k, v in value.items()}
    if t is list or t is tuple:
        return t(box(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _MessageBox(value)
    return value


def encode(messages: list) -> list[Any]:
    """The parts of one frame: length prefix, header and pickle stream, then the out-of-band
    buffers (views of the tensors' memory)."""
    buffers: list[pickle.PickleBuffer] = []
    boxed = [box(m) for m in messages]
    try:
        data = pickle.dumps(boxed, protocol=5, buffer_callback=buffers.append)
    except (pickle.PicklingError, AttributeError, TypeError):
        from ray import cloudpickle  # lambdas and local classes in a message

        buffers.clear()
        data = cloudpickle.dumps(boxed, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    header = struct.pack(f"<I{len(views) + 1}Q", len(views), len(data), *(v.nbytes for v in views))
    size = len(header) + len(data) + sum(v.nbytes for v in views)
    return [_LEN.pack(size) + header + data, *views]  # the small parts joined: fewer sends


def decode(frame: bytearray) -> list:
    """The messages of one frame; their tensors are views of ``frame``."""
    view = memoryview(frame)
    (n,) = struct.unpack_from("<I", view)
    lengths = struct.unpack_from(f"<{n + 1}Q", view, 4)
    offset = 4 + 8 * (n + 1)
    data = view[offset : offset + lengths[0]]
    offset += lengths[0]
    buffers = []
    for length in lengths[1:]:
        buffers.append(view[offset : offset + length])
        offset += length
    return pickle.loads(data, buffers=buffers)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"\x00".join(parts), hashlib.sha256).digest()


# ------------------------------------------------------------------------------ connections


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection, either end.

    Reads into a scratch buffer, so one ``recv`` brings a small frame with its length prefix
    (or several frames); a frame too big for it is read into a buffer of its own, exactly.
    """

    def __init__(self, endpoint: Endpoint, peer: str | None) -> None:
        self.endpoint = endpoint
        self.peer = peer  # known up front when we dial; learnt from the handshake when accepted
        self.outgoing = peer is not None
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self.dropped = False
        self.nonce = os.urandom(_NONCE)
        self.queue: list[list[Any]] = []  # frames waiting for the handshake (dialling side)
        self.scratch = bytearray(_SCRATCH)
        self.start = self.end = 0  # unread bytes of scratch
        self.big: bytearray | None = None  # a frame larger than scratch, being read
        self.big_filled = 0
        self.held = False  # reading paused by flow control
        self.writing_paused = False  # the transport's buffer is above the window
        self.over = False  # ... by more than the last frame: the sender waits (see write)
        self.queued_bytes = 0  # frames waiting for the handshake
        self.queued_last = 0  # the last of them

    # asyncio.BufferedProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flow = self.endpoint.flow
        if flow is not None:
            transport.set_write_buffer_limits(high=flow.window, low=flow.window // 4)  # type: ignore[attr-defined]
        if self.outgoing:
            me = self.endpoint.name.encode()
            self._write_raw(MAGIC + self.nonce + me + b"\x00" + self.peer.encode())

    def pause_writing(self) -> None:
        self.writing_paused = True  # whether to wait is decided in write, which caused it

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.over:
            self.over = False
            self.endpoint._congestion(self)

    @property
    def congested(self) -> bool:
        """Whether a sender writing here should wait (see :class:`FlowControl`)."""
        flow = self.endpoint.flow
        if self.over:
            return True
        return flow is not None and self.queued_bytes - self.queued_last > flow.window

    def hold(self) -> None:
        """Stop reading (flow control): frames stay in the kernel's buffers, then the peer's."""
        if not self.held:
            self.held = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def release(self) -> None:
        """Read again; frames already read but held back are handled first (next loop turn:
        never inside another frame's delivery)."""
        if self.held:
            self.held = False
            if not self.transport.is_closing():  # type: ignore[union-attr]
                self.transport.resume_reading()  # type: ignore[union-attr]
            asyncio.get_running_loop().call_soon(self._consume)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.big is not None:
            return memoryview(self.big)[self.big_filled :]
        if self.end == len(self.scratch):  # full: move the unread part to the front
            unread = self.end - self.start
            self.scratch[:unread] = self.scratch[self.start : self.end]
            self.start, self.end = 0, unread
        return memoryview(self.scratch)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.big is not None:
            self.big_filled += nbytes
            if self.big_filled == len(self.big):
                frame, self.big = self.big, None
                self._frame(frame)
            return
        self.end += nbytes
        self._consume()

    def _consume(self) -> None:
        """Handle the whole frames read into scratch, unless flow control holds them."""
        scratch = self.scratch
        while self.end - self.start >= _LEN.size and not self.dropped and not self.held:
            (size,) = _LEN.unpack_from(scratch, self.start)
            if not self.authenticated and size > _HANDSHAKE_MAX:
                self._drop("oversized frame before authentication")
                return
            body = self.start + _LEN.size
            if size > len(scratch) - _LEN.size:  # will not fit: give it a buffer of its own
                self.big = bytearray(size)
                have = self.end - body
                self.big[:have] = scratch[body : self.end]
                self.big_filled = have
                self.start = self.end = 0
                if have == size:
                    frame, self.big = self.big, None
                    self._frame(frame)
                return
            if self.end - body < size:
                return
            self.start = body + size
            self._frame(scratch[body : self.start])  # a copy: scratch is reused
        if self.start == self.end:
            self.start = self.end = 0

    def _frame(self, frame: bytearray) -> None:
        if self.authenticated and not self.outgoing:
            self.endpoint._received(self.peer, frame)
        else:
            self._handshake(bytes(frame))

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint._lost(self)

    # the handshake ------------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        secret, me = self.endpoint.secret, self.endpoint.name.encode()
        if self.outgoing:
            if self.authenticated:
                self._drop("unexpected data on an outgoing connection")
                return
            nonce, proof = data[:_NONCE], data[_NONCE:]
            if not hmac.compare_digest(
                proof, _mac(secret, b"server", self.nonce, self.peer.encode())
            ):
                self._drop(f"{self.peer!r} failed to authenticate")
                return
            self._write_raw(_mac(secret, b"client", nonce, me, self.peer.encode()))
            self.authenticated = True
            queue, self.queue, self.queued_bytes, self.queued_last = self.queue, [], 0, 0
            for parts in queue:
                self.write(parts)
            self.endpoint._congestion(self)
        elif self.peer is None:  # first frame: MAGIC, nonce, sender, receiver
            if not data.startswith(MAGIC):
                self._drop("not a distbelief peer")
                return
            nonce = data[len(MAGIC) : len(MAGIC) + _NONCE]
            sender, _, receiver = data[len(MAGIC) + _NONCE :].partition(b"\x00")
            if receiver != me:
                self._drop(f"a peer wanted {receiver!r}, this is {me!r}")
                return
            self.peer = sender.decode()
            self._write_raw(self.nonce + _mac(secret, b"server", nonce, me))
        else:
            if not hmac.compare_digest(
                data, _mac(secret, b"client", self.nonce, self.peer.encode(), me)
            ):
                self._drop(f"a peer calling itself {self.peer!r} failed to authenticate")
                return
            self.authenticated = True
            self.endpoint._admitted(self)

    def _write_raw(self, payload: bytes) -> None:
        self.transport.write(_LEN.pack(len(payload)) + payload)

    def _drop(self, why: str) -> None:
        self.dropped = True
        log.warning(
            "distbelief data plane of %s: %s; closing the connection", self.endpoint.name, why
        )
        self.transport.close()

    # sending ------------------------------------------------------------------------------

    def write(self, parts: list[Any]) -> None:
        if not self.authenticated:
            frame = [bytes(p) for p in parts]  # the sender may reuse its tensors
            self.queue.append(frame)
            self.queued_last = sum(map(len, frame))
            self.queued_bytes += self.queued_last
            self.endpoint.peak_buffered = max(self.endpoint.peak_buffered, self.queued_bytes)
            if self.endpoint.flow is not None and self.congested:
                self.endpoint._congestion(self)
            return
        transport = self.transport
        size = sum(map(len, parts))
        if size <= 65536:  # one write for small frames, no join for big ones
            transport.write(b"".join(parts))
        else:
            for p in parts:
                transport.write(p)
        endpoint = self.endpoint
        buffered = transport.get_write_buffer_size()
        if buffered > endpoint.peak_buffered:
            endpoint.peak_buffered = buffered
        # Above the window by more than this frame: a frame sent before it is still there, so
        # the peer is slow to take them: wait. One frame alone, however big, never makes the
        # sender wait: a reply (a shard's fetch reply) then never waits for its requester,
        # which sends no second request before it has read the reply (no cycle through it).
        if self.writing_paused and not self.over and endpoint.flow is not None:
            if buffered > endpoint.flow.window + size:
                self.over = True
                endpoint._congestion(self)


class Endpoint:
    """One participant of the data plane: listens for its peers and dials them.

    ``send`` may be called before a connection exists: messages wait, in order, until it is
    up. Messages to an address that refuses, or over a connection that breaks, are dropped:
    their receiver is dead, and the runtime's supervision takes it from there.

    With ``flow`` (a :class:`FlowControl`) the endpoint waits for a congested peer as the
    module doc says; it always reads from the peers named in ``exempt`` (the driver).
    """

    def __init__(
        self,
        name: str,
        secret: bytes,
        deliver: Deliver,
        on_error: Callable[[str, BaseException], None] | None = None,
        flow: FlowControl | None = None,
        exempt: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.secret = secret
        self.deliver = deliver
        self.on_error = on_error
        self.flow = flow
        self.exempt = frozenset(exempt)
        self.addresses: dict[str, Address] = {}
        self.outgoing: dict[str, _Connection] = {}
        self.incoming: set[_Connection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.congested: set[_Connection] = set()  # outgoing connections above the window
        self.waiting = False  # holding the incoming connections (flow control)
        self.grace = False  # one frame let through after a timeout
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.waits = self.timeouts = 0
        self.waited_s = 0.0
        self.peak_buffered = 0
        """Most bytes ever buffered towards one peer (written, not yet taken by the kernel)."""

    async def listen(self, sock: socket.socket) -> None:
        """Accept peers on an already bound, listening socket."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: self._accepted(), sock=sock)

    def _accepted(self) -> _Connection:
        conn = _Connection(self, None)
        self.incoming.add(conn)
        return conn

    def set_addresses(self, addresses: dict[str, Address]) -> None:
        """Learn where peers listen; a peer at a new address is dialled afresh next send."""
        for name, address in addresses.items():
            address = (address[0], int(address[1]))
            if self.addresses.get(name) != address:
                self.addresses[name] = address
                conn = self.outgoing.pop(name, None)
                if conn is not None and conn.transport is not None:
                    conn.transport.close()

    def send(self, name: str, messages: list) -> None:
        """Send ``messages`` to ``name`` as one frame (encoded now: the caller may go on)."""
        conn = self.outgoing.get(name)
        if conn is None:
            address = self.addresses.get(name)
            if address is None:
                raise KeyError(f"no address known for actor {name!r}")
            conn = self.outgoing[name] = _Connection(self, name)
            asyncio.get_running_loop().create_task(self._dial(conn, address))
        conn.write(encode(messages))

    async def _dial(self, conn: _Connection, address: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: conn, *address)
        except OSError as exc:
            log.info("%s: cannot reach %s at %s (%s); dropping", self.name, conn.peer, address, exc)
            if self.outgoing.get(conn.peer) is conn:
                del self.outgoing[conn.peer]

    def _received(self, sender: str, frame: bytearray) -> None:
        try:
            messages = decode(frame)
        except Exception as exc:  # noqa: BLE001 - a frame that does not unpickle is reported
            if self.on_error is None:
                raise
            self.on_error(sender, exc)
            return
        self.deliver(sender, messages)
        if self.grace:  # the one frame after a timeout is in: wait again
            self.grace = False
            if self.waiting:
                self._steer()

    def _lost(self, conn: _Connection) -> None:
        self.incoming.discard(conn)
        if conn.outgoing and self.outgoing.get(conn.peer) is conn:
            del self.outgoing[conn.peer]
        if conn in self.congested:  # a dead receiver is waited for no longer
            self.congested.discard(conn)
            self._steer()

    # flow control -------------------------------------------------------------------------

    def _congestion(self, conn: _Connection) -> None:
        """An outgoing connection's buffer crossed the window, either way."""
        if self.flow is None:
            return
        if conn.congested:
            self.congested.add(conn)
        else:
            self.congested.discard(conn)
        self._steer()

    def _waits_for(self) -> frozenset[str]:
        return frozenset(c.peer for c in self.congested)  # type: ignore[misc]

    def _holds(self, conn: _Connection, waited: frozenset[str]) -> bool:
        return conn.authenticated and conn.peer not in self.exempt and conn.peer not in waited

    def _steer(self) -> None:
        """Wait while some peer is congested, go on once none is; the peers waited for (and
        the exempt ones) are read throughout."""
        if self.congested:
            waited = self._waits_for()
            for conn in self.incoming:
                if self._holds(conn, waited):
                    conn.hold()
                else:
                    conn.release()
            if not self.waiting:
                self.waiting = True
                self.waits += 1
                self._since = time.monotonic()
                self._arm()
        elif self.waiting:
            self.waiting = self.grace = False
            self.waited_s += time.monotonic() - self._since
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for conn in self.incoming:
                conn.release()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.flow.timeout_s, self._timed_out)  # type: ignore[union-attr]

    def _timed_out(self) -> None:
        """Waited ``timeout_s``: handle one more frame (from any peer), then wait again."""
        self._timer = None
        if not self.waiting:
            return
        self.timeouts += 1
        log.warning(
            "distbelief data plane of %s: waited %.1f s for %s to take what it was sent; "
            "handling one more frame (a cycle of full buffers, or a very slow receiver)",
            self.name, self.flow.timeout_s, ", ".join(sorted(self._waits_for())),  # type: ignore[union-attr]
        )  # fmt: skip
        self.grace = True
        for conn in self.incoming:
            conn.release()
        self._arm()

    def _admitted(self, conn: _Connection) -> None:
        """An incoming connection authenticated: held at once if the endpoint is waiting."""
        if self.waiting and not self.grace and self._holds(conn, self._waits_for()):
            conn.hold()

    def flow_stats(self) -> dict[str, Any]:
        """What flow control did: ``waits`` (times it began waiting), ``waited_s``,
        ``timeouts``, and ``peak_buffered`` (most bytes ever buffered towards one peer)."""
        waited = self.waited_s + (time.monotonic() - self._since if self.waiting else 0.0)
        return {
            "waits": self.waits,
            "waited_s": waited,
            "timeouts": self.timeouts,
            "peak_buffered": self.peak_buffered,
        }

    def close(self) -> None:
        """Stop listening, close every connection, end a flow-control wait (its timer re-arms
        itself otherwise)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.server is not None:
            self.server.close()
        for conn in [*self.outgoing.values(), *self.incoming]:
            if conn.transport is not None:
                conn.transport.close()
        self.outgoing.clear()
        self.incoming.clear()


def listening_socket(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a free port, listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock
