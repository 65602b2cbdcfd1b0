"""Tracking: the MLflow record of a run beyond per-epoch metrics.

After training, the driver evaluates the final checkpoint once more (``pipeline.evaluate``) and
logs to the run: overlays of image / prediction / ground truth (paper Fig. 4), the joint P(z, z')
against the product of its marginals (Fig. 2), cluster masses over epochs (Fig. 7), the confusion
matrix, the final ``eval_*`` metrics, and the model (``mlflow.pytorch``), registered under the
run name. The plots are also written next to the checkpoints so they can be found without a UI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.evaluate import Evaluation  # noqa: E402
from pipeline.metrics import hungarian_mapping  # noqa: E402
from pipeline.prepare.shards import write_json_atomic  # noqa: E402

log = logging.getLogger(__name__)
REPORT_TAG = "iid.report"  # set once the final report is logged: a resumed run skips it


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
    figures = {
        "joint.png": plot_joint(ev.joints[ev.best]),
        "confusion.png": plot_confusion(ev.counts[ev.best], classes),
    }
    if history:
        figures["masses.png"] = plot_masses(history)
    if ev.examples and ev.examples[0][1].ndim == 2:  # dense predictions only
        figures["overlays.png"] = plot_overlays(ev, classes)
    paths = []
    for name, fig in figures.items():
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out / name)
        paths.append(out / name)
    counts = {"classes": list(classes), "best_subhead": ev.best, "counts": ev.counts.tolist()}
    write_json_atomic(out / "confusion.json", counts)
    return paths + [out / "confusion.json"]


def model_requirements() -> list[str]:
    """What loading the pickled model needs. Listed here: left to MLflow, it loads the model in
    a subprocess to find its imports, ~11 s per run on 2 cores."""
    from importlib.metadata import version

    # Without the local label (+cu130): `torch==2.14.1` accepts every build of that version.
    return [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "torchvision", "iid-pipeline")]


def log_report(
    uri: str,
    run_id: str,
    cfg: Config,
    model: torch.nn.Module,
    ev: Evaluation,
    classes: Sequence[str],
    history: Sequence[dict],
    plot_dir: Path,
) -> dict:
    """Log plots, final metrics and the registered model to an existing MLflow run.

    Returns:
        ``{"plots": folder, "model_uri": registered model URI, "run_id": run_id}``.
    """
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    paths = write_plots(ev, classes, history, plot_dir)
    # The config travels inside the pickled model, so `iid evaluate models:/...` can rebuild
    # the label mapping and pairs without the run's params.
    model = model.cpu().eval()
    model.iid_config = cfg.to_dict()
    with mlflow.start_run(run_id=run_id):
        for p in paths:
            mlflow.log_artifact(str(p), artifact_path="plots")
        mlflow.log_metrics(ev.summary())
        # Pickle, not MLflow's default pt2 export: the model keeps its two-head forward(x, head)
        # and the config attribute (an exported graph would keep neither).
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            registered_model_name=cfg.run.name,
            serialization_format="pickle",
            pip_requirements=model_requirements(),
        )
        mlflow.set_tag(REPORT_TAG, "done")
    version = getattr(info, "registered_model_version", None)
    model_uri = f"models:/{cfg.run.name}/{version}" if version else info.model_uri
    return {"plots": str(plot_dir), "model_uri": model_uri, "run_id": run_id}
