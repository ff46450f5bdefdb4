"""The cluster contract (cluster.py): what each node of a run on several is told."""

from __future__ import annotations

import json

import pytest

from cloudtrain.cluster import node_environment, port_base


def test_every_node_is_told_the_same_cluster_and_its_own_index() -> None:
    addresses = ["10.0.1.7", "10.0.1.8", "10.0.1.9"]
    envs = [node_environment("job-20261207-010000-abcd", rank, addresses) for rank in range(3)]
    configs = [json.loads(env["TF_CONFIG"]) for env in envs]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": k} for k in range(3)]
    workers = configs[0]["cluster"]["worker"]
    assert [w.rsplit(":", 1)[0] for w in workers] == addresses
    base = port_base("job-20261207-010000-abcd")
    assert [int(w.rsplit(":", 1)[1]) for w in workers] == [base, base + 1, base + 2]  # no two share one
    assert [env["CLOUDTRAIN_NODE_RANK"] for env in envs] == ["0", "1", "2"]
    assert {env["CLOUDTRAIN_NUM_NODES"] for env in envs} == {"3"}
    assert {env["CLOUDTRAIN_NODE_ADDRS"] for env in envs} == {"10.0.1.7,10.0.1.8,10.0.1.9"}


def test_ports_are_drawn_per_run_within_their_range() -> None:
    bases = {port_base(f"job-20261207-0100{i:02d}-abcd") for i in range(60)}
    assert len(bases) > 50  # two runs on one machine (dry-runs) rarely meet
    assert all(b >= 20000 and b + 16 < 40000 for b in bases)
    assert port_base("a-20261207-010000-abcd") == port_base("a-20261207-010000-abcd")


def test_a_rank_outside_the_cluster_is_a_bug() -> None:
    with pytest.raises(ValueError):
        node_environment("r", 2, ["10.0.0.1", "10.0.0.2"])
