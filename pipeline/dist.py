"""Data-parallel helpers of the training workers: sums over the workers, and where they run.

Each is a no-op in a single process, so the training loop and its tests run without a process
group; under Ray Train's DDP (gloo on CPU, NCCL on GPU) they sum over the workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_sum(joint: torch.Tensor) -> torch.Tensor:
    """Sum of ``joint`` over the data-parallel workers, differentiable (a ``losses.JointSum``).

    Every worker then computes the same loss from the same global P. The backward pass sums
    dL/dP over the workers (W times the common value) and DDP divides the parameter gradients
    by W again, so the result is the gradient of the global-batch loss.
    """
    if not _distributed() or dist.get_world_size() == 1:
        return joint
    return _SummedOverWorkers.apply(joint)


class _SummedOverWorkers(torch.autograd.Function):
    """A differentiable sum over the workers on the stable c10d ``all_reduce``:
    ``torch.distributed.nn.functional.all_reduce`` is deprecated, and the functional
    collectives it points to aborted a gloo worker here at process-group teardown. The
    gradient of a sum that every worker computes is the sum of the workers' gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the workers, in place (no gradient); ``t`` itself in one process."""
    if _distributed():
        dist.all_reduce(t)
    return t


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (the model itself in one process)."""
    return model.module if hasattr(model, "module") else model


def outside_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The network, to run without DDP, with rank 0's buffers on every worker.

    DDP's forward broadcasts rank 0's buffers (batch norm statistics; each worker updated its
    own in its last step): a collective, which a worker with fewer batches to score would not
    join. Broadcast once here instead, so every worker scores with the checkpoint's buffers.
    """
    if _distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return unwrapped(model)


def worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every worker, by rank (where the run actually ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not _distributed():
        return [node]
    nodes: list = [None] * world_size
    dist.all_gather_object(nodes, node)
    return nodes
