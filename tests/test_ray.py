"""The Ray runtime: its data plane and placement (pure), and on a local Ray instance: a killed
stage restarted mid-run, failures that end a run, nothing left behind, loopback and tokens."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, write_checkpoint

ray = pytest.importorskip("ray")
import psutil  # noqa: E402  (Ray ships it)

import distbelief  # noqa: E402
from distbelief.data import replica_batches  # noqa: E402
from distbelief.flat import flatten  # noqa: E402
from distbelief.messages import FetchReply, Forward, Push  # noqa: E402
from distbelief.runtime.ray_placement import plan_placement, replace_node  # noqa: E402
from distbelief.runtime.ray_wire import (  # noqa: E402
    Endpoint,
    FlowControl,
    decode,
    encode,
    listening_socket,
)

# ------------------------------------------------------------------------------ data plane


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


async def _relay_to_a_slow_receiver(flow: FlowControl | None, n: int, size: int) -> tuple:
    """Source "s" sends ``n`` frames of ``size`` bytes to relay "m", which forwards each to
    "r", whose handler sleeps 5 ms per message (on a loop of its own, as another process).
    Returns the steps "r" got, in order, and the relay's flow statistics."""
    import time

    secret = b"s" * 32
    got: list[int] = []
    done = threading.Event()

    def slow(sender: str, messages: list) -> None:
        for m in messages:
            time.sleep(0.005)
            got.append(m.step)
        if len(got) == n:
            done.set()

    with _receiver_on_its_own_loop("r", secret, slow) as (_, r_address):
        m = Endpoint("m", secret, lambda sender, messages: m.send("r", messages), flow=flow)
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
    got, stats = asyncio.run(_relay_to_a_slow_receiver(FlowControl(window, 30.0), n, size))
    assert got == list(range(n))
    assert stats["waits"] >= 1 and stats["timeouts"] == 0
    # The window, the frame that went past it, and the one in hand when the relay stopped.
    assert 0 < stats["peak_buffered"] <= window + 2 * (size + 4096), stats


def test_a_wait_that_lasts_past_the_timeout_lets_one_more_frame_through():
    """A relay that can never drain (its receiver takes 5 ms a message and the timeout is
    tiny) still handles everything, a frame per timeout, and counts the timeouts."""
    n, size = 256, 64 * 1024
    got, stats = asyncio.run(_relay_to_a_slow_receiver(FlowControl(64 * 1024, 0.01), n, size))
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


# ------------------------------------------------------------------------------ placement

NODES = ["n0", "n1", "n2"]
NAMES = [
    "shard0",
    "shard1",
    "data0",
    "replica0.stage0",
    "replica0.stage1",
    "replica0.stage2",
    "data1",
    "replica1.stage0",
    "replica1.stage1",
    "replica1.stage2",
    "master",
]


def test_spread_puts_a_replicas_stages_on_distinct_nodes_and_spreads_shards():
    plan = plan_placement(NAMES, NODES)
    for r in range(2):
        assert len({plan[f"replica{r}.stage{s}"] for s in range(3)}) == 3
    assert plan["shard0"] != plan["shard1"]
    assert plan["replica0.stage0"] != plan["replica1.stage0"]  # replicas start on other nodes
    assert set(plan.values()) == set(NODES)


def test_pack_pins_and_bad_strategies():
    assert set(plan_placement(NAMES, NODES, "pack").values()) == {"n0"}
    pinned = plan_placement(NAMES, NODES, {"shard0": "n2", "master": "n1"})
    assert pinned["shard0"] == "n2" and pinned["master"] == "n1"
    with pytest.raises(ValueError, match="not alive"):
        plan_placement(NAMES, NODES, {"shard0": "gone"})
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_placement(NAMES, NODES, "scatter")


def test_a_restarted_actor_avoids_its_replicas_nodes_when_its_own_is_gone():
    placed = {"replica0.stage0": "n0", "replica0.stage1": "n1", "shard0": "n2"}
    assert replace_node("replica0.stage1", NODES, placed, "n1") == "n1"  # still alive: stays
    assert replace_node("replica0.stage1", ["n0", "n2"], placed, "n1") == "n2"


# ------------------------------------------------------------------------------ on Ray


def toy_data(n: int = 128):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def toy_run(**kw):
    """A small run on Ray: an MLP 10-16-3 on toy data, one epoch; ``kw`` overrides."""
    args = dict(loss="cross_entropy", lr=0.1, batch_size=16, epochs=1, seed=0, runtime="ray")
    args.update(kw)
    model = args.pop("model", None) or mlp([10, 16, 3])
    return distbelief.train(model, args.pop("data", None) or toy_data(), **args)


def mnist1d_run(data, **kw):
    """MNIST-1D on Ray with the engine test's setting (MLP 40-256-256-10, Adagrad 0.05, batch
    32, 5 epochs, 2 stages); ``kw`` overrides."""
    train, test = data
    args = dict(loss="cross_entropy", lr=0.05, batch_size=32, epochs=5, stages=2)
    args.update(optimizer="adagrad", eval_data=test, seed=0, runtime="ray")
    args.update(kw)
    return distbelief.train(mlp([40, 256, 256, 10]), train, **args)


def _hosts() -> list[psutil.Process]:
    """Live actor processes of ours (Ray titles them after the hosting class)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "_Host" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_gone(pids: list[int]) -> None:
    """Every process in ``pids`` exits within 30 s (most are gone already)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes of the run still alive: {alive}"


@pytest.mark.parametrize("kind", ["ray.kill", "exit"])
def test_a_stage_killed_mid_step_is_restarted_and_the_run_equals_the_plain_loop(ray_session, kind):
    """One replica, two stages, SGD: the killed stage's step is lost before any push, so the
    restarted replica redoes it from freshly fetched parameters and the result is exact."""
    model = mlp([10, 16, 16, 3])
    x, y = toy_data()
    faults = {"replica0.stage1": (5, kind)}
    result = toy_run(
        model=model, data=(x, y), epochs=2, stages=2, seed=7, runtime_options={"faults": faults}
    )
    expected = copy.deepcopy(model)
    opt = torch.optim.SGD(expected.parameters(), lr=0.1)
    for bx, by in replica_batches(x, y, replica=0, seed=7, batch_size=16, epochs=2):
        opt.zero_grad()
        F.cross_entropy(expected(bx), by).backward()
        opt.step()
    torch.testing.assert_close(
        flatten(result.model.children()), flatten(expected.children()), rtol=1e-6, atol=1e-6
    )
    assert result.stats["restarts"] == 1
    assert result.stats["restarts_by_actor"] == {"replica0.stage1": 1}
    assert result.stats["steps"] == 2 * 128 // 16  # the lost step is counted once
    first, second = result.stats["pids"]["replica0.stage1"]
    assert first != second
    assert_gone([pid for pids in result.stats["pids"].values() for pid in pids])


def test_mnist1d_survives_ray_kill_of_one_stage_of_one_replica(ray_session, mnist1d_data):
    faults = {"replica1.stage0": 100}
    result = mnist1d_run(mnist1d_data, replicas=2, runtime_options={"faults": faults})
    assert result.history.accuracy >= 0.60
    assert result.stats["restarts"] == 1
    assert result.stats["examples"] == 5 * len(mnist1d_data[0][0])


def _loss_failing_on_call(n: int):
    calls = {"n": 0}

    def loss(out, target):
        calls["n"] += 1
        if calls["n"] == n:
            raise ValueError("loss blew up")
        return F.cross_entropy(out, target)

    return loss


def test_a_slow_shard_makes_its_senders_wait_and_what_they_buffer_stays_bounded(ray_session):
    """shard0 takes 10 ms more per message; the stage fetches once and then pushes every step
    (n_fetch 1000), about 140 KB to shard0 each: unchecked, the stage would buffer most of
    128 pushes (18 MB). With a 256 KiB window it waits instead, and the run is whole."""
    window = 256 * 1024
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 10, generator=g), torch.randint(0, 3, (2048,), generator=g)
    model = mlp([10, 256, 256, 3])
    push = sum(p.numel() for p in model.parameters()) * 4 // 2  # shard0's half, float32
    result = toy_run(
        model=model,
        data=(x, y),
        shards=2,
        n_fetch=1000,
        runtime_options={"faults": ["delay:shard0=10ms"], "flow_window_bytes": window},
    )
    assert result.stats["examples"] == 2048 and result.stats["updates_applied"] == [128, 128]
    flow = result.stats["flow"]
    assert flow["window_bytes"] == window
    assert flow["by_actor"]["replica0.stage0"]["waits"] >= 1
    assert flow["timeouts"] == 0
    assert 0 < flow["peak_buffered"] <= window + 2 * push + 65536, flow
    assert_gone([pid for pids in result.stats["pids"].values() for pid in pids])


def test_a_handler_error_ends_the_run_naming_the_actor_and_nothing_is_left(ray_session):
    assert_gone([p.pid for p in _hosts()])  # earlier tests' actors, if still exiting
    with pytest.raises(distbelief.ActorFailed, match="replica0.stage1.*loss blew up"):
        toy_run(loss=_loss_failing_on_call(4), stages=2)
    assert_gone([p.pid for p in _hosts()])


@pytest.mark.parametrize(
    "fault, actor", [({"data0": 3}, "data0"), (["kill:shard0@update=4"], "shard0")]
)
def test_a_dead_actor_that_cannot_restart_ends_the_run_and_nothing_is_left(
    ray_session, fault, actor
):
    # No restarts left: the run ends naming the actor (within the health period), never hangs.
    with pytest.raises(distbelief.ActorFailed, match=f"'{actor}'.*died"):
        toy_run(runtime_options={"faults": fault, "max_restarts": 0})
    assert_gone([p.pid for p in _hosts()])


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_mnist1d_survives_a_killed_parameter_shard(
    ray_session, mnist1d_data, tmp_path, with_checkpoint
):
    """shard1 dies after 300 of its ~630 updates; it is restored from the newest replica's
    copy (the checkpoint, of the initial parameters, is older) while the replicas keep going.
    The band is the stage-kill test's (5 epochs, not the main job's 15: 0.60)."""
    model = mlp([40, 256, 256, 10])
    if with_checkpoint:
        write_checkpoint(tmp_path, model, version=0)
    result = distbelief.train(
        model, mnist1d_data[0], loss="cross_entropy", lr=0.05, batch_size=32, epochs=5,
        stages=2, replicas=2, shards=2, optimizer="adagrad", eval_data=mnist1d_data[1], seed=0,
        runtime="ray", runtime_options={"faults": ["kill:shard1@update=300"]},
        checkpoint_dir=tmp_path if with_checkpoint else None, checkpoint_every=0,
    )  # fmt: skip
    assert result.history.accuracy >= 0.60
    assert result.stats["restarts_by_actor"] == {"shard1": 1}
    assert result.stats["examples"] == 5 * len(mnist1d_data[0][0])
    (rec,) = result.stats["recoveries"]
    assert rec["source"].startswith("replica") and rec["optimizer"] == "fresh"
    # It died at 300 or a little later (the fault is checked as messages arrive); the
    # replicas' newest copy is a few updates behind; the loss reported is no more than that.
    assert 300 - 16 <= rec["restored_version"] <= 300 + 16
    assert 0 <= rec["lost_updates"] <= max(0, 300 + 16 - rec["restored_version"])
    assert (rec["checkpoint"] is not None) == with_checkpoint
    first, second = result.stats["pids"]["shard1"]
    assert first != second


@pytest.mark.parametrize("fault", ["kill:data0@message=20", "exit:master@message=40"])
def test_a_killed_data_shard_or_master_is_recovered_and_the_run_completes(ray_session, fault):
    name = fault.split(":")[1].split("@")[0]
    result = toy_run(
        replicas=2, stages=2, shards=2, epochs=3, optimizer="adagrad", data=toy_data(256),
        runtime_options={"faults": [fault]},
    )  # fmt: skip
    assert result.stats["restarts_by_actor"] == {name: 1}
    assert result.stats["examples"] == 3 * 256
    assert result.stats["steps"] == 2 * 3 * 8
    assert [r["actor"] for r in result.stats["recoveries"]] == [name]
    assert torch.isfinite(flatten(result.model.children())).all()


def test_every_listening_port_is_on_loopback_and_token_auth_is_on(ray_session):
    seen: list[tuple[str, int, str]] = []

    def look(report) -> None:
        if seen:
            return
        pids = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids:
                seen.append((c.laddr.ip, c.laddr.port, pids[c.pid]))

    toy_run(epochs=2, progress=look)
    assert seen
    assert {ip for ip, _, _ in seen} <= {"127.0.0.1", "::ffff:127.0.0.1"}, seen
    assert any("_Host" in name or "ray::" in name for _, _, name in seen)
    assert os.environ["RAY_AUTH_MODE"] == "token"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"adress": "x"}, r"^runtime_options: unknown option\(s\) \['adress'\]"),
        ({"placement": "scatter"}, r"^runtime_options: placement must be one of"),
        ({"faults": {"replica0.stage0": (3, "sigstop")}}, r"^faults: 'replica0.stage0': unknown"),
    ],
)
def test_bad_runtime_options_are_config_errors_before_anything_starts(options, match):
    with pytest.raises(distbelief.ConfigError, match=match):
        toy_run(runtime_options=options)


def test_an_address_other_than_the_connected_clusters_is_refused(ray_session):
    with pytest.raises(distbelief.ConfigError, match="^runtime_options: address '127.0.0.1:1'"):
        toy_run(runtime_options={"address": "127.0.0.1:1"})


@pytest.mark.parametrize(
    "address, match",
    [
        ("garbage", r"'garbage' is not HOST:PORT"),
        ("127.0.0.1:99999", r"'127.0.0.1:99999' is not HOST:PORT"),
        ("127.0.0.1:1", r"'127.0.0.1:1': no Ray cluster answers there \(Connection refused\)"),
    ],
)
def test_a_malformed_or_dead_cluster_address_is_refused_at_once(address, match):
    # Before ray.init, which printed a traceback for the first and retried the last for minutes.
    from distbelief.runtime.ray import check_address

    with pytest.raises(distbelief.ConfigError, match=rf"^runtime_options: address {match}"):
        check_address(address, timeout=2.0)
