"""Every figure of the project, as PNG files: a run's (paper Fig. 4 overlays of image /
prediction / ground truth, Fig. 2 joint P(z, z') against the product of its marginals, Fig. 7
cluster masses over epochs, the confusion matrix) and a search's (each metric against each
searched value). Written under temporary names and renamed, next to the checkpoints, so they can
be found without a UI; ``pipeline.tracking`` logs them to MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.evaluate import Evaluation  # noqa: E402
from pipeline.metrics import hungarian_mapping  # noqa: E402
from pipeline.storage import write_json_atomic  # noqa: E402
from pipeline.tune.space import Dimension  # noqa: E402

# A search's trial as its plots see it: sampled values by config path, final metrics, whether
# it was stopped early.
Trial = tuple[dict[str, Any], dict[str, float], bool]


def _save(fig: plt.Figure, path: Path, dpi: int) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def class_palette(n: int) -> np.ndarray:
    """(n, 3) distinct colours in [0, 1]; grey for the ignore value is added by the caller."""
    return plt.get_cmap("tab10" if n <= 10 else "tab20")(np.arange(n) % 20)[:, :3]


def _show_image(ax, image: np.ndarray) -> None:
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    ax.imshow(np.clip(rgb.transpose(1, 2, 0), 0, 1))


def plot_overlays(ev: Evaluation, classes: Sequence[str]) -> plt.Figure:
    """Rows of image / prediction (clusters mapped to classes by Hungarian matching) / truth."""
    mapping = hungarian_mapping(ev.counts[ev.best])
    palette = np.vstack([class_palette(len(classes)), [[0.5, 0.5, 0.5]]])
    rows = max(len(ev.examples), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row, (image, pred, label) in zip(axes, ev.examples, strict=False):
        _show_image(row[0], image)
        row[1].imshow(palette[mapping[pred]])
        row[2].imshow(palette[np.where(label == 255, len(classes), label)])
    for ax, title in zip(axes[0], ("image", "prediction", "ground truth"), strict=True):
        ax.set_title(title)
    for ax in axes.flat:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i]) for i in range(len(classes))]
    fig.legend(handles, classes, loc="lower center", ncol=min(len(classes), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_clusters(ev: Evaluation) -> plt.Figure:
    """Rows of image / head-B clusters (chosen sub-head): what unlabelled data can show."""
    k = ev.joints.shape[-1]
    palette = class_palette(k)
    rows = max(len(ev.examples), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(5, 2.5 * rows), squeeze=False)
    for row, (image, pred, _) in zip(axes, ev.examples, strict=False):
        _show_image(row[0], image)
        row[1].imshow(palette[pred])
    for ax, title in zip(axes[0], ("image", "clusters"), strict=True):
        ax.set_title(title)
    for ax in axes.flat:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i]) for i in range(k)]
    fig.legend(
        handles, [f"z={i}" for i in range(k)], loc="lower center", ncol=min(k, 6), fontsize=8
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def overlay_figure(ev: Evaluation, classes: Sequence[str]) -> plt.Figure | None:
    """The overlays of dense predictions: against the truth with labels, the bare clusters
    without; None for whole-image clustering or without examples."""
    if not ev.examples or ev.examples[0][1].ndim != 2:
        return None
    labelled = classes and ev.scores[ev.best] is not None
    return plot_overlays(ev, classes) if labelled else plot_clusters(ev)


def plot_map_preview(image: np.ndarray, ids: np.ndarray, labels: Sequence[str]) -> plt.Figure:
    """A segmented raster at preview size: the image beside its cluster map, with a legend.

    Args:
        image: (B, h, w) in [0, 1] (the first three bands are shown; one band as grey).
        ids: (h, w) cluster ids; 255 (no data) is left white.
        labels: legend text of each cluster, in cluster order.
    """
    palette = np.vstack([class_palette(len(labels)), np.ones((256 - len(labels), 3))])
    h, w = ids.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 5 * h / w + 0.8), squeeze=False)
    _show_image(axes[0, 0], image)
    axes[0, 1].imshow(palette[ids], interpolation="nearest")
    for ax, title in zip(axes[0], ("image", "clusters"), strict=True):
        ax.set_title(title)
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i]) for i in range(len(labels))]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def save_figure(fig: plt.Figure, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG under a temporary name, then rename it to ``path``."""
    return _save(fig, path, dpi)


def close(fig: plt.Figure) -> None:
    plt.close(fig)


def plot_joint(joint: np.ndarray) -> plt.Figure:
    """P(z, z') beside P(z)P(z'): a good model concentrates the joint on the diagonal."""
    product = np.outer(joint.sum(1), joint.sum(0))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    vmax = max(joint.max(), product.max())
    for ax, m, title in zip(axes, (joint, product), ("P(z, z')", "P(z) P(z')"), strict=True):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel("z'")
        ax.set_ylabel("z")
    fig.colorbar(im, ax=axes, shrink=0.8)
    return fig


def plot_masses(history: Sequence[dict]) -> plt.Figure:
    """Mass of each head-B cluster (chosen sub-head) per epoch."""
    keys = sorted(
        {k for h in history for k in h if k.startswith("mass_")}, key=lambda k: int(k[5:])
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    for k in keys:
        ax.plot(epochs, [h.get(k, np.nan) for h in history], marker="o", label=f"cluster {k[5:]}")
    ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of pixels (sub-head chosen that epoch)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion(counts: np.ndarray, classes: Sequence[str]) -> plt.Figure:
    """Row-normalised confusion of clusters (rows, Hungarian order) against classes."""
    mapping = hungarian_mapping(counts)
    order = np.argsort(mapping, kind="stable")
    rows = counts[order].astype(np.float64)
    rows /= np.maximum(rows.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.5 * len(order)))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(rows):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(order)), [f"z={k}" for k in order], fontsize=8)
    ax.set_xlabel("class")
    fig.tight_layout()
    return fig


def write_plots(
    ev: Evaluation, classes: Sequence[str], history: Sequence[dict], out: Path
) -> list[Path]:
    """Write every plot as PNG (and the counts as JSON) under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {"joint.png": plot_joint(ev.joints[ev.best])}
    if classes and ev.scores[ev.best] is not None:  # without labels nothing to confuse
        figures["confusion.png"] = plot_confusion(ev.counts[ev.best], classes)
    if history:
        figures["masses.png"] = plot_masses(history)
    overlays = overlay_figure(ev, classes)
    if overlays is not None:
        figures["overlays.png"] = overlays
    paths = [_save(fig, out / name, dpi=110) for name, fig in figures.items()]
    counts = {"classes": list(classes), "best_subhead": ev.best, "counts": ev.counts.tolist()}
    write_json_atomic(out / "confusion.json", counts)
    return paths + [out / "confusion.json"]


def plot_trials(trials: Sequence[Trial], dims: Sequence[Dimension], out: Path) -> list[Path]:
    """One PNG per (metric, searched parameter): the final metric of each trial against the
    parameter's value, trials stopped early drawn hollow.

    Args:
        trials: per trial (sampled values by config path, final metrics, stopped early?).
        dims: the searched dimensions.
        out: folder for the PNGs.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("mi", "acc"):
        if not any(metric in metrics for _, metrics, _ in trials):
            continue
        for dim in dims:
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            for stopped in (False, True):
                pts = [
                    (params[dim.path], metrics[metric])
                    for params, metrics, early in trials
                    if metric in metrics and early == stopped
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.scatter(
                        [str(x) if dim.kind in ("choice", "grid") else x for x in xs],
                        ys,
                        facecolors="none" if stopped else "C0",
                        edgecolors="C0",
                        label="stopped early" if stopped else "full run",
                    )
            if dim.kind == "loguniform":
                ax.set_xscale("log")
            ax.set_xlabel(dim.path)
            ax.set_ylabel(metric)
            ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(_save(fig, out / f"{metric}_vs_{dim.path}.png", dpi=100))
    return paths
