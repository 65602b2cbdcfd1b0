"""Trust: nothing read from a data path runs code, a run's name cannot leave its storage, and a
local run cannot be reached from the network."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CHECKPOINT_FILE, load
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError
from pipeline.loopback import API_SERVER


class Payload:
    """Unpickling this runs a shell command (what a planted checkpoint would carry)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_carries_code_is_refused_unread(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "run" / "checkpoint_000000"
    folder.mkdir(parents=True)
    state = {"model": {}, "epoch": 0, "history": [{"acc": Payload(str(marker))}], "config": {}}
    torch.save(state, folder / CHECKPOINT_FILE)

    refused = r"is not a plain checkpoint, refused unread \(.*GLOBAL posix.system"
    with pytest.raises(ConfigError, match=f"{folder / CHECKPOINT_FILE} {refused}"):
        load(tmp_path / "run")
    assert not marker.exists()

    # `iid evaluate` on the run: one line naming the file, exit 2, nothing run.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli_main(["evaluate", "--model", str(tmp_path / "run"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and CHECKPOINT_FILE in err[0] and "refused unread" in err[0], err
    assert not marker.exists()


class PickledModel(torch.nn.Module):
    """A model whose pickle runs a shell command when loaded."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_registered_models_load_as_weights_and_planted_code_is_refused(tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch

    from pipeline import tracking
    from pipeline.checkpoint import load_model
    from pipeline.config import Config
    from pipeline.models import build_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use(uri)
    cfg = Config.from_dict(
        {
            "data": {"shards": "x"},
            "model": {"in_channels": 3, "n_clusters_a": 4, "n_subheads": 2, "width": 0.125},
            "run": {"name": "good", "experiment": "trust"},
        }
    )
    model = build_model(cfg.model)
    run_id = tracking.run_for(uri, cfg, tmp_path / "runs" / "good")
    info = {"subhead": 1, "names": ["", "", ""]}
    assert (
        tracking.log_report(uri, run_id, cfg, model, {"eval_acc": 0.5}, [], info=info)
        == "models:/good/1"
    )
    for name in ("models:/good/1", "models:/good/latest", f"runs:/{run_id}/model"):
        loaded, loaded_cfg = load_model(name)
        assert loaded_cfg == cfg and not loaded.training
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)

    # A pickled model in the registry (what an attacker with access to MLflow would plant):
    # refused without unpickling it.
    marker = tmp_path / "payload-ran"
    mlflow.set_experiment("trust")
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            PickledModel(str(marker)),
            name="model",
            registered_model_name="pickled",
            serialization_format="pickle",
            pip_requirements=[],
        )
    with pytest.raises(ConfigError, match=r"models:/pickled/1 was not logged by this pipeline"):
        load_model("models:/pickled/1")
    # Weights that carry code instead of tensors: refused unread too.
    folder = tmp_path / "planted"
    folder.mkdir()
    torch.save({"trunk.0.weight": Payload(str(marker))}, folder / tracking.WEIGHTS_FILE)
    (folder / tracking.CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path=tracking.MODEL_DIR)
    with pytest.raises(ConfigError, match=r"weights.pt is not a plain checkpoint, refused unread"):
        load_model(f"runs:/{run.info.run_id}/model")
    assert not marker.exists()


IID = shutil.which("iid", path=str(Path(sys.executable).parent))
RAY = shutil.which("ray", path=str(Path(sys.executable).parent))


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out = [root]
    for pid in out:
        out += children.get(pid, [])
    return out


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6}'s address: 32-bit words in the host's byte order."""
    raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    address = ipaddress.ip_address(raw)
    return getattr(address, "ipv4_mapped", None) or address


def _listening(pids: list[int]) -> dict[tuple[str, int], str]:
    """(address, port) -> the process name, for every TCP socket that ``pids`` listen on."""
    owner = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            name = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = name
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                found[(str(_address(addr)), int(port, 16))] = owner[fields[9]]
    return found


@pytest.fixture(scope="module")
def another_cluster():
    """A ``ray start`` cluster on the machine, as a user's own would be: the one a bare
    ``ray.init`` joins, and the one Ray's processes find when they look for a cluster by
    themselves. Stopped by its own process (``ray stop`` would stop every cluster here)."""
    from ray._common.utils import get_ray_address_file

    from tests.conftest import free_port

    if RAY is None:
        pytest.skip("console script `ray` not installed next to this python")
    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=1"]
        + [f"--dashboard-port={dashboard}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env | {"RAY_AUTH_MODE": "disabled"},
    )
    discovery = Path(get_ray_address_file(None))
    try:
        deadline = time.monotonic() + 120
        while not (discovery.exists() and discovery.read_text().endswith(f":{port}")):
            assert other.poll() is None and time.monotonic() < deadline, "ray start failed"
            time.sleep(0.2)
        yield port
    finally:
        other.terminate()  # --block: stops the cluster's processes as it exits
        other.wait(timeout=60)
        # Ray leaves the discovery file naming the stopped cluster.
        if discovery.exists() and discovery.read_text().endswith(f":{port}"):
            discovery.unlink()


def test_a_local_clusters_processes_ask_it_and_not_another_about_its_actors(
    ray_cluster, another_cluster
):
    """Ray Train's placement-group cleaner asks the state API, from a worker, whether the run's
    controller still lives, and removes the run's placement group (its workers die) when told
    no. With a ``ray start`` cluster on the machine, Ray's processes asked that cluster, which
    knows no such actor."""
    from ray.train.v2._internal.state.util import is_actor_alive

    @ray_cluster.remote(num_cpus=0)
    class Controller:
        def ready(self) -> bool:
            return True

    controller = Controller.remote()
    ray_cluster.get(controller.ready.remote())

    @ray_cluster.remote(num_cpus=0)
    def alive(actor_id: str) -> bool:
        return bool(is_actor_alive(actor_id, timeout=30))

    assert ray_cluster.get(alive.remote(controller._actor_id.hex()), timeout=120)
    ray_cluster.kill(controller)
    # The driver's own environment does not keep it: the commands it starts (`ray job submit
    # --address ...` to another cluster) would be sent to this one.
    dashboard = ray_cluster._private.worker.get_dashboard_url()
    assert dashboard and dashboard not in os.environ.get(API_SERVER, "")


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed next to this python")
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
def test_a_local_run_listens_on_loopback_only(tmp_path, another_cluster):
    """`iid train` on the cluster it starts itself (no RAY_ADDRESS), with 2 workers (a process
    group, its rendezvous store and gloo): every socket any of its processes listens on, sampled
    while it runs, is on loopback; none on 0.0.0.0, :: or the machine's network address. A
    `ray start` cluster already running on the machine is not joined."""
    from tests.conftest import small_run_config

    scaling = "{num_workers: 2, cpus_per_worker: 0.5}"
    config = small_run_config(tmp_path, "loopback", 3, scaling, storage_path=tmp_path / "runs")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # With a `ray start` cluster on the machine (which a bare ray.init would join, and then
    # refuse iid's num_cpus), iid starts its own cluster all the same.
    run = subprocess.Popen(
        [IID, "train", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    seen: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + 600
    while run.poll() is None and time.monotonic() < deadline:
        seen |= _listening(_descendants(run.pid))
        time.sleep(0.2)
    out = run.communicate(timeout=60)[0]
    assert run.returncode == 0, out

    listed = {f"{addr} port {port}": name for (addr, port), name in seen.items()}
    exposed = {
        f"{addr} port {port}": name
        for (addr, port), name in seen.items()
        if not ipaddress.ip_address(addr).is_loopback
    }
    assert not exposed, exposed
    # The sampling saw the cluster and the training workers, not an empty tree.
    names = " ".join(seen.values())
    for process in ("gcs_server", "raylet", "ray::RayTrainWorker", "ray::TrainController"):
        assert process in names, listed


AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def test_joining_a_cluster_on_this_machine_sends_this_machines_token(ray_cluster, tmp_path):
    """The suite's cluster was started with token authentication (as ``ray.init`` and ``ray
    start`` start one whenever ``~/.ray/auth_token`` exists). A second process joins it through
    ``RAY_ADDRESS`` without ``RAY_AUTH_MODE`` set, as a user in another terminal would; Ray sends
    no token to an address it is given, and the cluster refused the join."""
    code = (
        "import ray\n"
        "from pipeline.train import check_cluster, start_ray\n"
        "check_cluster()\n"
        "start_ray()\n"
        "print('answer', ray.get(ray.remote(lambda: 7).remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr
    assert "answer 7" in run.stdout


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed next to this python")
@pytest.mark.parametrize(
    "auth, line",
    [
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
            "refused this process's authentication token (from RAY_AUTH_TOKEN, ",
        ),
        ({}, "requires an authentication token and this process sends none; set RAY_AUTH_MODE"),
        ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token, but no authentication token is in "),
    ],
    ids=["wrong-token", "no-token", "token-mode-without-a-token"],
)
def test_a_cluster_that_refuses_this_process_is_one_line_before_training(
    ray_cluster, tmp_path, auth, line
):
    """Ray itself retries a refused token for half a minute, a log line a second, then reports
    only a failed connection. A home without ``~/.ray/auth_token`` stands for a machine that
    has no token."""
    from tests.conftest import small_run_config

    scaling = "{num_workers: 1, cpus_per_worker: 1}"
    config = small_run_config(tmp_path, "refused", 1, scaling, storage_path=tmp_path / "runs")
    address = ray_cluster.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS} | auth
    env["RAY_ADDRESS"] = address
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if "RAY_AUTH_TOKEN" not in auth:
        env["HOME"] = str(tmp_path)
    run = subprocess.run(
        [IID, "train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    (err,) = run.stderr.splitlines()  # Ray's retries printed a line a second
    assert err.startswith("iid train: error: ") and line in err, err
    if not line.startswith("RAY_AUTH_MODE=token, but"):
        assert f"RAY_ADDRESS: the Ray cluster at {address} " in err
    assert not (tmp_path / "runs" / "refused").exists()
