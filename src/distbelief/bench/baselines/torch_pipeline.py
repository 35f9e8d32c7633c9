"""PyTorch's own pipelining: the synchronous pipeline a PyTorch user would pick.

``torch.distributed.pipelining`` with one ``PipelineStage`` per process (two CPU processes over
gloo on 127.0.0.1), the model split at the given layer, and ``ScheduleGPipe`` (every
micro-batch's forward, then every backward: a flush per step) or ``Schedule1F1B`` (one forward,
one backward in the steady state). Each optimizer step takes ``n_microbatches`` micro-batches
of ``microbatch`` examples; each stage steps its own ``torch.optim.SGD`` on its own layers with
the summed micro-batch gradients (``scale_grads=False``, as distbelief's ``n_push`` sums).

Over gloo the schedules hang at the first step unless each stage is told its shapes, so each
``PipelineStage`` gets ``input_args``/``output_args`` (static shapes: every micro-batch is
full). The processes are forked (torch is imported already) and joined with a timeout: on
timeout they are killed and the run is reported failed, never a hang.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("gpipe", "1f1b")
"""The schedules measured: ``ScheduleGPipe`` and ``Schedule1F1B``."""


def _stage(
    rank: int,
    model: nn.Sequential,
    cut: int,
    data: tuple[torch.Tensor, torch.Tensor],
    schedule: str,
    lr: float,
    microbatch: int,
    n_microbatches: int,
    steps: int,
    store: str,
    results: Any,
) -> None:
    """One pipeline stage's process: layers ``[:cut]`` (rank 0) or ``[cut:]`` (rank 1)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    try:
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # 127.0.0.1
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        layers = list(model)
        part = nn.Sequential(*(layers[:cut] if rank == 0 else layers[cut:]))
        # Static shapes, and whether a gradient flows: what goes in and out of this stage.
        x0 = data[0][:microbatch]
        with torch.no_grad():
            hidden = nn.Sequential(*layers[:cut])(x0)
        inp = x0 if rank == 0 else hidden.clone().requires_grad_()
        out = part(inp).detach().requires_grad_()
        stage = PipelineStage(
            part, rank, 2, torch.device("cpu"), input_args=inp.detach().requires_grad_(rank > 0),
            output_args=out,
        )  # fmt: skip
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        sched = kind(stage, n_microbatches, loss_fn=F.cross_entropy, scale_grads=False)
        opt = torch.optim.SGD(part.parameters(), lr=lr)
        x, y = data
        per_step = microbatch * n_microbatches

        def step(i: int) -> None:
            lo = (i * per_step) % (len(x) - per_step + 1)
            if rank == 0:
                sched.step(x[lo : lo + per_step])
            else:
                sched.step(target=y[lo : lo + per_step])
            opt.step()
            opt.zero_grad()

        step(0)  # the first step sets the stages up: not timed
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            step(i)
        dist.barrier()
        elapsed = time.perf_counter() - t0
        results.put((rank, "ok", steps * per_step / elapsed))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        results.put((rank, "error", traceback.format_exc()[-2000:]))


def torch_pipeline_examples_per_s(
    model: nn.Sequential,
    cut: int,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    schedule: str,
    lr: float,
    microbatch: int = 32,
    n_microbatches: int = 4,
    steps: int = 50,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Train ``model`` split at layer ``cut`` over two processes with ``schedule`` ("gpipe" or
    "1f1b") for ``steps`` optimizer steps (after one untimed); returns ``{"ok": True,
    "examples_per_s": ...}`` or ``{"ok": False, "error": ...}`` (a failure or a timeout, the
    processes killed)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if len(data[0]) < microbatch * n_microbatches:
        raise ValueError(f"a step takes {microbatch * n_microbatches} examples, got {len(data[0])}")
    # Imported here, once, before the fork: it takes seconds, which each process would pay.
    import torch.distributed.pipelining  # noqa: F401

    ctx = mp.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="distbelief-pipe-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_stage,
                args=(
                    rank,
                    model,
                    cut,
                    data,
                    schedule,
                    lr,
                    microbatch,
                    n_microbatches,
                    steps,
                    store,
                    results,
                ),
                daemon=True,
            )  # fmt: skip
            for rank in range(2)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        got: dict[int, tuple[str, Any]] = {}
        try:
            while len(got) < 2:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"ok": False, "error": f"timed out after {timeout_s:g} s"}
                try:
                    rank, status, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead and len(got) < 2:
                        return {"ok": False, "error": f"a stage process died ({dead[0].exitcode})"}
                    continue
                got[rank] = (status, value)
                if status != "ok":
                    return {"ok": False, "error": f"stage {rank}: {value}"}
        finally:
            for p in procs:
                p.join(5.0 if len(got) == 2 else 0.0)
                if p.exitcode is None:
                    p.kill()
                    p.join(5.0)
            results.close()
    return {"ok": True, "examples_per_s": min(v for _, v in got.values())}


def split_widths(widths: Sequence[int]) -> int:
    """The layer index (in ``mlp(widths)``'s ``nn.Sequential``) after the middle hidden layer:
    with an even number of equal square hidden layers, both halves do the same work."""
    linears = len(widths) - 1
    return 2 * (linears // 2)  # Linear, ReLU pairs: the first half's, ReLU included
