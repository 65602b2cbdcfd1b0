"""The joint P is the global batch's under data parallelism: two gloo processes, each holding
half the batch, must get the loss and (after DDP's gradient averaging) the gradient that one
process gets from the whole batch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.dist import global_sum
from pipeline.losses import iid_clustering_loss, iid_segmentation_loss

N, FEATURES, CLUSTERS = 12, 5, 4


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, FEATURES, 6, 6, generator=gen)
    x[N // 2 :] += 2.0  # the two workers' halves differ, as real shards do
    gx = x + 0.3 * torch.randn(x.shape, generator=gen)
    weight = torch.randn(CLUSTERS, FEATURES, generator=gen)
    return x, gx, weight


def _predict(weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("cf,nfhw->nchw", weight, v).softmax(1)


def _loss(x, gx, weight, task: str, joint_sum):
    p, q = _predict(weight, x), _predict(weight, gx)
    if task == "clustering":
        return iid_clustering_loss(p.mean((2, 3)), q.mean((2, 3)), 1.5, joint_sum).loss
    return iid_segmentation_loss(p, q, lamb=1.5, half_window=2, joint_sum=joint_sum).loss


def _masked_loss(x, gx, weight, mask, joint_sum) -> float:
    p, q = _predict(weight, x), _predict(weight, gx)
    return iid_segmentation_loss(p, q, mask, 1.5, 2, joint_sum=joint_sum).loss.item()


def _reference(task: str) -> tuple[float, torch.Tensor]:
    x, gx, weight = _inputs()
    weight.requires_grad_(True)
    loss = _loss(x, gx, weight, task, None)
    loss.backward()
    return loss.item(), weight.grad


TASKS = ("clustering", "segmentation")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # Loopback only, and a TCP store held by the parent, as Ray Train's workers rendezvous:
    # a file:// store aborted a worker (SIGABRT) in CI.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    out: dict = {}
    try:
        x, gx, weight = _inputs()
        share = slice(rank * N // world, (rank + 1) * N // world)
        for task in TASKS:
            w = weight.clone().requires_grad_(True)
            loss = _loss(x[share], gx[share], w, task, global_sum)
            loss.backward()
            grad = w.grad.clone()
            dist.all_reduce(grad)  # what DDP does with parameter gradients: the mean
            out[task] = (loss.item(), grad / world)
        # Masks: rank 1 has no valid pixel (an affine pushed every view out), then neither has.
        mine = torch.full((len(x[share]), 6, 6), float(rank == 0))
        args = (x[share], gx[share], weight)
        out["one empty"] = _masked_loss(*args, mine, global_sum)
        out["all empty"] = _masked_loss(*args, torch.zeros_like(mine), global_sum)
    finally:
        dist.destroy_process_group()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("gloo")
    # The parent holds the store's server on a free port, so no port is guessed.
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    mp.spawn(_worker, args=(2, store.port, str(out_dir)), nprocs=2)
    out = {}
    for rank in (0, 1):
        for key, value in torch.load(out_dir / f"rank{rank}.pt", weights_only=True).items():
            out[rank, key] = value
    return out


@pytest.mark.parametrize("task", TASKS)
def test_two_workers_get_the_whole_batch_loss_and_gradient(task, two_workers):
    ref_loss, ref_grad = _reference(task)
    for rank in (0, 1):
        loss, grad = two_workers[rank, task]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # Without the global sum each worker's loss is its half's, which differs from the whole:
    x, gx, weight = _inputs()
    half = _loss(x[: N // 2], gx[: N // 2], weight, task, None).item()
    assert half != pytest.approx(ref_loss, rel=1e-2)


def test_global_sum_is_the_identity_outside_a_process_group():
    joint = torch.rand(3, 3)
    assert global_sum(joint) is joint


def test_an_empty_mask_on_one_worker_leaves_the_others_pixels_and_no_worker_waiting(two_workers):
    x, gx, weight = _inputs()
    half = N // 2
    # rank 0's pixels alone, as one process would score them
    alone = _masked_loss(x[:half], gx[:half], weight, torch.ones(half, 6, 6), None)
    assert two_workers[0, "one empty"] == pytest.approx(alone, rel=1e-5)
    assert two_workers[1, "one empty"] == pytest.approx(alone, rel=1e-5)
    # No pixel anywhere: NaN on every worker alike (training stops them all), not a raise on
    # one worker while its peer waits in all_reduce.
    assert math.isnan(two_workers[0, "all empty"]) and math.isnan(two_workers[1, "all empty"])
    with pytest.raises(ValueError, match="no valid pixel"):  # one process: a plain error
        _masked_loss(x[:half], gx[:half], weight, torch.zeros(half, 6, 6), None)
