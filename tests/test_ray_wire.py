"""The Ray runtime's data plane (``ray_wire``): frames, endpoints and flow control, over
loopback sockets. Pure: nothing here needs Ray, so these run where Ray is not installed."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import torch

from distbelief.algorithms.downpour.messages import FetchReply, Forward, Push
from distbelief.runtime.ray.wire import Endpoint, FlowControl, decode, encode, listening_socket


def _frame(parts: list) -> bytearray:
    """What the receiver reads after the length prefix."""
    return bytearray(b"".join(bytes(p) for p in parts)[8:])


def test_frames_carry_tensors_out_of_band_and_the_receiver_owns_them():
    w = torch.randn(1000)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    sent = [Push(0, 1, (w,), 7), Forward(3, x, y), FetchReply(0, w[10:20], 2)]
    parts = encode(sent)
    assert any(isinstance(p, memoryview) and p.nbytes == w.numel() * 4 for p in parts)
    frame = _frame(parts)
    got = decode(frame)
    assert [type(m) for m in got] == [Push, Forward, FetchReply]
    assert torch.equal(got[0].grads[0], w) and got[0].fetched_version == 7
    assert torch.equal(got[1].activations, x) and torch.equal(got[1].targets, y)
    assert torch.equal(got[2].weights, w[10:20])  # a view travels as its own elements only
    # Zero-copy on arrival: the tensor is a view of the frame buffer, and writable.
    base = torch.frombuffer(frame, dtype=torch.uint8).data_ptr()
    assert base <= got[0].grads[0].data_ptr() < base + len(frame)
    got[0].grads[0].add_(1.0)
    assert not torch.equal(got[0].grads[0], w)


class _Watched(Endpoint):
    """An endpoint that tells when one of its connections closes."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.closed = asyncio.Event()

    def _lost(self, conn) -> None:
        super()._lost(conn)
        self.closed.set()


async def _exchange(secret_b: bytes, n: int) -> list:
    """Endpoint "a" sends n messages to "b" (which has ``secret_b``); what b got, in order,
    once it has all of them or a's connection was closed on it."""
    got: list = []
    done = asyncio.Event()

    def deliver(sender: str, messages: list) -> None:
        got.extend((sender, m) for m in messages)
        if len(got) == n:
            done.set()

    a = _Watched("a", b"s" * 32, lambda *_: None)
    b = Endpoint("b", secret_b, deliver)
    sock = listening_socket("127.0.0.1")
    await b.listen(sock)
    a.set_addresses({"b": sock.getsockname()[:2]})
    for i in range(n):  # small frames, and every 7th one bigger than the read buffer
        shape = (2, 2) if i % 7 else (300, 100)
        a.send("b", [Forward(i, torch.full(shape, float(i)), torch.tensor([i]))])
    waits = [asyncio.create_task(done.wait()), asyncio.create_task(a.closed.wait())]
    _, pending = await asyncio.wait(waits, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    a.close()
    b.close()
    return got


def test_endpoints_keep_each_senders_order():
    got = asyncio.run(_exchange(b"s" * 32, 300))
    assert [s for s, _ in got] == ["a"] * 300
    assert [m.step for _, m in got] == list(range(300))
    assert all(bool((m.activations == m.step).all()) for _, m in got)
    assert all(m.activations.shape == ((2, 2) if m.step % 7 else (300, 100)) for _, m in got)


def test_a_peer_without_the_runs_secret_is_dropped_unheard():
    got = asyncio.run(_exchange(b"x" * 32, 3))
    assert got == []


@contextlib.contextmanager
def _receiver_on_its_own_loop(name: str, secret: bytes, deliver):
    """An endpoint listening on an event loop of its own thread, as in another process: yields
    it and its address; closed, and its loop stopped, after."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    endpoint = Endpoint(name, secret, deliver)
    sock = listening_socket("127.0.0.1")
    asyncio.run_coroutine_threadsafe(endpoint.listen(sock), loop).result(10)
    try:
        yield endpoint, sock.getsockname()[:2]
    finally:
        loop.call_soon_threadsafe(endpoint.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class _Relay(Endpoint):
    """An endpoint that tells another thread when it first begins to wait for a congested
    peer, and when a wait first times out."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.began_waiting, self.timed_out = threading.Event(), threading.Event()

    def _steer(self) -> None:
        super()._steer()
        if self.waiting:
            self.began_waiting.set()

    def _timed_out(self) -> None:
        super()._timed_out()
        if self.timeouts:
            self.timed_out.set()


async def _relay_to_a_stuck_receiver(flow: FlowControl, n: int, size: int, until: str) -> tuple:
    """Source "s" sends ``n`` frames of ``size`` bytes to relay "m", which forwards each to
    "r". r (on a loop of its own, as another process) is stuck in its first delivery until the
    relay has begun to wait (``until="wait"``) or has had a wait time out (``"timeout"``),
    then takes the rest. Returns the steps r got, in order, and the relay's flow statistics."""
    secret = b"s" * 32
    got: list[int] = []
    done = threading.Event()
    relays: list[_Relay] = []

    def stuck(sender: str, messages: list) -> None:
        if not got:  # r reads nothing meanwhile: the kernel's buffers fill, then the relay's
            relay = relays[0]
            (relay.began_waiting if until == "wait" else relay.timed_out).wait(20)
        got.extend(m.step for m in messages)
        if len(got) == n:
            done.set()

    with _receiver_on_its_own_loop("r", secret, stuck) as (_, r_address):
        m = _Relay("m", secret, lambda sender, messages: m.send("r", messages), flow=flow)
        relays.append(m)
        m_sock = listening_socket("127.0.0.1")
        await m.listen(m_sock)
        m.set_addresses({"r": r_address})
        s = Endpoint("s", secret, lambda *_: None)
        s.set_addresses({"m": m_sock.getsockname()[:2]})
        for i in range(n):
            s.send("m", [Forward(i, torch.full((size // 4,), float(i)), torch.tensor([i]))])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, done.wait, 60)
        stats = m.flow_stats()
        s.close()
        m.close()
    return got, stats


def test_flow_control_bounds_what_a_relay_buffers_towards_a_slow_receiver():
    """Without it the relay would buffer whatever the kernel does not take of 16 MiB; with a
    256 KiB window it waits (stops reading its source) and holds at most the window and two
    frames, and every message still arrives, in order."""
    n, size, window = 256, 64 * 1024, 256 * 1024
    flow = FlowControl(window, 30.0)
    got, stats = asyncio.run(_relay_to_a_stuck_receiver(flow, n, size, until="wait"))
    assert got == list(range(n))
    assert stats["waits"] >= 1 and stats["timeouts"] == 0
    # The window, the frame that went past it, and the one in hand when the relay stopped.
    assert 0 < stats["peak_buffered"] <= window + 2 * (size + 4096), stats


def test_a_wait_that_lasts_past_the_timeout_lets_one_more_frame_through():
    """A relay whose receiver takes nothing for longer than the timeout handles one more
    frame per timeout, and counts them; once the receiver goes on, everything arrives."""
    n, size = 256, 64 * 1024
    flow = FlowControl(64 * 1024, 0.01)
    got, stats = asyncio.run(_relay_to_a_stuck_receiver(flow, n, size, until="timeout"))
    assert got == list(range(n))
    assert stats["timeouts"] >= 1


async def _one_big_frame_then_another() -> tuple[bool, bool, bool, list[int]]:
    """ "s" sends to "r" (a loop of its own, stuck in its first delivery until told): one frame
    far bigger than the window, then a second. Returns whether s waited after each, whether
    the first filled its buffer past the window, and the steps r got once it went on."""
    secret, window = b"s" * 32, 64 * 1024
    got: list[int] = []
    first, go, done = threading.Event(), threading.Event(), threading.Event()

    def deliver(sender: str, messages: list) -> None:
        got.extend(m.step for m in messages)
        first.set()
        go.wait(30)
        if len(got) == 3:
            done.set()

    with _receiver_on_its_own_loop("r", secret, deliver) as (_, r_address):
        s = Endpoint("s", secret, lambda *_: None, flow=FlowControl(window, 30.0))
        s.set_addresses({"r": r_address})
        loop = asyncio.get_running_loop()
        s.send("r", [Forward(0, torch.zeros(1), torch.tensor([0]))])
        await loop.run_in_executor(None, first.wait, 30)  # connected, and r is stuck
        big = torch.zeros(8 << 20)  # 32 MiB: more than the kernel takes at once
        s.send("r", [Forward(1, big, torch.tensor([1]))])
        after_one, past_window = s.waiting, s.outgoing["r"].writing_paused
        s.send("r", [Forward(2, torch.zeros(1), torch.tensor([2]))])
        after_two = s.waiting
        go.set()
        await loop.run_in_executor(None, done.wait, 30)
        s.close()
    return after_one, past_window, after_two, got


def test_one_frame_however_big_never_makes_its_sender_wait_a_second_one_does():
    """So a reply (a fetch reply of a large model) never waits for its requester."""
    after_one, past_window, after_two, got = asyncio.run(_one_big_frame_then_another())
    assert past_window and not after_one
    assert after_two
    assert got == [0, 1, 2]
