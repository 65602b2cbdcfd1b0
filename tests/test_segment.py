"""`iid segment`: whole rasters to georeferenced maps, on a real local Ray cluster.

The rasters are written here: a CRS and a sheared transform, a nodata border, a size that is
not a multiple of the core. The model is a small network with random weights whose head B is
re-centred so that every cluster wins somewhere (a map of one cluster would hide seams).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine
from scipy import ndimage

from pipeline import checkpoint
from pipeline.cli import main as cli_main
from pipeline.config import Config, ConfigError, Job
from pipeline.data.format import to_unit
from pipeline.models import build_model
from pipeline.segment.layout import Layout
from pipeline.segment.rasters import PROBABILITY_SCALE, read_window
from pipeline.segment.run import SegmentOptions, read_names, segment

HEIGHT, WIDTH, CORE, MARGIN = 530, 610, 64, 32
TRANSFORM = Affine(0.5, 0.1, 368000, 0.05, -0.5, 5808000)  # sheared: rows and columns both move
CHOSEN = 1  # the sub-head the checkpoint records as its answer


def scene(seed: int = 0, bands: int = 3, dtype: str = "uint8") -> np.ndarray:
    """(bands, HEIGHT, WIDTH) smooth random imagery with a nodata (0) border: 20 rows at the
    top, 13 columns at the right."""
    rng = np.random.default_rng(seed)
    img = np.stack([ndimage.gaussian_filter(rng.random((HEIGHT, WIDTH)), 6) for _ in range(bands)])
    img = ((img - img.min()) / (img.max() - img.min()) * 250 + 5).astype(dtype)
    img[:, :20, :] = 0
    img[:, :, -13:] = 0
    return img


def write_raster(path: Path, img: np.ndarray, crs: str | None = "EPSG:32633") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"crs": crs, "transform": TRANSFORM} if crs else {}
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=img.shape[1],
        width=img.shape[2],
        count=img.shape[0],
        dtype=img.dtype.name,
        nodata=0,
        **profile,
    ) as dst:
        dst.write(img)
    return path


def save_model(folder: Path, img: np.ndarray) -> Path:
    """A checkpoint of a small random network (2 sub-heads; sub-head CHOSEN is the recorded
    answer, its clusters matched to classes c, a, b)."""
    cfg = Config.from_dict(
        {
            "data": {"shards": "unused", "dtype": "uint8"},
            "model": {"in_channels": 3, "width": 0.25, "n_subheads": 2, "n_clusters_a": 5},
            "run": {"name": "segtest"},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # centre head B's logits so each cluster wins about a third
        x = torch.from_numpy(to_unit(img[None, :, 100:400, 100:400]))
        feats = model.features(x)
        for sub in model.heads["B"]:
            logits = sub(feats)
            sub.bias -= logits.mean(dim=(0, 2, 3))
            sub.weight *= 1.0 / logits.std(dim=(0, 2, 3)).clamp(min=1e-6).view(-1, 1, 1, 1)
    job = Job(cfg, ("a", "b", "c"), tuple(range(256)), "", "", cfg.pairs)
    counts = torch.zeros(2, 3, 3, dtype=torch.int64)
    counts[CHOSEN] = torch.tensor([[0, 0, 9], [8, 1, 0], [0, 7, 0]])
    folder.mkdir(parents=True)
    optimizer = torch.optim.Adam(model.parameters())
    history = [{"epoch": 0, "best_subhead": CHOSEN}]
    checkpoint.save(folder, model, optimizer, history, job, counts, ["node"])
    return folder


def forward_core(model, src, row: int, col: int, core: int = CORE, margin: int = MARGIN):
    """Head B (CHOSEN) cluster ids of the core at (row, col), from a direct forward pass on
    the window around it (the core may lie anywhere, not only on the layout's grid)."""
    layout = Layout(src.height, src.width, core, margin)
    raw, _ = read_window(src, layout, row, col)
    with torch.no_grad():
        probs = model(torch.from_numpy(to_unit(raw[None])), "B")[CHOSEN][0]
    return probs[:, margin : margin + core, margin : margin + core].argmax(0).numpy()


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_cluster) -> dict:
    root = tmp_path_factory.mktemp("segment")
    img = scene()
    raster = write_raster(root / "src" / "scene.tif", img)
    model_dir = save_model(root / "model", img)
    blended = segment(
        str(model_dir),
        str(raster),
        str(root / "out"),
        SegmentOptions(core=CORE, margin=MARGIN, probabilities=True, progress=False),
    )
    plain = segment(
        str(model_dir),
        str(raster),
        str(root / "plain"),
        SegmentOptions(core=CORE, margin=0, progress=False),
    )
    return {
        "root": root,
        "img": img,
        "raster": raster,
        "model": model_dir,
        "blended": blended,
        "plain": plain,
        "out": root / "out",
    }


# ---------------------------------------------------------------------------- the layout
def test_cores_tile_the_raster_once_and_windows_reach_past_it():
    layout = Layout(100, 130, core=32, margin=8)
    covered = np.zeros((100, 130), dtype=int)
    for r, c in layout.cores():
        h, w = layout.kept(r, c)
        covered[r : r + h, c : c + w] += 1
    assert (covered == 1).all()
    assert len(layout) == 4 * 5 == len(layout.cores())
    assert layout.tile == 48 and layout.window(0, 0) == (-8, -8)
    assert layout.kept(96, 128) == (4, 2)


@pytest.mark.parametrize(
    "core, margin, match",
    [(40, 8, r"--core: expected a multiple of 16, got 40"), (32, -1, r"--margin: expected >= 0")],
)
def test_a_bad_layout_is_one_line_naming_the_option(core, margin, match):
    with pytest.raises(ValueError, match=match):
        Layout(10, 10, core, margin)


# ------------------------------------------------------------------------------ the map
def test_the_map_is_a_cog_with_the_inputs_georeferencing_nodata_and_colours(made):
    ((source, outputs, _),) = made["blended"].done
    with rasterio.open(made["raster"]) as src, rasterio.open(outputs.clusters) as m:
        assert (m.crs, m.transform, m.shape) == (src.crs, src.transform, src.shape)
        assert m.count == 1 and m.dtypes[0] == "uint8" and m.nodata == 255
        assert m.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert m.compression is not None and m.block_shapes[0] == (512, 512)
        assert m.overviews(1) == [2]
        colours = m.colormap(1)
        assert colours[255][3] == 0 and len({colours[k] for k in range(3)}) == 3
        # The names the clusters were matched to on held-out labels (counts of sub-head 1).
        assert m.descriptions[0] == "IID clusters (head B, sub-head 1): 0 c, 1 a, 2 b"
        assert m.tags(1) == {"CLUSTER_0": "c", "CLUSTER_1": "a", "CLUSTER_2": "b"}
    assert Path(outputs.preview).stat().st_size > 10_000
    assert not list(made["out"].glob(".*"))  # no temporary file left behind


def test_every_valid_pixel_is_labelled_and_nodata_is_255(made):
    ((_, outputs, _),) = made["blended"].done
    with rasterio.open(outputs.clusters) as m:
        ids = m.read(1)
    valid = (made["img"] != 0).any(axis=0)
    assert ((ids != 255) == valid).all()  # edges included: 610 and 530 are not multiples of 64
    assert set(np.unique(ids[valid])) == {0, 1, 2}


def test_inside_a_core_the_map_is_a_direct_forward_pass(made):
    ((_, outputs, _),) = made["blended"].done
    model = checkpoint.load_model(str(made["model"]))[0]
    with rasterio.open(outputs.clusters) as m:
        ids = m.read(1)
    valid = (made["img"] != 0).any(axis=0)
    with rasterio.open(made["raster"]) as src:
        for r, c in [(64, 128), (256, 320), (448, 576)]:  # the last reaches past the edge
            want = forward_core(model, src, r, c)
            h, w = Layout(HEIGHT, WIDTH, CORE, MARGIN).kept(r, c)
            ok = valid[r : r + h, c : c + w]
            assert (ids[r : r + h, c : c + w] == want[:h, :w])[ok].all()


def seam_mismatch(made, run: str) -> float:
    """Fraction of valid pixels near core borders whose map id differs from a forward pass on
    a window centred on the border (a corner where four cores meet)."""
    ((_, outputs, _),) = made[run].done
    model = checkpoint.load_model(str(made["model"]))[0]
    with rasterio.open(outputs.clusters) as m:
        ids = m.read(1)
    valid = (made["img"] != 0).any(axis=0)
    wrong = total = 0
    with rasterio.open(made["raster"]) as src:
        for r in range(CORE, HEIGHT - CORE, CORE):
            for c in range(CORE, WIDTH - CORE, CORE):
                # The core of this window is centred on the corner (r, c).
                want = forward_core(model, src, r - CORE // 2, c - CORE // 2)
                got = ids[r - CORE // 2 : r + CORE // 2, c - CORE // 2 : c + CORE // 2]
                ok = valid[r - CORE // 2 : r + CORE // 2, c - CORE // 2 : c + CORE // 2]
                wrong += int(((got != want) & ok).sum())
                total += int(ok.sum())
    return wrong / total


def test_tile_borders_leave_no_seam_and_the_test_sees_seams_without_blending(made):
    assert seam_mismatch(made, "blended") < 0.002
    # Without a margin every core sees zero padding at its border: the same check fails.
    assert seam_mismatch(made, "plain") > 0.02


def test_probabilities_are_scaled_bands_whose_argmax_is_the_map(made):
    ((_, outputs, _),) = made["blended"].done
    with rasterio.open(outputs.probabilities) as p, rasterio.open(outputs.clusters) as m:
        probs, ids = p.read(), m.read(1)
        assert p.count == 3 and p.nodata == 255 and p.scales[0] == pytest.approx(1 / 254)
        assert p.descriptions == ("P(0 c)", "P(1 a)", "P(2 b)")
    valid = ids != 255
    sums = probs[:, valid].astype(int).sum(axis=0)
    assert abs(sums - PROBABILITY_SCALE).max() <= 2  # rounding of three bands
    agree = (probs[:, valid].argmax(axis=0) == ids[valid]).mean()
    assert agree > 0.99  # ties after rounding may go either way
    assert (probs[:, ~valid] == 255).all()


def test_head_a_and_a_raster_without_crs(made, tmp_path):
    raster = write_raster(tmp_path / "plain.tif", made["img"][:, :200, :150], crs=None)
    lines: list[str] = []
    report = segment(
        str(made["model"]),
        str(raster),
        str(tmp_path / "out"),
        SegmentOptions(head="A", subhead=0, core=CORE, progress=False),
        say=lines.append,
    )
    assert lines[0] == f"{raster}: no CRS; its map is written without one"
    with rasterio.open(report.done[0][1].clusters) as m:
        ids = m.read(1)
        assert m.crs is None and m.descriptions[0] == "IID clusters (head A, sub-head 0)"
    assert ids[ids != 255].max() < 5 and len(np.unique(ids[ids != 255])) > 1


# ------------------------------------------------------------------------------ bad input
def test_bad_rasters_get_one_line_each_and_no_output(made, tmp_path, capsys):
    src = tmp_path / "src"
    write_raster(src / "good.tif", made["img"][:, :100, :100])
    write_raster(src / "four.tif", scene(bands=4)[:, :100, :100])
    write_raster(src / "wide.tif", made["img"][:, :100, :100].astype(np.uint16))
    (src / "garbage.tif").write_bytes(b"II*\x00 not a tiff at all")
    cut = write_raster(src / "cut.tif", made["img"])
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.6)])
    out = tmp_path / "out"
    code = cli_main(
        ["segment", "--model", str(made["model"]), "--src", str(src), "--out", str(out)]
        + ["--core", "64", "--no-progress"]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    lines = err[1:]
    assert err[0] == "iid segment: 4 raster(s) not segmented:"
    assert len(lines) == 4, err
    assert any(f"{src / 'four.tif'}: has 4 bands, the model takes 3" in ln for ln in lines)
    assert any(f"{src / 'wide.tif'}: holds uint16 pixels" in ln for ln in lines)
    assert any(f"{src / 'garbage.tif'}: not a readable raster" in ln for ln in lines)
    assert any(f"{src / 'cut.tif'}: read failed at rows" in ln for ln in lines)
    assert sorted(p.name for p in out.iterdir()) == ["good_clusters.tif", "good_preview.png"]


def test_a_clustering_model_and_a_bad_subhead_are_refused_up_front(made, tmp_path):
    with pytest.raises(ConfigError, match=r"--subhead: 2, but the model has 2 sub-heads"):
        segment(str(made["model"]), str(made["raster"]), str(tmp_path), SegmentOptions(subhead=2))
    with pytest.raises(ConfigError, match=r"--names: 4 names for the 3 clusters of head B"):
        opts = SegmentOptions(names=("a", "b", "c", "d"))
        segment(str(made["model"]), str(made["raster"]), str(tmp_path), opts)
    with pytest.raises(ConfigError, match=r"--src: .*nowhere.tif does not exist"):
        segment(str(made["model"]), str(tmp_path / "nowhere.tif"), str(tmp_path))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "text, want",
    [
        ("[road, tree, roof]", ("road", "tree", "roof")),
        ("{2: roof, 0: road}", ("road", "", "roof")),
    ],
)
def test_names_files(tmp_path, text, want):
    (tmp_path / "n.yaml").write_text(text)
    assert read_names(str(tmp_path / "n.yaml")) == want


def test_a_names_file_that_is_neither_list_nor_mapping_is_one_line(tmp_path):
    (tmp_path / "n.yaml").write_text("road")
    with pytest.raises(ConfigError, match=r"--names: .*n.yaml must hold a list of names"):
        read_names(str(tmp_path / "n.yaml"))


# --------------------------------------------------------------------- killed, then rerun
def test_a_killed_run_leaves_no_map_and_a_rerun_finishes_then_skips(made, tmp_path):
    import ray

    out = tmp_path / "out"
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # Small cores: many windows, so the run is still writing when it is killed.
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", "--model", str(made["model"])]
    cmd += ["--src", str(made["raster"]), "--out", str(out), "--core", "16", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.part.tif")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob(".*.part.tif")), "killed before writing anything"
    assert not (out / "scene_clusters.tif").exists()

    opts = SegmentOptions(core=CORE, progress=False)
    first = segment(str(made["model"]), str(made["raster"]), str(out), opts)
    assert len(first.done) == 1 and not first.skipped
    assert sorted(p.name for p in out.iterdir()) == ["scene_clusters.tif", "scene_preview.png"]
    again = segment(str(made["model"]), str(made["raster"]), str(out), opts)
    assert not again.done and again.skipped == [(str(made["raster"]), first.done[0][1])]


def test_without_a_terminal_progress_is_a_line_every_few_seconds(
    made, tmp_path, capsys, monkeypatch
):
    from pipeline.segment import run

    monkeypatch.setattr(run, "PROGRESS_EVERY", 0.0)  # a line per window scored
    args = ["segment", "--model", str(made["model"]), "--src", str(made["raster"])]
    assert cli_main([*args, "--out", str(tmp_path / "out"), "--core", "128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    windows = len(Layout(HEIGHT, WIDTH, 128, MARGIN).cores())
    assert f"scoring {windows} windows with 1 model actor(s)" in lines
    counts = [int(ln.split("/")[0]) for ln in lines if "windows scored" in ln]
    assert counts == list(range(1, windows + 1)), lines


def test_default_output_holds_only_the_projects_lines(made, tmp_path):
    import ray

    from tests.test_cli import noise

    # A process of its own: Ray Core writes its C++ log lines once per process, to its stderr.
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", "--model", str(made["model"])]
    cmd += ["--src", str(made["raster"]), "--out", str(tmp_path / "out"), "--core", "128"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = (run.stdout + run.stderr).splitlines()
    assert any(ln.startswith("segmented 1 raster(s)") for ln in lines), lines
    assert not noise(lines), lines


# ------------------------------------------------------------------------- real imagery
def test_potsdam_mini_map_scores_as_iid_evaluate_does_on_the_same_pixels(
    potsdam_mini, tmp_path, ray_cluster
):
    """A model trained on the real crop: its map of the whole GeoTIFF, scored against the label
    raster, gives the ACC that `iid evaluate` gives on every tile of the crop (the same
    pixels: 128 px tiles cover the 512 px crop exactly)."""
    from pipeline.data.format import label_lut, read_manifest
    from pipeline.evaluate import evaluate_uri
    from pipeline.metrics import cluster_scores
    from pipeline.prepare.potsdam import colours_to_classes, prepare_potsdam
    from pipeline.prepare.run import TilingOptions
    from pipeline.train import fit

    opts = TilingOptions(tile=128, stride=128, progress=False, test_fraction=0.25)
    manifest = prepare_potsdam(potsdam_mini, tmp_path / "shards", opts)
    cfg = Config.from_dict(
        {
            "data": {"shards": str(tmp_path / "shards"), "merge": "potsdam3", "pairs_on": "worker"},
            "model": {"n_clusters_a": 9, "n_clusters_b": 3, "width": 0.25},
            "loss": {"lamb_b": 1.5, "half_window": 5},
            "optim": {"lr": 0.002, "epochs": 2},
            "pairs": {"crop": 64},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "run": {
                "name": "pm",
                "storage_path": str(tmp_path / "runs"),
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            },
        }
    )
    fit(cfg)
    run = str(tmp_path / "runs" / "pm")
    ev, classes, _ = evaluate_uri(run, tmp_path / "shards", splits=list(manifest["splits"]))

    image = next((potsdam_mini / "2_Ortho_RGB").glob("*.tif"))
    report = segment(run, str(image), str(tmp_path / "maps"), SegmentOptions(progress=False))
    with rasterio.open(report.done[0][1].clusters) as m, rasterio.open(image) as src:
        assert (m.crs, m.transform, m.shape) == (src.crs, src.transform, src.shape)
        ids = m.read(1)
    with rasterio.open(next((potsdam_mini / "5_Labels_all_noBoundary").glob("*.tif"))) as lab:
        lut, _ = label_lut(read_manifest(tmp_path / "shards"), "potsdam3")
        target = lut[colours_to_classes(lab.read())]
    scored = target != 255
    assert (ids[scored] != 255).all()
    counts = np.zeros((3, len(classes)), dtype=np.int64)
    np.add.at(counts, (ids[scored], target[scored]), 1)
    assert counts.sum() == ev.counts[ev.best].sum()  # the same pixels
    assert cluster_scores(counts).acc == pytest.approx(ev.scores[ev.best].acc, abs=0.01)
