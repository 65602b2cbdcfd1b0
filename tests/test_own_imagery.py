"""Your own imagery, end to end: nodata and padded edges as valid masks, 16-bit radiometry,
label-free training and evaluation, scoring against your own masks, and the real Landsat scene."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from pipeline import checkpoint as ckpt
from pipeline.augment import make_pairs, undo, warp
from pipeline.cli import main as cli_main
from pipeline.config import Config, PairConfig
from pipeline.data.format import decode_raw, fit_to_data, read_manifest, stretch
from pipeline.evaluate import evaluate_uri
from pipeline.losses import iid_segmentation_loss
from pipeline.metrics import cluster_scores, confusion_counts
from pipeline.models import build_model
from pipeline.prepare.folder import prepare_folder
from pipeline.prepare.run import TilingOptions
from pipeline.train import fit
from tests.conftest import write_tif

LANDSAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "landsat-rgb" / "RGB.byte.tif"
TILE = 32


def nodata_raster(path: Path, height: int = 70, width: int = 90, seed: int = 0) -> np.ndarray:
    """A 16-bit, 3-band GeoTIFF (reflectance-like values 800-9000, far below 65535) with a
    nodata (0) border and a cut-off corner; returns its (bands, h, w) array."""
    rng = np.random.default_rng(seed)
    image = rng.integers(800, 9000, (3, height, width)).astype(np.uint16)
    image[:, : height // 2, : width // 3] += 3000  # two regions to cluster
    image[:, :5] = 0
    image[:, :, -7:] = 0
    yy, xx = np.mgrid[:height, :width]
    image[:, yy + xx > height + width - 40] = 0  # a rotated footprint's corner
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 3}
    profile |= {"dtype": "uint16", "nodata": 0, "crs": "EPSG:32633"}
    with rasterio.open(path, "w", transform=from_origin(368000, 5808000, 10, 10), **profile) as f:
        f.write(image)
    return image


def rows_of(out: Path) -> list[dict]:
    return [r for p in sorted(out.rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def valid_of(row: dict) -> np.ndarray:
    if row["valid"] is None:
        return np.ones((row["height"], row["width"]), dtype=bool)
    return np.frombuffer(row["valid"], np.uint8).reshape(row["height"], row["width"]) != 0


def opts(**kw) -> TilingOptions:
    return TilingOptions(**{"tile": TILE, "stride": TILE, "progress": False} | kw)


# ------------------------------------------------------------------ nodata, edges, statistics
def test_every_valid_pixel_is_covered_exactly_once_by_the_tiles_valid_masks(tmp_path):
    image = nodata_raster(tmp_path / "src" / "scene.tif")  # 70 x 90: no multiple of 32
    prepare_folder(tmp_path / "src", tmp_path / "out", opts(max_nodata=1.0))
    h, w = image.shape[1:]
    cover = np.zeros((h + TILE, w + TILE), dtype=np.int64)
    for r in rows_of(tmp_path / "out"):
        y, x = r["row_off"], r["col_off"]
        cover[y : y + TILE, x : x + TILE] += valid_of(r)
        pixels = decode_raw({k: [v] for k, v in r.items()})[0][0]
        assert not pixels[:, ~valid_of(r)].any()  # nodata and padding hold 0
    assert (cover[:h, :w] == (image != 0).any(0)).all()
    assert not cover[h:].any() and not cover[:, w:].any()


def test_band_statistics_are_numpys_on_the_valid_pixels(tmp_path):
    image = nodata_raster(tmp_path / "src" / "scene.tif")
    manifest = prepare_folder(tmp_path / "src", tmp_path / "out", opts(max_nodata=1.0))
    valid = image[:, (image != 0).any(0)].astype(np.float64)
    stats = manifest["band_stats"]
    assert manifest["dtype"] == "uint16" and stats["pixels"] == valid.shape[1]
    assert np.allclose(stats["mean"], valid.mean(1), rtol=1e-9)
    assert np.allclose(stats["std"], valid.std(1), rtol=1e-9)
    assert stats["min"] == valid.min(1).tolist() and stats["max"] == valid.max(1).tolist()


def test_mostly_nodata_tiles_are_skipped_and_counted(tmp_path):
    image = nodata_raster(tmp_path / "src" / "scene.tif")
    manifest = prepare_folder(tmp_path / "src", tmp_path / "out", opts())
    h, w = image.shape[1:]
    data = (image != 0).any(0)
    expected = 0
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            inside = data[y : y + TILE, x : x + TILE]
            expected += inside.sum() == 0 or (inside.size - inside.sum()) > 0.5 * inside.size
    assert manifest["nodata"]["skipped_tiles"] == expected > 0
    assert manifest["nodata"]["files"] == {"scene.tif": expected}
    kept = sum(s["tiles"] for s in manifest["splits"].values())
    assert kept == len(rows_of(tmp_path / "out")) == 3 * 3 - expected


def test_a_16_bit_dataset_trains_on_a_stretch_from_its_statistics(tmp_path):
    nodata_raster(tmp_path / "src" / "scene.tif")
    manifest = prepare_folder(tmp_path / "src", tmp_path / "out", opts())
    cfg = Config.from_dict({"data": {"shards": str(tmp_path / "out")}})
    fitted = fit_to_data(cfg, manifest)
    assert fitted.model.in_channels == 3  # model.in_channels: 0 takes the manifest's bands
    lo, hi = stretch(manifest["band_stats"])
    assert (fitted.data.band_lo, fitted.data.band_hi) == (lo, hi)
    mean, std = manifest["band_stats"]["mean"][0], manifest["band_stats"]["std"][0]
    assert lo[0] == pytest.approx(max(manifest["band_stats"]["min"][0], mean - 3 * std))
    unit = Config.from_dict({"data": {"shards": "x", "normalise": "unit"}})
    assert fit_to_data(unit, manifest).data.band_lo == ()
    eight_bit = manifest | {"dtype": "uint8"}
    assert fit_to_data(cfg, eight_bit).data.band_lo == ()  # auto: 8-bit stays unit


def test_labels_are_ignored_wherever_the_image_has_no_data(tmp_path):
    image = nodata_raster(tmp_path / "src" / "scene.tif")
    mask = np.ones((1, *image.shape[1:]), dtype=np.uint8)
    write_tif(tmp_path / "masks" / "scene.png", mask, georef=False)
    prepare_folder(
        tmp_path / "src", tmp_path / "out", opts(max_nodata=1.0), labels=tmp_path / "masks"
    )
    for r in rows_of(tmp_path / "out"):
        labels = decode_raw({k: [v] for k, v in r.items()})[1][0]
        assert ((labels == 255) == ~valid_of(r)).all()  # no metric counts a nodata pixel


# ---------------------------------------------------------------------------- the loss mask
@pytest.mark.parametrize(
    "cfg, n, least_kept",
    [
        (PairConfig(shift=0.1), 4, 0.0),  # flips
        (PairConfig(affine=True, shift=0.1), 4, 0.0),
        # quarter turns move whole pixels: most valid pixels stay in the loss (8 images: more
        # of the 8 elements drawn)
        (PairConfig(dihedral=True), 8, 0.5),
    ],
    ids=["flips", "affine", "dihedral"],
)
def test_no_invalid_pixel_reaches_the_loss(cfg, n, least_kept):
    """Predictions at pixels without data, in either view, cannot change the loss: whatever
    they are, the loss and its value stay the same, and their gradient is zero (g* runs
    grid_sample here, as in training: gradients)."""
    gen = torch.Generator().manual_seed(0)
    k, h, w = 3, 24, 24
    x = torch.rand(n, 3, h, w, generator=gen)
    valid = torch.ones(n, h, w, dtype=torch.bool)
    valid[:, :, 17:] = False  # padding of an edge tile
    valid[0, :6, :6] = False  # a nodata corner
    pair = make_pairs(x, cfg, gen, valid)
    assert not (pair["mask"] & ~valid).any()
    assert pair["mask"].float().mean() > least_kept
    # the second view's pixels that drew on an invalid pixel of x
    touched = warp((~valid).unsqueeze(1).float(), pair["theta"])[:, 0] > 0

    def loss(p, q_second):
        q, _ = undo(q_second, pair["inverse"])
        return iid_segmentation_loss(p, q, pair["mask"], lamb=1.5, half_window=2).loss

    p = torch.softmax(torch.randn(n, k, h, w, generator=gen), 1).requires_grad_()
    q = torch.softmax(torch.randn(n, k, h, w, generator=gen), 1).requires_grad_()
    base = loss(p, q)
    base.backward()
    assert p.grad[~valid.unsqueeze(1).expand_as(p)].abs().max() == 0
    assert q.grad[touched.unsqueeze(1).expand_as(q)].abs().max() == 0
    noise = torch.softmax(torch.randn(n, k, h, w, generator=gen), 1)
    p2 = torch.where(valid.unsqueeze(1), p.detach(), noise)
    q2 = torch.where(touched.unsqueeze(1), noise, q.detach())
    assert torch.allclose(loss(p2, q2), base.detach(), atol=1e-6)


# ------------------------------------------------------- scoring against the user's own masks
def test_evaluate_scores_class_index_masks_as_a_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 255, (3, 64, 80), dtype=np.uint8)
        mask = np.zeros((1, 64, 80), dtype=np.uint8)
        mask[0, :, 40:] = 1
        mask[0, 40:] = 2
        mask[0, :3, :3] = 255  # ignored
        write_tif(tmp_path / "src" / f"s{i}.tif", image)
        write_tif(tmp_path / "masks" / f"s{i}.png", mask, georef=False)
    prepare_folder(
        tmp_path / "src", tmp_path / "out", opts(test_fraction=0.5), labels=tmp_path / "masks"
    )
    cfg = Config.from_dict(
        {
            "data": {"shards": str(tmp_path / "out")},
            "model": {"in_channels": 3, "n_clusters_a": 4, "n_clusters_b": 3, "width": 0.125},
            "loss": {"half_window": 2},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "m.pt")
    ev, classes, _ = evaluate_uri(str(tmp_path / "m.pt"), tmp_path / "out")
    # The same from the mask files themselves, window by window of the test tiles.
    counts = np.zeros((3, 3), dtype=np.int64)
    for r in rows_of(tmp_path / "out"):
        if r["split"] != "test":
            continue
        image = decode_raw({k: [v] for k, v in r.items()})[0]
        with torch.no_grad():
            pred = model(torch.from_numpy(image.astype(np.float32) / 255), "B")[0].argmax(1)[0]
        with rasterio.open(tmp_path / "masks" / Path(r["source"]).with_suffix(".png")) as f:
            truth = f.read(1)
        window = np.full((TILE, TILE), 255, dtype=np.int64)
        y, x = r["row_off"], r["col_off"]
        part = truth[y : y + TILE, x : x + TILE]
        window[: part.shape[0], : part.shape[1]] = part
        counts += confusion_counts(pred, torch.from_numpy(window), 3, 3).numpy()
    assert counts.sum() > 0
    assert ev.scores[ev.best].acc == pytest.approx(cluster_scores(counts).acc)


# ------------------------------------------------------------------ label-free, end to end
@pytest.mark.slow
def test_unlabelled_16_bit_folder_trains_and_evaluates_without_labels(
    tmp_path, ray_cluster, capsys
):
    for i in range(2):
        nodata_raster(tmp_path / "src" / f"scene{i}.tif", 96, 128, seed=i)
    assert (
        cli_main(
            [
                "prepare",
                "folder",
                str(tmp_path / "src"),
                str(tmp_path / "out"),
                "--tile",
                str(TILE),
                "--test-fraction",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["test"]["tiles"] > 0  # held out although nothing is labelled
    config = {
        # the demo's merge and the default eval split: moot or met on unlabelled data
        "data": {"shards": str(tmp_path / "out"), "merge": "potsdam3", "pairs_on": "worker"},
        "model": {"n_clusters_a": 4, "n_clusters_b": 2, "width": 0.125},
        "loss": {"half_window": 2},
        "optim": {"epochs": 2, "lr": 0.002},
        "pairs": {"crop": 24},
        "scaling": {"num_workers": 1},
        "run": {
            "name": "own",
            "storage_path": str(tmp_path / "runs"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(config))
    assert cli_main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    report = json.loads((tmp_path / "runs" / "own" / "report.json").read_text())
    assert "eval_mi" in report and "eval_acc" not in report
    state = ckpt.load(tmp_path / "runs" / "own")
    saved = Config.from_dict(state["config"])
    assert saved.model.in_channels == 3 and len(saved.data.band_lo) == 3  # travels with it
    client = mlflow.MlflowClient(config["run"]["tracking_uri"])
    metrics = client.get_run(report["run_id"]).data.metrics
    assert {"eval/mi", "train/loss_b", "masses/mass_0", "masses/mass_1"} <= set(metrics)
    assert not any(k.startswith(("eval/acc", "eval/nmi", "eval/ari", "eval/miou")) for k in metrics)
    assert metrics["masses/mass_0"] + metrics["masses/mass_1"] == pytest.approx(1)
    overlays = [a.path for a in client.list_artifacts(report["run_id"], "overlays")]
    assert overlays == ["overlays/epoch_001.png", "overlays/epoch_002.png"]
    plots = {p.name for p in (tmp_path / "runs" / "own" / "plots").iterdir()}
    assert {"overlays.png", "masses.png", "joint.png"} <= plots and "confusion.png" not in plots
    capsys.readouterr()
    model = str(tmp_path / "runs" / "own")
    assert (
        cli_main(
            [
                "evaluate",
                "--model",
                model,
                "--data",
                str(tmp_path / "out"),
                "--plots",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "(no labelled pixels)" in out and (tmp_path / "ev" / "overlays.png").is_file()


@pytest.mark.slow
def test_landsat_scene_trains_label_free_and_its_nodata_never_counts(tmp_path, ray_cluster):
    if not LANDSAT.is_file():
        pytest.skip(f"real Landsat scene not found at {LANDSAT} (../shared is absent)")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / LANDSAT.name).symlink_to(LANDSAT)  # read in place, never copied
    manifest = prepare_folder(tmp_path / "src", tmp_path / "out", opts(tile=64, stride=64))
    with rasterio.open(LANDSAT) as f:
        scene = f.read()
    data = (scene != 0).any(0)
    # Every stored pixel without data is invalid, every valid one holds data.
    rows = rows_of(tmp_path / "out")
    for r in rows:
        y, x = r["row_off"], r["col_off"]
        window = np.zeros((64, 64), dtype=bool)
        part = data[y : y + 64, x : x + 64]
        window[: part.shape[0], : part.shape[1]] = part
        assert (valid_of(r) == window).all()
    assert manifest["nodata"]["skipped_tiles"] > 0
    assert manifest["band_stats"]["pixels"] == sum(int(valid_of(r).sum()) for r in rows)
    cfg = Config.from_dict(
        {
            "data": {"shards": str(tmp_path / "out"), "pairs_on": "actors"},
            "model": {"n_clusters_a": 6, "n_clusters_b": 3, "width": 0.125},
            "loss": {"half_window": 2},
            "optim": {"epochs": 1, "lr": 0.002},
            "pairs": {"crop": 48, "affine": True},
            "scaling": {"num_workers": 1, "pair_actors": 1},
            "run": {
                "name": "landsat",
                "storage_path": str(tmp_path / "runs"),
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            },
        }
    )
    fit(cfg)
    report = json.loads((tmp_path / "runs" / "landsat" / "report.json").read_text())
    assert report["eval_mi"] > 0 and "eval_acc" not in report
