"""Beyond one machine: a real two-node Ray cluster on this host (a head with the dashboard's job
server, and a second node with its own raylet), a training job submitted with the `ray job
submit` client as users submit it, its 2 workers spread one per node, pairs made by Ray Data
actors, shards read and checkpoints written through storage URIs both nodes reach."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.checkpoint import load as load_checkpoint
from tests.conftest import free_port, small_synthetic

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = shutil.which("ray", path=str(BIN))


@pytest.fixture
def two_nodes(monkeypatch):
    """(cluster, dashboard address) of a head (2 CPUs, job server) plus a second node."""
    from ray.cluster_utils import Cluster

    # The job's entrypoint runs `iid` from PATH, as on a cluster image with the project installed.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # A token-authenticated cluster would need the token handed to the CLI; not the point here.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.shutdown()  # a local cluster another test started in this process
    # That cluster was a loopback one (pipeline.loopback); nodes of a real cluster have network
    # addresses, and Ray's own process-group set-up runs there.
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    port = free_port()
    head = {"num_cpus": 2, "include_dashboard": True, "dashboard_port": port}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    # Separate machines have separate runtime-env folders; on one host the second node needs its
    # own, or it deletes the job's unpacked working dir (the driver's cwd) when its workers exit.
    cluster.add_node(num_cpus=2, runtime_env_dir_name="node2_runtime_resources")
    cluster.wait_for_nodes()
    yield cluster, f"http://127.0.0.1:{port}"
    cluster.shutdown()


def job_config(tmp_path: Path) -> dict:
    return {
        "data": {
            # URIs, as s3:// or gs:// would be on a real cluster (the same pyarrow code path).
            "shards": f"file://{tmp_path}/data/shards",
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
            "storage_path": f"file://{tmp_path}/shared",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    }


@pytest.mark.slow
@pytest.mark.skipif(RAY is None, reason="the `ray` command is not installed beside python")
def test_submitted_job_trains_one_worker_per_node(two_nodes, tmp_path):
    cluster, dashboard = two_nodes
    small_synthetic(tmp_path / "data", seed=2)  # job_config reads {tmp_path}/data/shards
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_config(tmp_path)))

    # As the README has it: the project folder is the job's working dir, uploaded by Ray.
    cmd = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT)]
    cmd += ["--", "iid", "train", "--config", str(tmp_path / "job.yaml")]
    job = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "run two-nodes: epoch 1 of 1" in out  # the job's own output, streamed back

    report = json.loads((tmp_path / "shared" / "two-nodes" / "report.json").read_text())
    # Checkpoints went to the storage URI, where any node can resume from them.
    assert report["checkpoint"].startswith(f"file://{tmp_path}/shared/two-nodes/checkpoint_")
    state = load_checkpoint(report["checkpoint"])
    # One worker per node: the ranks report different Ray nodes, both of this cluster.
    nodes = {node.node_id for node in cluster.list_all_nodes()}
    assert len(nodes) == 2 and len(state["nodes"]) == 2
    assert len(set(state["nodes"])) == 2, f"both workers on node {state['nodes'][0]}"
    assert set(state["nodes"]) <= nodes
    assert state["history"][-1]["n_nodes"] == 2
