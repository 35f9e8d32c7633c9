"""L-BFGS over a *distributed vector*: the two-loop recursion and a strong-Wolfe line search,
written so that the code that runs them never holds a parameter-sized vector.

The algorithm is a generator. It names vectors (``"x"`` the parameters, ``"g"`` their gradient,
``"d"`` the direction, ``"w"`` the point to evaluate, ``"gw"`` its gradient, ``"s3"``/``"y3"``
history slots, ...) and *yields requests*: a :class:`VectorOps` program (scale, axpy,
coefficient-wise multiply, copy; and reductions - dot products, max and sum of absolute values -
whose scalar results are sent back into the generator, in order), or an :class:`Evaluate` (the
loss at ``"w"``, whose gradient lands in ``"gw"``). Whoever drives it decides where the vectors
live: :func:`minimize` keeps them in one process (the oracle for tests); Sandblaster's coordinator
sends each program to every parameter shard, which runs it on its own slice, and adds up the
shards' partial reductions - on scalars.

Ops never change a vector in place: each writes a new tensor under its destination name, so a
``copy`` is an alias and a vector lent to a replica (``"w"``) is never changed under it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from .messages import Evaluate, Op, VectorOps


@dataclass(frozen=True)
class StepEnd:
    """L-BFGS -> its driver: a step is done (for progress reports; the reply is ignored)."""

    step: int
    """Steps done."""
    loss: float
    """Loss at the new ``"x"``."""
    state: dict | None = None
    """Everything the algorithm holds besides the vectors (JSON): with the shards' vectors,
    what a checkpoint needs to carry on from this step (``lbfgs(settings, state)``)."""


Request = VectorOps | Evaluate | StepEnd
Lbfgs = Generator[Request, object, "Outcome"]


@dataclass
class Outcome:
    """What a finished run of :func:`lbfgs` reports."""

    loss: float
    """Loss at the final ``"x"`` (on the last batch evaluated)."""
    steps: int = 0
    """L-BFGS iterations taken."""
    function_evals: int = 0
    """Loss-and-gradient evaluations, line search included."""
    stop: str = ""
    """Why it stopped: ``steps``, ``gradient``, ``loss change``, ``step size``, ``evals``,
    ``not a descent direction``, ``diverged``."""
    losses: list[float] = field(default_factory=list)
    """Loss at ``"x"`` after each step (on that step's batch)."""
    diverged: str = ""
    """Why the run cannot go on, when ``stop`` is ``diverged``: a loss or gradient that is
    NaN or Inf where the algorithm needs a finite one (``"x"`` is left as it was before)."""


@dataclass(frozen=True)
class Settings:
    """The knobs of :func:`lbfgs` (defaults: those of ``torch.optim.LBFGS``, strong Wolfe)."""

    steps: int = 20
    """Most L-BFGS iterations."""
    history: int = 10
    """Pairs (s, y) kept: the m of L-BFGS."""
    max_evals: int | None = None
    """Most function evaluations (None: 1.25 x steps, as torch)."""
    tolerance_grad: float = 1e-7
    """Stop when the largest gradient coefficient is at most this."""
    tolerance_change: float = 1e-9
    """Stop when the loss or the step changes by less than this."""
    lr: float = 1.0
    """Initial step length of each line search (scaled on the first step)."""
    max_ls: int = 25
    """Most evaluations per line search."""
    fresh_batches: bool = False
    """Each step evaluates on a new batch (mini-batch L-BFGS): the gradient at ``"x"`` is
    re-evaluated on it first, so each pair (s, y) compares gradients of one batch."""


FINAL_STOPS = ("gradient", "step size", "loss change", "not a descent direction", "diverged")
"""Why a run may stop that more steps do not change (a resumed run stops there too)."""


def _ops(*ops: Op) -> VectorOps:
    return VectorOps(tuple(ops))


def lbfgs(settings: Settings, resume: dict | None = None) -> Lbfgs:
    """Minimise from ``"x"`` (which the driver provides); see the module doc for the protocol.

    ``resume``: the ``state`` of a :class:`StepEnd` (from a checkpoint), with the vectors as
    they were then: carry on from that step exactly as the run that wrote it would have."""
    m = settings.history
    max_evals = settings.max_evals or settings.steps * 5 // 4
    evals = 0
    batch = 0

    def evaluate_at_x() -> Generator[Request, object, float]:
        nonlocal evals
        yield _ops(Op("copy", "x", "w"))
        f = yield Evaluate(batch)
        evals += 1
        yield _ops(Op("copy", "gw", "g"))
        return float(f)

    def diverged(reason: str) -> Outcome:
        out.stop, out.diverged, out.function_evals = "diverged", reason, evals
        return out

    slots: list[int] = []  # ring of history slots, oldest first
    rho: dict[int, float] = {}
    h_diag = 1.0
    t = 0.0
    first = 1
    if resume is not None:
        f, g_sum, evals, batch = resume["loss"], resume["g_sum"], resume["evals"], resume["batch"]
        slots, h_diag = list(resume["slots"]), resume["h_diag"]
        rho = {int(k): v for k, v in resume["rho"].items()}
        out = Outcome(loss=f, steps=resume["step"], losses=list(resume["losses"]))
        first = resume["step"] + 1
        if resume["stop"] not in FINAL_STOPS:  # more steps (and evaluations) may be given
            out.stop = ""
        else:
            out.stop, out.function_evals = resume["stop"], evals
            return out
    else:
        f = yield from evaluate_at_x()
        (g_max, g_sum) = yield _ops(Op("absmax", "g"), Op("abssum", "g"))
        out = Outcome(loss=f)
        if not math.isfinite(f):
            return diverged(f"the loss at the initial parameters is {f}")
        if not math.isfinite(g_max):
            return diverged("the gradient at the initial parameters holds NaN or Inf")
        if g_max <= settings.tolerance_grad:
            out.function_evals, out.stop = evals, "gradient"
            return out
    for step in range(first, settings.steps + 1):
        if step > 1 and settings.fresh_batches:
            batch += 1
            f = yield from evaluate_at_x()
            if not math.isfinite(f):
                return diverged(f"the loss on batch {batch} is {f} (step {step})")
        # Two-loop recursion: d = -H g, with H from the pairs in the ring.
        yield _ops(Op("scale", "g", "q", alpha=-1.0))
        alphas: dict[int, float] = {}
        for k in reversed(slots):
            (sq,) = yield _ops(Op("dot", f"s{k}", "q"))
            alphas[k] = rho[k] * sq
            yield _ops(Op("axpy", f"y{k}", "q", alpha=-alphas[k]))
        yield _ops(Op("scale", "q", "d", alpha=h_diag))
        for k in slots:
            (yd,) = yield _ops(Op("dot", f"y{k}", "d"))
            yield _ops(Op("axpy", f"s{k}", "d", alpha=alphas[k] - rho[k] * yd))
        (gtd,) = yield _ops(Op("dot", "g", "d"))
        if gtd > -settings.tolerance_change:
            out.stop = "not a descent direction"
            break
        t = settings.lr * (min(1.0, 1.0 / g_sum) if step == 1 else 1.0)
        search = strong_wolfe(f, gtd, t, batch, settings)
        f_new, t, g_name, ls_evals = yield from search
        evals += ls_evals
        if not math.isfinite(f_new):  # every point the line search tried was NaN or Inf
            out.loss = f
            return diverged(
                f"step {step}'s line search met only NaN or Inf losses ({ls_evals} points)"
            )
        # s = t d, y = g_new - g; x += s; the pair enters the ring if its curvature is positive.
        slot = next(i for i in range(m + 1) if i not in slots)  # the ring holds at most m
        (ys, yy, d_max) = yield _ops(
            Op("scale", "d", f"s{slot}", alpha=t),
            Op("copy", g_name, f"y{slot}"),
            Op("axpy", "g", f"y{slot}", alpha=-1.0),
            Op("axpy", "d", "x", alpha=t),
            Op("copy", g_name, "g"),
            Op("dot", f"y{slot}", f"s{slot}"),
            Op("dot", f"y{slot}", f"y{slot}"),
            Op("absmax", "d"),
        )
        if ys > 1e-10:
            if len(slots) == m:
                old = slots.pop(0)
                yield _ops(Op("drop", f"s{old}"), Op("drop", f"y{old}"))
            slots.append(slot)
            rho[slot] = 1.0 / ys
            h_diag = ys / yy
        else:
            yield _ops(Op("drop", f"s{slot}"), Op("drop", f"y{slot}"))
        f_old, f = f, f_new
        out.steps = step
        out.losses.append(f)
        (g_max, g_sum) = yield _ops(Op("absmax", "g"), Op("abssum", "g"))
        if not math.isfinite(g_max):
            out.loss = f
            yield StepEnd(step, f)
            return diverged(f"the gradient after step {step} holds NaN or Inf")
        if step == settings.steps:
            out.stop = "steps"
        elif evals >= max_evals:
            out.stop = "evals"
        elif g_max <= settings.tolerance_grad:
            out.stop = "gradient"
        elif d_max * abs(t) <= settings.tolerance_change:
            out.stop = "step size"
        elif abs(f - f_old) < settings.tolerance_change:
            out.stop = "loss change"
        state = {
            "step": step, "loss": f, "g_sum": g_sum, "evals": evals, "batch": batch,
            "slots": list(slots), "rho": {str(k): v for k, v in rho.items()},
            "h_diag": h_diag, "losses": list(out.losses), "stop": out.stop,
        }  # fmt: skip
        yield StepEnd(step, f, state)
        if out.stop:
            break
    # No step taken (steps=0, or resumed at the last step): the limit is why it stopped.
    out.stop = out.stop or "steps"
    out.loss, out.function_evals = f, evals
    return out


def cubic_minimum(
    t1: float, f1: float, g1: float, t2: float, f2: float, g2: float, lo: float, hi: float
) -> float:
    """The minimiser in ``[lo, hi]`` of the cubic through ``(t1, f1)`` and ``(t2, f2)`` with
    slopes ``g1``, ``g2`` (Nocedal & Wright, eq. 3.59); the middle of the interval when the
    cubic has no minimum."""
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = d1 * d1 - g1 * g2
    if disc < 0:
        return (lo + hi) / 2.0
    d2 = math.copysign(math.sqrt(disc), t2 - t1)
    t = t2 - (t2 - t1) * (g2 + d2 - d1) / (g2 - g1 + 2.0 * d2)
    return min(max(t, lo), hi) if math.isfinite(t) else (lo + hi) / 2.0


@dataclass
class _Point:
    t: float
    f: float
    gtd: float
    grad: str  # name of the vector holding the gradient there

    @property
    def bad(self) -> bool:
        """A NaN or Inf loss there: too far, whatever the Wolfe conditions would say. (The
        slope is not judged: a dot product of huge finite vectors may overflow to NaN.)"""
        return not math.isfinite(self.f)


def strong_wolfe(
    f0: float, gtd0: float, t: float, batch: int, settings: Settings
) -> Generator[Request, object, tuple[float, float, str, int]]:
    """Line search from ``"x"`` along ``"d"`` for a step ``t`` meeting the strong Wolfe
    conditions (sufficient decrease c1 = 1e-4, curvature c2 = 0.9). Returns the loss there, the
    step, the name of the vector holding the gradient there, and the evaluations it took.

    A point where the loss or the slope is NaN or Inf is taken as too far: the step shrinks
    towards the last finite one. If no point tried was finite, the loss returned is NaN (the
    caller stops: the run diverged)."""
    c1, c2 = 1e-4, 0.9
    evals = 0
    finite = False  # whether any point tried was not ``bad``

    def probe(t: float) -> Generator[Request, object, _Point]:
        nonlocal evals, finite
        yield _ops(Op("copy", "x", "w"), Op("axpy", "d", "w", alpha=t))
        f = yield Evaluate(batch)
        evals += 1
        name = f"ls{evals}"  # each probe's gradient under a name of its own, dropped at the end
        (gtd,) = yield _ops(Op("copy", "gw", name), Op("dot", "gw", "d"))
        point = _Point(t, float(f), gtd, name)
        finite = finite or not point.bad
        return point

    def done(point: _Point) -> Generator[Request, object, tuple[float, float, str, int]]:
        drops = [Op("drop", f"ls{i}") for i in range(1, evals + 1)]
        yield _ops(Op("copy", point.grad, "g_new"), *drops)
        return point.f, point.t, "g_new", evals

    (d_max,) = yield _ops(Op("absmax", "d"))
    prev = _Point(0.0, f0, gtd0, "g")
    new = yield from probe(t)
    while True:
        if new.bad or new.f > f0 + c1 * new.t * gtd0 or (evals > 1 and new.f >= prev.f):
            low, high = prev, new
            break
        if abs(new.gtd) <= -c2 * gtd0:
            return (yield from done(new))
        if new.gtd >= 0:
            low, high = new, prev
            break
        if evals >= settings.max_ls:
            return (yield from done(new))
        # Extrapolate: a longer step, between a little and ten times longer.
        lo, hi = new.t + 0.01 * (new.t - prev.t), new.t * 10.0
        t_next = cubic_minimum(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd, lo, hi)
        prev = new
        new = yield from probe(t_next)
    # Zoom: keep a bracket (low, high) around an acceptable step; low has the lower loss.
    if not high.bad and high.f < low.f:
        low, high = high, low
    while evals < settings.max_ls:
        width = abs(high.t - low.t)
        if width * d_max < settings.tolerance_change:
            break
        a, b = min(low.t, high.t), max(low.t, high.t)
        if high.bad:  # nothing to interpolate with: halve the step
            t = (low.t + high.t) / 2.0
        else:
            t = cubic_minimum(low.t, low.f, low.gtd, high.t, high.f, high.gtd, a, b)
            # Keep away from the ends: a point at an end teaches nothing.
            t = min(max(t, a + 0.1 * width), b - 0.1 * width)
        new = yield from probe(t)
        if new.bad or new.f > f0 + c1 * new.t * gtd0 or new.f >= low.f:
            high = new
        else:
            if abs(new.gtd) <= -c2 * gtd0:
                return (yield from done(new))
            if new.gtd * (high.t - low.t) >= 0:
                high = low
            low = new
    if not finite:
        low = _Point(0.0, math.nan, math.nan, "g")  # only NaN or Inf met: the caller stops
    return (yield from done(low))


# ------------------------------------------------------------------------------ in one process


def run_op(vectors: dict[str, torch.Tensor], op: Op) -> float | None:
    """Apply one op to named vectors (any slice of them: a shard runs this on its own);
    returns the partial reduction for reduction ops. Never changes a tensor in place."""
    kind = op.kind
    if kind == "copy":
        vectors[op.b] = vectors[op.a]
    elif kind == "scale":
        vectors[op.b] = vectors[op.a] * op.alpha
    elif kind == "axpy":
        vectors[op.b] = torch.add(vectors[op.b], vectors[op.a], alpha=op.alpha)
    elif kind == "mul":
        vectors[op.b] = vectors[op.b] * vectors[op.a]
    elif kind == "drop":
        vectors.pop(op.a, None)
    elif kind == "dot":
        return float(torch.dot(vectors[op.a], vectors[op.b]))
    elif kind == "absmax":
        v = vectors[op.a]
        return float(v.abs().max()) if v.numel() else 0.0
    elif kind == "abssum":
        return float(vectors[op.a].abs().sum())
    else:
        raise ValueError(f"unknown vector op {kind!r}")
    return None


REDUCE = {"dot": sum, "abssum": sum, "absmax": max}
"""How the partial results of each reduction op combine over shards."""


def reduce_results(kinds: list[str], partials: list[list[float]]) -> list[float]:
    """Combine per-shard partial results (one list per shard, in op order) into the scalars
    the algorithm asked for; ``kinds`` are the reduction ops' kinds, in order."""
    return [REDUCE[k]([p[i] for p in partials]) for i, k in enumerate(kinds)]


def minimize(
    closure: Callable[[torch.Tensor, int], tuple[float, torch.Tensor]],
    x0: torch.Tensor,
    settings: Settings,
) -> tuple[torch.Tensor, Outcome]:
    """Run :func:`lbfgs` with every vector in this process: ``closure(w, batch)`` returns the
    loss and gradient at ``w``. The single-process reference the distributed run must match."""
    vectors = {"x": x0.clone()}
    algo = lbfgs(settings)
    reply: object = None
    try:
        while True:
            request = algo.send(reply)
            if isinstance(request, StepEnd):
                reply = None
            elif isinstance(request, Evaluate):
                f, grad = closure(vectors["w"], request.batch)
                vectors["gw"] = grad
                reply = f
            else:
                reply = [r for op in request.ops if (r := run_op(vectors, op)) is not None]
    except StopIteration as stop:
        return vectors["x"], stop.value
