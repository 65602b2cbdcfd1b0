"""The registered model's pyfunc flavour: ``mlflow.pyfunc.load_model(uri).predict(images)``.

MLflow logs this file as the model's code ("models from code", ``tracking.log_report``) with
``weights.pt``, ``config.json`` and ``info.json`` as its artifacts and the ``pipeline`` package
as its code path, so loading it pickles nothing back: the network is rebuilt from its config and
the weights are read with ``torch.load(weights_only=True)``, by ``checkpoint.load_files``.

``predict`` takes raw images (N, bands, H, W) in the pixel type of the training imagery,
normalises them as training did (``to_unit`` with the config's band stretch) and returns the
cluster ids of head B's chosen sub-head: (N, H, W) for segmentation, (N,) for clustering.
Params (MLflow's ``params=``): ``head`` ("B", or "A": the overclustering head), ``subhead``
(-1: the chosen one) and ``probabilities`` (also return the (N, K, H, W) probabilities).

``pipeline`` itself never loads this flavour: ``checkpoint.load_trained`` reads the same
artifacts as data, and runs no code that the registry holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.checkpoint import Trained, load_files
from pipeline.data.format import to_unit
from pipeline.tracking import DEFAULT_PARAMS, ModelFiles, id_type

BATCH = 8  # images per forward pass: bounds the memory of the (n, K, H, W) probabilities


def predict(
    trained: Trained,
    images: np.ndarray,
    head: str = "B",
    subhead: int = -1,
    probabilities: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray | dict[str, np.ndarray]:
    """Cluster ids (and probabilities) of raw images.

    Args:
        trained: the model and its answer (``trained.model`` already on ``device``).
        images: (N, bands, H, W) raw pixel values of the training imagery's type.
        head: "B" (the class count) or "A" (overclustering).
        subhead: which sub-head; -1 is the chosen one (head B's label-free choice).
        probabilities: also return the probabilities.
        device: where the network runs.

    Returns:
        The ids, uint8 unless a head has more than 256 clusters: (N, H, W) for segmentation,
        (N,) for clustering; with ``probabilities``, ``{"clusters": ids, "probabilities":
        float32 (N, K, H, W) or (N, K)}``.

    Raises:
        MlflowException: a param out of range or images of the wrong shape (one line).
    """
    model_cfg, data_cfg = trained.config.model, trained.config.data
    if head not in ("A", "B"):
        raise MlflowException.invalid_parameter_value(f"head: expected 'A' or 'B', got {head!r}")
    if not -1 <= subhead < model_cfg.n_subheads:
        raise MlflowException.invalid_parameter_value(
            f"subhead: expected -1 (the chosen one) or 0..{model_cfg.n_subheads - 1}, got {subhead}"
        )
    if images.ndim != 4 or images.shape[1] != model_cfg.in_channels:
        raise MlflowException.invalid_parameter_value(
            f"images: expected (N, {model_cfg.in_channels}, H, W), got {images.shape}"
        )
    index = trained.subhead if subhead == -1 else subhead
    k = model_cfg.n_clusters_b if head == "B" else model_cfg.n_clusters_a
    ids, probs = [], []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            raw = images[start : start + BATCH]
            x = torch.from_numpy(to_unit(raw, data_cfg.band_lo, data_cfg.band_hi)).to(device)
            p = trained.model(x, head)[index]
            ids.append(p.argmax(dim=1).cpu().numpy().astype(id_type(k)))
            if probabilities:
                probs.append(p.float().cpu().numpy())
    empty = (0, *images.shape[2:]) if model_cfg.task == "segmentation" else (0,)
    clusters = np.concatenate(ids) if ids else np.zeros(empty, id_type(k))
    if not probabilities:
        return clusters
    shape = (0, k, *empty[1:])
    return {
        "clusters": clusters,
        "probabilities": np.concatenate(probs) if probs else np.zeros(shape, np.float32),
    }


class ClusterModel(PythonModel):
    """The pyfunc model: the network rebuilt from the artifacts, head B's answer by default."""

    trained: Trained
    device: torch.device

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the network from the artifacts (plain data: nothing is unpickled)."""
        artifacts = context.artifacts
        files = ModelFiles(
            weights=Path(artifacts["weights"]),
            config=Path(artifacts["config"]),
            info=Path(artifacts["info"]) if "info" in artifacts else None,
        )
        trained = load_files(files, str(files.weights.parent))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        trained.model.to(self.device)
        self.trained = trained

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Cluster ids of raw images; see ``predict`` (the module's) for the params."""
        given = DEFAULT_PARAMS | (params or {})
        return predict(
            self.trained,
            np.asarray(model_input),
            head=str(given["head"]),
            subhead=int(given["subhead"]),
            probabilities=bool(given["probabilities"]),
            device=self.device,
        )


mlflow.models.set_model(ClusterModel())
