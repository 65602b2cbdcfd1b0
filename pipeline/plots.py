"""Every figure of the project, as PNG files: a run's (paper Fig. 4 overlays of image /
prediction / ground truth / errors, Fig. 2 joint P(z, z') against the product of its marginals,
Fig. 7 cluster masses over epochs, the confusion matrix with per-class IoU) and a search's (each
metric against each searched value). Written under temporary names and renamed, next to the
checkpoints, so they can be found without a UI; ``pipeline.tracking`` logs them to MLflow.

Colours mean one thing each: ``class_palette`` is for classes (or, without labels, for clusters
in the overlays), grey for ignored / no-data pixels, black for clusters the matching leaves
without a class, red for errors. The masses plot draws clusters in a sequential map that shares
no colour with the class palette, as its clusters are not the classes of the overlays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline import IGNORE_INDEX  # noqa: E402
from pipeline.evaluate import Evaluation  # noqa: E402
from pipeline.metrics import ClusterScores, cluster_scores, hungarian_mapping  # noqa: E402
from pipeline.storage import write_json_atomic  # noqa: E402
from pipeline.tune.space import Dimension  # noqa: E402

# A search's trial as its plots see it: sampled values by config path, final metrics, whether
# it was stopped early.
Trial = tuple[dict[str, Any], dict[str, float], bool]

IGNORED_RGB = np.array([0.5, 0.5, 0.5])  # ignored label / no data, in every column
UNMATCHED_RGB = np.array([0.0, 0.0, 0.0])  # a cluster Hungarian matching gives no class
ERROR_RGB = np.array([1.0, 0.0, 0.0])  # pure red: as far as a red gets from tab10's (a class)
# Correct pixels of the errors column: the image faded towards white, so the red errors stand
# out while the scene stays recognisable.
FADE = 0.35
# The greys of the qualitative maps: a grey class would read as "ignored".
_GREYS = {"tab10": (7,), "tab20": (14, 15)}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _save(fig: plt.Figure, path: Path, dpi: int) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    # tight: rotated class names and axis labels are never cut off at the figure's edge
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def class_palette(n: int) -> np.ndarray:
    """Distinct class colours: tab10 up to 9, tab20 beyond (repeating past 18), without greys.

    Args:
        n: the number of classes (or clusters).

    Returns:
        (n, 3) colours in [0, 1]; grey for the ignore value is added by the caller.
    """
    name = "tab10" if n <= 9 else "tab20"
    cmap = plt.get_cmap(name)
    keep = np.array([i for i in range(cmap.N) if i not in _GREYS[name]])
    return cmap(keep[np.arange(n) % len(keep)])[:, :3]


def cluster_line_colours(k: int) -> np.ndarray:
    """Colours of the K clusters in the masses plot: plasma, which no class colour is close to
    (clusters are not classes there), its bright yellow end left out as it is unreadable on
    white.

    Args:
        k: the number of clusters.

    Returns:
        (k, 3) colours in [0, 1].
    """
    return plt.get_cmap("plasma")(np.linspace(0.0, 0.85, k))[:, :3]


def _image_rgb(image: np.ndarray) -> np.ndarray:
    """(B, H, W) in [0, 1] -> (H, W, 3): the first three bands, or the first one as grey."""
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    return np.clip(rgb.transpose(1, 2, 0), 0, 1).astype(np.float64)


def _show_image(ax: Axes, image: np.ndarray) -> None:
    ax.imshow(_image_rgb(image))


def label_rgb(label: np.ndarray, n_classes: int, valid: np.ndarray | None = None) -> np.ndarray:
    """The ground truth as colours: classes by ``class_palette``, ignored pixels grey.

    Args:
        label: (H, W) class ids in [0, n_classes), ``IGNORE_INDEX`` (or any other value) where
            ignored.
        n_classes: M.
        valid: optional (H, W) bool, False where the image has no data (also grey).

    Returns:
        (H, W, 3) colours in [0, 1].
    """
    label = np.asarray(label)
    ignored = (label < 0) | (label >= n_classes)
    if valid is not None:
        ignored |= ~np.asarray(valid, dtype=bool)
    out = class_palette(n_classes)[np.where(ignored, 0, label)]
    out[ignored] = IGNORED_RGB
    return out


def prediction_rgb(
    pred: np.ndarray, mapping: np.ndarray, n_classes: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """Clusters as the colours of the classes they are matched to.

    Args:
        pred: (H, W) cluster ids.
        mapping: (K,) class of each cluster, -1 for none (drawn black, not grey: grey is for
            ignored pixels).
        n_classes: M.
        valid: optional (H, W) bool, False where the image has no data (drawn grey).

    Returns:
        (H, W, 3) colours in [0, 1].
    """
    predicted = np.asarray(mapping)[np.asarray(pred)]
    unmatched = predicted < 0
    out = class_palette(n_classes)[np.where(unmatched, 0, predicted)]
    out[unmatched] = UNMATCHED_RGB
    if valid is not None:
        out[~np.asarray(valid, dtype=bool)] = IGNORED_RGB
    return out


def scored_mask(truth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The pixels the scores count: labelled, and with data where ``valid`` says so.

    Args:
        truth: (H, W) class ids, ``IGNORE_INDEX`` where ignored.
        valid: optional (H, W) bool, False where the image has no data.

    Returns:
        (H, W) bool.
    """
    scored = np.asarray(truth) != IGNORE_INDEX
    return scored if valid is None else scored & np.asarray(valid, dtype=bool)


def error_mask(
    pred: np.ndarray, truth: np.ndarray, mapping: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """Where the matched prediction disagrees with a scored pixel's class.

    A cluster mapped to no class (-1) is wrong wherever it is scored, as ``class_iou``
    counts it.

    Args:
        pred: (H, W) cluster ids.
        truth: (H, W) class ids, ``IGNORE_INDEX`` where ignored (never an error).
        mapping: (K,) class of each cluster, -1 for none.
        valid: optional (H, W) bool, False where the image has no data (never an error).

    Returns:
        (H, W) bool.
    """
    wrong = np.asarray(mapping)[np.asarray(pred)] != np.asarray(truth)
    return wrong & scored_mask(truth, valid)


def error_image(
    pred: np.ndarray,
    truth: np.ndarray,
    mapping: np.ndarray,
    image: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """The errors column: red where ``error_mask``, grey where not scored (ignored or no
    data), the faded image (white without one) where the prediction is right.

    Args:
        pred: (H, W) cluster ids.
        truth: (H, W) class ids, ``IGNORE_INDEX`` where ignored.
        mapping: (K,) class of each cluster, -1 for none.
        image: optional (B, H, W) in [0, 1] under the correct pixels.
        valid: optional (H, W) bool, False where the image has no data.

    Returns:
        (H, W, 3) colours in [0, 1].
    """
    truth = np.asarray(truth)
    base = np.ones((*truth.shape, 3)) if image is None else _image_rgb(image)
    out = FADE * base + (1 - FADE)
    out[error_mask(pred, truth, mapping, valid)] = ERROR_RGB
    out[~scored_mask(truth, valid)] = IGNORED_RGB
    return out


def _valid(example: Sequence[np.ndarray]) -> np.ndarray | None:
    """The no-data mask of an example, when the evaluation kept one (a 4th element)."""
    return (
        np.asarray(example[3], dtype=bool) if len(example) > 3 and example[3] is not None else None
    )


def _legend_layout(labels: Sequence[str], width: float) -> tuple[int, float]:
    """Columns of a legend under a figure ``width`` inches wide, and the height it needs."""
    entry = 0.45 + 0.07 * max((len(t) for t in labels), default=1)  # 8 pt text beside a patch
    ncol = max(1, min(len(labels), int(width // entry)))
    return ncol, 0.2 + 0.17 * math.ceil(len(labels) / ncol)


def _mapping(counts: np.ndarray, scores: ClusterScores | None) -> np.ndarray:
    """(K,) class of each cluster, -1 for none: the scores' matching, or one made from counts
    (no labelled pixel: nothing to score, yet the plots still colour clusters)."""
    return np.asarray(scores.mapping) if scores is not None else hungarian_mapping(counts)


def plot_overlays(ev: Evaluation, classes: Sequence[str]) -> plt.Figure:
    """Rows of image / prediction (clusters mapped to classes by Hungarian matching) / truth /
    errors; ignored and no-data pixels grey.

    Args:
        ev: an evaluation with labelled dense examples.
        classes: the M class names.

    Returns:
        The figure.
    """
    mapping = _mapping(ev.counts[ev.best], ev.scores[ev.best])
    m = len(classes)
    palette = class_palette(m)
    handles = [Patch(color=palette[i], label=c) for i, c in enumerate(classes)]
    # "ignored" always: the legend then reads the same for every epoch's overlay
    handles.append(Patch(color=IGNORED_RGB, label="ignored / no data"))
    if any((mapping[e[1]] < 0).any() for e in ev.examples):
        handles.append(Patch(color=UNMATCHED_RGB, label="unmatched cluster"))
    handles.append(Patch(color=ERROR_RGB, label="prediction ≠ truth"))
    rows, width = max(len(ev.examples), 1), 10.0
    ncol, legend_h = _legend_layout([h.get_label() for h in handles], width)
    fig, axes = plt.subplots(
        rows, 4, figsize=(width, 2.5 * rows + 0.4 + legend_h), squeeze=False, layout="constrained"
    )
    for row, example in zip(axes, ev.examples, strict=False):
        image, pred, label = example[:3]
        valid = _valid(example)
        row[0].imshow(_image_rgb(image))
        row[1].imshow(prediction_rgb(pred, mapping, m, valid), interpolation="nearest")
        row[2].imshow(label_rgb(label, m, valid), interpolation="nearest")
        row[3].imshow(error_image(pred, label, mapping, image, valid), interpolation="nearest")
        scored = int(scored_mask(label, valid).sum())
        wrong = int(error_mask(pred, label, mapping, valid).sum())
        share = f"{wrong / scored:.0%} wrong" if scored else "no labels"
        row[3].text(
            0.02, 0.97, share, transform=row[3].transAxes, ha="left", va="top", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.5},
        )  # fmt: skip
    titles = ("image", "prediction (matched)", "ground truth", "errors")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title)
    for ax in axes.flat:
        ax.axis("off")
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8)
    return fig


def plot_clusters(ev: Evaluation) -> plt.Figure:
    """Rows of image / head-B clusters (chosen sub-head): what unlabelled data can show.

    Args:
        ev: an evaluation with dense examples.

    Returns:
        The figure.
    """
    k = ev.joints.shape[-1]
    palette = class_palette(k)
    handles = [Patch(color=palette[i], label=f"z={i}") for i in range(k)]
    valids = [_valid(e) for e in ev.examples]
    if any(v is not None and not v.all() for v in valids):
        handles.append(Patch(color=IGNORED_RGB, label="no data"))
    rows, width = max(len(ev.examples), 1), 5.5
    ncol, legend_h = _legend_layout([h.get_label() for h in handles], width)
    fig, axes = plt.subplots(
        rows, 2, figsize=(width, 2.5 * rows + 0.4 + legend_h), squeeze=False, layout="constrained"
    )
    for row, example, valid in zip(axes, ev.examples, valids, strict=False):
        _show_image(row[0], example[0])
        colours = palette[example[1]]
        if valid is not None:
            colours[~valid] = IGNORED_RGB
        row[1].imshow(colours, interpolation="nearest")
    for ax, title in zip(axes[0], ("image", "clusters"), strict=True):
        ax.set_title(title)
    for ax in axes.flat:
        ax.axis("off")
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8)
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


def integer_ticks(k: int, max_ticks: int = 12) -> np.ndarray:
    """Ticks 0, s, 2s, ... below ``k`` with the smallest step s of 1, 2, 5, 10, 20, 50, ...
    that leaves at most ``max_ticks`` of them.

    Args:
        k: the number of rows or columns (clusters).
        max_ticks: the most ticks wanted.

    Returns:
        The tick positions, integers.
    """
    for e in range(12):
        for s in (1, 2, 5):
            if math.ceil(k / (s * 10**e)) <= max_ticks:
                return np.arange(0, max(k, 1), s * 10**e)
    return np.arange(1)  # k beyond any figure


def plot_joint(joint: np.ndarray, mi: float | None = None) -> plt.Figure:
    """P(z, z') beside P(z)P(z'): a good model concentrates the joint on the diagonal.

    Args:
        joint: (K, K) normalised joint of the two views' clusters.
        mi: its mutual information in nats, for the title.

    Returns:
        The figure.
    """
    k = joint.shape[0]
    product = np.outer(joint.sum(1), joint.sum(0))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), layout="constrained")
    vmax = max(float(joint.max()), float(product.max()), np.finfo(np.float64).tiny)
    ticks = integer_ticks(k)
    for ax, m, title in zip(axes, (joint, product), ("P(z, z')", "P(z) P(z')"), strict=True):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("cluster z' (second view)")
        ax.set_ylabel("cluster z (first view)")
    fig.colorbar(im, ax=axes, shrink=0.85, label="probability (one scale for both)")
    if mi is not None:
        fig.suptitle(f"I(z, z') = {mi:.3f} nats, K = {k}")
    return fig


def plot_masses(history: Sequence[dict]) -> plt.Figure:
    """Mass of each head-B cluster (the sub-head chosen that epoch) per epoch, epochs counted
    from 1 as the CLI prints them; a dashed line at 1/K, the uniform share.

    Args:
        history: per epoch, its metrics (``epoch`` from 0, ``mass_<k>``).

    Returns:
        The figure.
    """
    keys = sorted(
        {k for h in history for k in h if k.startswith("mass_")}, key=lambda k: int(k[5:])
    )
    k = len(keys)
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    epochs = [int(h.get("epochs_done", h["epoch"] + 1)) for h in history]
    colours = cluster_line_colours(k)
    few = k <= 12  # a legend entry and a marker each; beyond, a colour bar tells them apart
    top = 1 / max(k, 1)
    for i, key in enumerate(keys):
        masses = np.array([h.get(key, np.nan) for h in history], dtype=np.float64)
        if not np.isnan(masses).all():
            top = max(top, float(np.nanmax(masses)))
        style = {"marker": _MARKERS[i % len(_MARKERS)], "markersize": 5 if len(epochs) <= 20 else 3}
        ax.plot(
            epochs, masses, color=colours[i], label=f"z={key[5:]}", linewidth=1.5 if few else 0.8,
            **(style if few else {}),
        )  # fmt: skip
    if k:
        ax.axhline(1 / k, color="0.3", linestyle="--", linewidth=1, label="uniform 1/K")
    if few and k:
        ax.legend(
            fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="cluster",
            title_fontsize=8,
        )  # fmt: skip
    elif k:
        cmap = ListedColormap(colours)
        bar = fig.colorbar(ScalarMappable(Normalize(-0.5, k - 0.5), cmap), ax=ax, pad=0.02)
        bar.set_ticks(integer_ticks(k))
        bar.set_label("cluster z (dashed: uniform 1/K)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:
        ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of pixels")
    # Up to the largest mass, not 1: 70 clusters of ~1.4% each would be a flat line at 0.
    ax.set_ylim(0, min(1.0, 1.15 * top))
    ax.set_title("cluster masses (head B, the sub-head chosen each epoch)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def row_fractions(counts: np.ndarray) -> np.ndarray:
    """Each row of ``counts`` divided by its sum; 0 in a row without counts (no warning).

    Args:
        counts: (K, M) counts.

    Returns:
        (K, M) float64 fractions.
    """
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_order(mapping: np.ndarray) -> np.ndarray:
    """Rows of the confusion plot: matched clusters in the order of their classes (the
    diagonal), then the unmatched ones by id.

    Args:
        mapping: (K,) class of each cluster, -1 for none.

    Returns:
        (K,) cluster ids.
    """
    mapping = np.asarray(mapping)
    matched = np.flatnonzero(mapping >= 0)
    return np.concatenate(
        [matched[np.argsort(mapping[matched], kind="stable")], np.flatnonzero(mapping < 0)]
    )


def count_text(n: int) -> str:
    """A pixel count in at most 7 characters: exact below a million, then 3 digits and M/G."""
    if n < 1_000_000:
        return f"{n:,}"
    for div, unit in ((1e9, "G"), (1e6, "M")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)  # unreachable


def plot_confusion(
    counts: np.ndarray,
    classes: Sequence[str],
    scores: ClusterScores | None = None,
    subhead: int | None = None,
) -> plt.Figure:
    """Clusters (rows, Hungarian order) against classes (columns): every cell its pixel count
    and its share of the row, the matched cells boxed, per-class IoU in a row below, ACC and
    mIoU in the title.

    Args:
        counts: (K, M) confusion counts of one sub-head.
        classes: the M class names.
        scores: ``cluster_scores(counts)`` if already computed (the evaluation's).
        subhead: the sub-head's index, for the title.

    Returns:
        The figure.
    """
    counts = np.asarray(counts, dtype=np.int64)
    k, m = counts.shape
    if scores is None and counts.sum() > 0:
        scores = cluster_scores(counts)
    mapping = _mapping(counts, scores)
    iou = np.asarray(scores.iou if scores is not None else [np.nan] * m, dtype=np.float64)
    order = confusion_order(mapping)
    fractions = row_fractions(counts[order])
    empty = counts[order].sum(axis=1) == 0

    # Cells big enough for "123,456" over "0.84" at 8 pt; smaller for big matrices.
    big = k * m > 300
    cell_w, cell_h, font = (0.7, 0.34, 6) if big else (1.05, 0.5, 8)
    names = [
        f"z={z} → {classes[mapping[z]]}" if mapping[z] >= 0 else f"z={z} (unmatched)" for z in order
    ]
    longest_row = max(len(n) for n in names)
    longest_class = max((len(c) for c in classes), default=1)
    rotate = longest_class * 0.075 > cell_w  # names wider than a cell are slanted
    head = 0.9 + (0.055 * longest_class if rotate else 0.25)
    fig = plt.figure(
        figsize=(1.2 + 0.075 * longest_row + m * cell_w, head + 0.9 + (k + 0.8) * cell_h),
        layout="constrained",
    )
    grid = fig.add_gridspec(2, 1, height_ratios=(k, 0.8))
    ax, iou_ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])

    ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(fractions):
        text = f"{count_text(int(counts[order[i], j]))}\n{'–' if empty[i] else f'{v:.2f}'}"
        colour = "white" if v > 0.55 else "black"
        ax.text(j, i, text, ha="center", va="center", fontsize=font, color=colour)
    for i, z in enumerate(order):
        if mapping[z] >= 0:
            ax.add_patch(
                Rectangle((mapping[z] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2)
            )
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xticks(
        range(m), classes, fontsize=8, rotation=30 if rotate else 0,
        ha="left" if rotate else "center", rotation_mode="anchor",
    )  # fmt: skip
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("true class")
    ax.set_ylabel("cluster → matched class")

    iou_ax.imshow(np.ma.masked_invalid(iou[None]), cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for j, v in enumerate(iou):
        colour = "white" if v > 0.55 else "black"
        iou_ax.text(
            j, 0, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
            fontsize=font + 1, color=colour,
        )  # fmt: skip
    iou_ax.set_xticks([])
    iou_ax.set_yticks([0], ["class IoU"], fontsize=8)
    iou_ax.set_xlim(ax.get_xlim())

    where = f"sub-head {subhead}: " if subhead is not None else ""
    if scores is not None:
        fig.suptitle(
            f"{where}ACC {scores.acc:.3f}   mIoU {scores.miou:.3f}   "
            f"({scores.n:,} labelled pixels)",
            fontsize=11,
        )
    else:
        fig.suptitle(f"{where}no labelled pixels", fontsize=11)
    fig.supxlabel(
        "cell: pixels, and their share of the cluster (row); box: the Hungarian match",
        fontsize=7,
    )
    return fig


def write_plots(
    ev: Evaluation, classes: Sequence[str], history: Sequence[dict], out: Path
) -> list[Path]:
    """Write every plot as PNG (and the counts as JSON) under ``out``.

    Args:
        ev: the evaluation to draw (its chosen sub-head).
        classes: the class names (none: data without labels).
        history: per epoch, its metrics (for the masses; may be empty).
        out: the folder.

    Returns:
        The paths written.
    """
    out.mkdir(parents=True, exist_ok=True)
    best = ev.best
    figures = {"joint.png": plot_joint(ev.joints[best], float(ev.mi[best]))}
    if classes and ev.scores[best] is not None:  # without labels nothing to confuse
        figures["confusion.png"] = plot_confusion(
            ev.counts[best], classes, ev.scores[best], subhead=best
        )
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
