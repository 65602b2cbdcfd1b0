"""Beyond one machine: a real two-node Ray cluster on this host (a head and a second node with
their own raylets), a 2-worker training run spread one worker per node, pairs made by Ray Data
actors, checkpoints on the storage both nodes share."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from pipeline.config import Config
from pipeline.evaluate import CHECKPOINT_FILE
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.synthetic import SceneSpec, prepare_synthetic
from pipeline.train import fit


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a local cluster another test started in this process
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_train_on_two_nodes(two_nodes, tmp_path):
    opts = TilingOptions(tile=32, stride=32, progress=False, test_fraction=0.2)
    prepare_synthetic(tmp_path / "data", opts, SceneSpec(size=256, seed=2), baselines=False)
    cfg = Config.from_dict(
        {
            "data": {
                "shards": str(tmp_path / "data" / "shards"),
                "batch_size": 8,
                "merge": "potsdam3",
                "pairs_on": "actors",
            },
            "model": {"in_channels": 3, "n_clusters_a": 5, "n_clusters_b": 3, "width": 0.125},
            "loss": {"half_window": 3},
            "optim": {"epochs": 1},
            "pairs": {"crop": 24},
            "scaling": {
                "num_workers": 2,
                "cpus_per_worker": 1,
                "pair_cpus": 0.5,
                "placement": "STRICT_SPREAD",
            },
            "run": {
                "name": "two-nodes",
                "storage_path": str(tmp_path / "shared"),
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            },
        }
    )
    result = fit(cfg)

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    state = torch.load(Path(result.checkpoint.path) / CHECKPOINT_FILE, weights_only=False)
    # One worker per node: the ranks report different Ray nodes, both of this cluster.
    assert len(state["nodes"]) == 2
    assert len(set(state["nodes"])) == 2, f"both workers on node {state['nodes'][0]}"
    assert set(state["nodes"]) <= alive
    assert result.metrics["n_nodes"] == 2
    # Checkpoints went to the shared storage path, where any node can resume from them.
    assert Path(result.checkpoint.path).is_relative_to(tmp_path / "shared" / "two-nodes")
