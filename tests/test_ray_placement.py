"""The Ray runtime's placement of actors on nodes (``ray_placement``). Pure: nothing here
needs Ray, so these run where Ray is not installed."""

from __future__ import annotations

import pytest

from distbelief.runtime.ray.placement import plan_placement, replace_node

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
