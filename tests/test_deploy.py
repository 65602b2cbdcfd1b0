"""Cluster configs: the launcher files pass the schema that ships with Ray, and the KubeRay
manifest names the image, the entrypoint and the GPU resources."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.mark.parametrize("name", ["cluster.yaml", "deploy/cluster-onprem.yaml"])
def test_launcher_configs_pass_rays_schema(name):
    schema = json.loads(SCHEMA.read_text())
    config = yaml.safe_load((ROOT / name).read_text())
    jsonschema.validate(config, schema)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert any("ray start --head" in c for c in starts)
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in starts)
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])
    assert any("mlflow server" in c for c in config["head_start_ray_commands"])


def test_schema_rejects_a_broken_launcher_config():
    schema = json.loads(SCHEMA.read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_aws_cluster_has_gpu_workers_on_the_ray_image():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-")
    assert config["docker"]["image"].endswith("-gpu")
    workers = [
        t for n, t in config["available_node_types"].items() if n != config["head_node_type"]
    ]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)


def test_kuberay_job_names_image_entrypoint_and_gpus():
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("iid train --config configs/")
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"]
    groups = spec["workerGroupSpecs"]
    container = groups[0]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert (ROOT / job["spec"]["entrypoint"].split()[3]).is_file()  # the config it names exists
