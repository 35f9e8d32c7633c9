"""Where the Ray runtime puts each actor: a pure function of actor names and node ids.

The rule, in the paper's terms: a model replica is partitioned *across machines*, so the stages
of one replica go to distinct nodes whenever there are enough of them, and the parameter server's
shards are spread over the nodes too. Names carry the structure: an actor called
``"<group>.<member>"`` (``"replica1.stage0"``) belongs to a group, every other actor
(``"shard0"``, ``"data1"``, ``"master"``) stands alone. Members of group *g* (numbered in the
order groups first appear) take nodes ``(g + m) % N``, so no two members of a group share a node
when ``N`` is at least the group's size and successive groups start on successive nodes; lone
actors take nodes round-robin in spawn order. A stage's partitions (``"replica1.stage0.part2"``)
are the members of the group ``"replica1.stage0"``, so the blocks of one stage, which work on
the same mini-batch at once, take distinct nodes where there are enough. Nothing here imports
Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

STRATEGIES = ("spread", "pack")


def plan_placement(
    names: Sequence[str],
    nodes: Sequence[str],
    strategy: str | Mapping[str, str] = "spread",
    *,
    taken: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign every actor in ``names`` (in spawn order) a node from ``nodes``.

    ``nodes`` lists node ids, the driver's node first. ``strategy`` is ``"spread"`` (the rule in
    the module docstring), ``"pack"`` (all on the driver's node) or a mapping from actor name to
    node id that pins those actors; actors it does not name are spread. ``taken`` holds actors
    placed earlier in the same run (name -> node); they count for the round-robin and the groups.
    """
    if not nodes:
        raise ValueError("placement: the cluster has no live node")
    pins: Mapping[str, str] = {}
    if isinstance(strategy, Mapping):
        pins = strategy
        unknown = sorted(set(pins.values()) - set(nodes))
        if unknown:
            raise ValueError(f"placement: pinned to nodes that are not alive: {unknown}")
    elif strategy not in STRATEGIES:
        raise ValueError(
            f"placement: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} "
            "or pass {actor name: node id}"
        )
    taken = dict(taken or {})
    plan: dict[str, str] = {}
    groups: dict[str, int] = {}
    lone = 0
    for name in [*taken, *names]:
        group, member = _split(name)
        if group is not None and group not in groups:
            groups[group] = len(groups)
        if name in taken:
            lone += group is None
            continue
        if name in pins:
            plan[name] = pins[name]
        elif strategy == "pack":
            plan[name] = nodes[0]
        elif group is None:
            plan[name] = nodes[lone % len(nodes)]
        else:
            plan[name] = nodes[(groups[group] + member) % len(nodes)]
        lone += group is None
    return plan


def replace_node(
    name: str, nodes: Sequence[str], placed: Mapping[str, str], previous: str | None
) -> str:
    """A node for an actor that is restarted: its previous node if still alive, else a live node
    that no other member of its group uses (else the least used one)."""
    if not nodes:
        raise ValueError("placement: the cluster has no live node")
    if previous in nodes:
        return previous
    group, _ = _split(name)
    peers = [n for a, n in placed.items() if a != name and group and _split(a)[0] == group]
    load = {n: sum(1 for v in placed.values() if v == n) for n in nodes}
    return min(nodes, key=lambda n: (peers.count(n), load[n]))


def _split(name: str) -> tuple[str | None, int]:
    """``"replica1.stage2"`` -> ``("replica1", 2)``; a name without a dot -> ``(None, 0)``."""
    group, dot, member = name.rpartition(".")
    if not dot:
        return None, 0
    digits = "".join(c for c in member if c.isdigit())
    return group, int(digits) if digits else 0
