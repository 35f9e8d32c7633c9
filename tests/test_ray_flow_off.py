"""Ray's ``flow_window_bytes=0`` (README, *Bounded memory*): flow control off, so a sender in
front of a receiver that takes nothing never waits, and buffers far more than a window would
let it. On the data plane itself (no Ray instance needed): the receiver is blocked on an
event, not slowed by a sleep."""

from __future__ import annotations

import asyncio
import threading

import torch

from distbelief.algorithms.downpour.messages import Forward
from distbelief.runtime.ray.wire import Endpoint, FlowControl, flow_control, listening_socket

SECRET = b"f" * 32
FRAME = 2 << 20  # bytes of one frame's tensor
FRAMES = 16  # 32 MiB in all: more than the kernel's socket buffers take


async def _send_to_a_stuck_receiver(flow: FlowControl | None) -> tuple[list[bool], int, list]:
    """ "s" (with ``flow``) sends one small frame to "r", which gets stuck handling it until
    told to go on, then ``FRAMES`` big ones. Returns whether s was waiting after each big
    frame, the most it had buffered towards r, and the steps r got once it went on."""
    loop = asyncio.new_event_loop()  # r's loop, on a thread of its own: as another process
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    got: list[int] = []
    stuck, go, done = threading.Event(), threading.Event(), threading.Event()

    def deliver(sender: str, messages: list) -> None:
        got.extend(m.step for m in messages)
        stuck.set()
        go.wait(60)
        if len(got) == FRAMES + 1:
            done.set()

    r = Endpoint("r", SECRET, deliver)
    sock = listening_socket("127.0.0.1")
    asyncio.run_coroutine_threadsafe(r.listen(sock), loop).result(10)
    s = Endpoint("s", SECRET, lambda *_: None, flow=flow)
    try:
        s.set_addresses({"r": sock.getsockname()[:2]})
        here = asyncio.get_running_loop()
        s.send("r", [Forward(0, torch.zeros(1), torch.tensor([0]))])
        assert await here.run_in_executor(None, stuck.wait, 30)  # connected; r takes no more
        waiting = []
        for i in range(1, FRAMES + 1):
            s.send("r", [Forward(i, torch.zeros(FRAME // 4), torch.tensor([i]))])
            waiting.append(s.waiting)
        peak = s.flow_stats()["peak_buffered"]
        go.set()
        await here.run_in_executor(None, done.wait, 60)
    finally:
        s.close()
        loop.call_soon_threadsafe(r.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return waiting, peak, got


def test_flow_window_bytes_0_turns_flow_control_off_and_the_sender_never_waits():
    assert flow_control(0, 5.0) is None
    waiting, peak, got = asyncio.run(_send_to_a_stuck_receiver(flow_control(0, 5.0)))
    assert not any(waiting)
    assert peak > FlowControl.window + 2 * FRAME  # past what the default window allows
    assert got == list(range(FRAMES + 1))  # nothing lost once the receiver goes on


def test_with_the_default_window_the_same_sender_waits():
    """The control: the same sends with the default 1 MiB window make the sender wait."""
    waiting, peak, got = asyncio.run(_send_to_a_stuck_receiver(flow_control(1 << 20, 30.0)))
    assert any(waiting) and not waiting[0]  # one frame alone never waits
    assert got == list(range(FRAMES + 1))
