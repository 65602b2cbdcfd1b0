"""Dense IID loss: FFT correlation against the direct conv2d formulation, at Potsdam settings.

Prints forward+backward time of the uncollapsed loss for both formulations, their largest
difference in value, and the loss time as a fraction of the segmentation network's own
forward+backward on the same batch.

    .venv/bin/python bench/loss.py                      # batch 75 (Potsdam-3), C=24, T=10, 200 px
    .venv/bin/python bench/loss.py --batch 8 --net-batch 2
"""

from __future__ import annotations

import argparse
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.losses import displacement_joints, iid_segmentation_loss
from pipeline.models import SegmentationNet


def smooth_maps(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    """Spatially coherent logits (upsampled coarse noise), like a trained net's, not white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, size // 8, size // 8, generator=g) * 4
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time over repeats (the least disturbed by the rest of the machine)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def loss_step(logits: torch.Tensor, pair: torch.Tensor, half_window: int, method: str):
    def run():
        x = logits.clone().requires_grad_(True)
        out = iid_segmentation_loss(
            x.softmax(1), pair, lamb=1.0, half_window=half_window, method=method
        )
        out.loss.backward()
        return out.loss.item(), x.grad

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=75, help="pairs per batch (Potsdam-3 uses 75)")
    ap.add_argument("--classes", type=int, default=24, help="C, head A of Potsdam-3")
    ap.add_argument("--half-window", type=int, default=10, help="T")
    ap.add_argument("--size", type=int, default=200, help="map side in pixels")
    ap.add_argument("--bands", type=int, default=4, help="network input bands (RGBIR)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--net-batch",
        type=int,
        default=None,
        help="time the network on this many images and scale linearly to --batch "
        "(default: the same batch, no scaling)",
    )
    args = ap.parse_args()
    n, c, t, s = args.batch, args.classes, args.half_window, args.size
    torch.set_grad_enabled(True)

    logits = smooth_maps(n, c, s, seed=0)
    pair = smooth_maps(n, c, s, seed=0).add_(smooth_maps(n, c, s, seed=1) * 0.3).softmax(1)

    # warm up both code paths on one image so one-off allocations do not count
    for method in ("fft", "conv"):
        loss_step(logits[:1], pair[:1], t, method)()

    t_fft, (v_fft, g_fft) = timed(loss_step(logits, pair, t, "fft"), args.repeats)
    t_conv, (v_conv, g_conv) = timed(loss_step(logits, pair, t, "conv"), args.repeats)

    with torch.no_grad():
        probs = logits.softmax(1)
        j_fft = displacement_joints(probs, pair, t, "fft")
        j_conv = displacement_joints(probs, pair, t, "conv")
    joint_err = ((j_fft - j_conv).abs().max() / j_conv.abs().max()).item()
    grad_err = ((g_fft - g_conv).abs().max() / g_conv.abs().max()).item()

    net = SegmentationNet(args.bands, n_clusters_a=c, n_clusters_b=3)
    net_n = args.net_batch or n
    x = torch.randn(net_n, args.bands, s, s)

    def net_step():
        net.zero_grad()
        (probs,) = net(x, head="A")
        probs.sum().backward()

    t_net, _ = timed(net_step, 1)
    t_net_batch = t_net * n / net_n
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, peak RSS {rss:.1f} GB"
    )
    print(
        f"setting: batch {n}, C={c}, T={t} ({(2 * t + 1) ** 2} displacements), {s}x{s} maps, "
        "uncollapsed, forward+backward, best of "
        f"{args.repeats}"
    )
    print(f"{'formulation':<28}{'seconds':>10}{'loss value':>16}")
    print(f"{'FFT correlation (default)':<28}{t_fft:>10.3f}{v_fft:>16.9f}")
    print(f"{'direct conv2d (reference)':<28}{t_conv:>10.3f}{v_conv:>16.9f}")
    print(f"speed-up: {t_conv / t_fft:.1f}x")
    print(
        f"largest difference: loss {abs(v_fft - v_conv):.2e} nats; joints {joint_err:.1e} and "
        f"gradients {grad_err:.1e} relative to their largest entry"
    )
    scaled = "" if net_n == n else f" (measured on {net_n} images, scaled x{n / net_n:g})"
    print(
        f"network forward+backward: {t_net_batch:.2f} s{scaled}; "
        f"FFT loss = {t_fft / t_net_batch:.1%} of it, conv loss = {t_conv / t_net_batch:.1%}"
    )


if __name__ == "__main__":
    main()
