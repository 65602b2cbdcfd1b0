"""A local Ray cluster that nobody on the network can reach: every process of it, and the
training workers' process group, listens on loopback (127.0.0.1) only; and joining a cluster
(``RAY_ADDRESS``) with the authentication token it expects.

A cluster the user joins is left as its operator set it up; the loopback cluster is the one
``iid`` starts by itself on one machine.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from pipeline.config import ConfigError

LOOPBACK = "127.0.0.1"
# Where Ray's processes ask the state API (the dashboard) about the cluster.
API_SERVER = "RAY_API_SERVER_ADDRESS"

# Rank 0's rendezvous store, kept alive for as long as the worker's process group lives.
_store: dist.TCPStore | None = None


def start_local(dashboard: bool = True, **options: Any) -> Any:
    """Start a Ray cluster of this machine alone, on loopback (``ray.init``).

    ``address="local"`` starts a new cluster even where a ``ray start`` cluster runs on the
    machine (``ray.init`` would join that one, and then refuse ``num_cpus``); joining a cluster
    is ``RAY_ADDRESS``'s job.

    Args:
        dashboard: start the dashboard, whose state API Ray Train needs (its placement-group
            cleaner asks it whether a run's controller still lives); batch inference does not.
        options: ``ray.init``'s other arguments (``num_cpus``, ``log_to_driver``, ...).

    Returns:
        What ``ray.init`` returns.
    """
    _keep_loopback()
    local = {"address": "local", "_node_ip_address": LOOPBACK, "include_dashboard": dashboard}
    if not dashboard:
        return ray.init(**local, **options)
    # Ray's processes look for the state API in the cluster `ray start` started last
    # (/tmp/ray/ray_current_cluster) or, with none, the only gcs_server running. With a `ray
    # start` cluster on the machine, the placement-group cleaner asked that cluster whether
    # this run's controller lived, heard no, and could remove the run's placement group (its
    # workers die); beside another local cluster it found two and gave up. Every process of
    # this cluster inherits the variable from the raylet; the driver's environment is put back
    # so that a command it starts later (`ray job submit --address ...`) is not sent here.
    port = _free_port()
    before = os.environ.get(API_SERVER)
    os.environ[API_SERVER] = f"http://{LOOPBACK}:{port}"
    try:
        return ray.init(**local, dashboard_port=port, **options)
    finally:
        if before is None:
            del os.environ[API_SERVER]
        else:
            os.environ[API_SERVER] = before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def join_cluster(address: str) -> None:
    """Before ``ray.init`` joins ``address`` (``RAY_ADDRESS``): a cluster on this machine's
    loopback (another ``iid`` command's, a ``ray start``, or ``ray job submit``'s driver on
    one) is joined on loopback, with this machine's authentication token.

    Ray would otherwise look for it at the machine's network address, where nothing listens,
    and retry for minutes; and it sends its token only to a local cluster it finds by itself
    (``ray.init()``), never to an address it is given, so a cluster started with token
    authentication (``ray start`` does whenever ``~/.ray/auth_token`` exists) refused the join.
    """
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]")
    if host == "localhost" or host.startswith("127.") or host == "::1":
        _keep_loopback()
        _use_own_token()


def check_token(address: str, timeout_s: float = 10.0) -> None:
    """The Ray cluster whose GCS listens at ``address`` (``host:port``) accepts this process's
    authentication, or needs none; asked once, so a refusal is one line before work starts
    (``ray.init`` retries it for half a minute, a log line a second, then reports a failed
    connection). Any other answer (a cluster still starting, TLS) is left to ``ray.init``.

    Args:
        address: the GCS address, as ``RAY_ADDRESS`` gives it (not a ``ray://`` client one).
        timeout_s: how long to wait for the answer.

    Raises:
        ConfigError: one line naming the address and where the token comes from.
    """
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        _get_authentication_metadata_tuple,
    )
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    where = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
    token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
    if token_mode and not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise ConfigError(f"RAY_AUTH_MODE=token, but no authentication token is in {where}")
    metadata = _get_authentication_metadata_tuple()
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
            if metadata:
                raise ConfigError(
                    f"RAY_ADDRESS: the Ray cluster at {address} refused this process's "
                    f"authentication token (from {where}); give it the cluster's token "
                    "(`ray get-auth-token` on its head prints it)"
                ) from None
            raise ConfigError(
                f"RAY_ADDRESS: the Ray cluster at {address} requires an authentication token "
                f"and this process sends none; set RAY_AUTH_MODE=token and the cluster's token "
                f"in {where} (`ray get-auth-token` on its head prints it)"
            ) from None


def _use_own_token() -> None:
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    # What Ray's own ray.init() does for the local cluster it discovers (without its warning,
    # which is not the user's business here): the token stays on this machine. An explicit
    # RAY_AUTH_MODE is the user's choice and is kept.
    if "RAY_AUTH_MODE" not in os.environ and AuthenticationTokenLoader.instance().has_token(
        ignore_auth_mode=True
    ):
        _enable_token_auth()


def _keep_loopback() -> None:
    from ray._private import ray_constants

    # Ray binds its gRPC servers (GCS, raylet, object manager, every worker) to all interfaces
    # unless the node's address is loopback, and rewrites a loopback address (the node's or
    # one to join) into the machine's network address unless this flag
    # (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, off by default on macOS and Windows for the same
    # reason) is off. Only the driver reads it: the processes Ray starts are handed the
    # address. Set on the module because Ray read the environment when it was imported;
    # tests/test_trust.py checks the sockets themselves, so a Ray upgrade that moves this flag
    # fails there rather than silently opening the ports.
    ray_constants.ENABLE_RAY_CLUSTER = False


def torch_config() -> TorchConfig:
    """Ray Train's ``TorchConfig`` for ``TorchTrainer``: the same process group (gloo on CPU,
    NCCL on GPU), set up on loopback when the cluster is one ``start_local`` started."""
    return _LoopbackTorchConfig()


class _LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    """On a loopback node, the workers' rendezvous goes through a store that rank 0 opens on a
    127.0.0.1 socket, and gloo and NCCL bind the loopback interface. Ray's own set-up would
    have torch's ``TCPStore`` listen on every interface of rank 0 (its listening address cannot
    be chosen, only a bound socket handed over) and gloo on the address the host name resolves
    to. Anywhere else (a joined cluster, several nodes) it is Ray's set-up unchanged."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        # This runs in Ray Train's controller: a node whose address is loopback belongs to a
        # cluster that no other machine can join (``start_local``).
        if ray.util.get_node_ip_address() != LOOPBACK:
            super().on_start(worker_group, backend_config)
            return
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        timeout_s = backend_config.timeout_s
        port = worker_group.execute_single(
            0, _open_store, world_size=len(worker_group), timeout_s=timeout_s
        )
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK and the rest
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=len(worker_group),
                    port=port,
                    timeout_s=timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )


def _open_store(world_size: int, timeout_s: int) -> int:
    """On rank 0: the rendezvous store, listening on a loopback socket. Returns its port."""
    global _store
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    port = sock.getsockname()[1]
    # The store takes the socket over (and closes it with itself); it must not be garbage.
    _store = dist.TCPStore(
        LOOPBACK,
        port,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )
    return port


def _join_process_group(
    backend: str, world_rank: int, world_size: int, port: int, timeout_s: int
) -> None:
    """On every worker: gloo and NCCL on the loopback interface (unless the user named one),
    then the process group through rank 0's store."""
    lo = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if lo and var not in os.environ:
            os.environ[var] = lo
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # As Ray sets it: a timed-out collective fails the worker instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = _store
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, timeout=timeout)
    dist.init_process_group(
        backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout
    )
