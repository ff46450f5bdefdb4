"""The cluster contract of a run on several nodes: what each node's job environment says.

On every node of a run with ``resources.nodes: N > 1``: ``TF_CONFIG`` (tf.distribute's
own: the workers by private address and port, this node's index), and the
framework-neutral ``CLOUDTRAIN_NODE_RANK``, ``CLOUDTRAIN_NUM_NODES`` and
``CLOUDTRAIN_NODE_ADDRS`` (the nodes' private addresses, comma-separated, in rank order).
Node 0 is the chief: its outputs and checkpoints come home.

Ports: TensorFlow's gRPC server listens on every interface at its task's port, so nodes
sharing one machine (a dry-run's simulated hosts, each on its own 127.0.0.N) must not
share a port: node K listens on ``port_base(run_id) + K``, the base drawn from the run id
(20000 to 39999), so that two runs on one machine are unlikely to meet. On AWS the run's
security group lets its members reach each other on every port.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

NODE_RANK_ENV = "CLOUDTRAIN_NODE_RANK"
NUM_NODES_ENV = "CLOUDTRAIN_NUM_NODES"
NODE_ADDRS_ENV = "CLOUDTRAIN_NODE_ADDRS"
PORT_FROM, PORT_SPAN = 20000, 20000


def port_base(run_id: str) -> int:
    """Node 0's port; node K's is this plus K."""
    digest = int(hashlib.sha256(run_id.encode()).hexdigest()[:8], 16)
    return PORT_FROM + digest % (PORT_SPAN - 64)  # room for 16 nodes (and some) above it


def node_environment(run_id: str, rank: int, addresses: Sequence[str]) -> dict[str, str]:
    """The variables node ``rank`` of the nodes at ``addresses`` (private, in rank order) gets."""
    if not 0 <= rank < len(addresses):
        raise ValueError(f"node {rank} of {len(addresses)}")
    base = port_base(run_id)
    workers = [f"{address}:{base + k}" for k, address in enumerate(addresses)]
    return {
        "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}),
        NODE_RANK_ENV: str(rank),
        NUM_NODES_ENV: str(len(addresses)),
        NODE_ADDRS_ENV: ",".join(addresses),
    }
