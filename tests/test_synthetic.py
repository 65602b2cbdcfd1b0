"""The embedded default scene: Potsdam layout, same preparation path, and a fair test."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from pipeline.prepare.potsdam import POTSDAM3, colours_to_classes
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.synthetic import (
    SceneSpec,
    colour_kmeans_accuracy,
    make_scene,
    prepare_synthetic,
    supervised_accuracy,
)


def test_synthetic_scene_goes_through_the_potsdam_path(tmp_path):
    spec = SceneSpec(size=512, seed=3)
    opts = TilingOptions(tile=128, stride=128, progress=False)
    manifest = prepare_synthetic(tmp_path, opts, spec, baselines=False)
    raw = tmp_path / "raw"
    ortho = raw / "2_Ortho_RGB/top_potsdam_1_1_RGB.tif"
    label = raw / "5_Labels_all/top_potsdam_1_1_label.tif"
    assert (raw / "5_Labels_all_noBoundary/top_potsdam_1_1_label_noBoundary.tif").is_file()
    with rasterio.open(ortho) as src, rasterio.open(label) as lab:
        assert src.count == 3 and src.crs.to_epsg() == 32633
        classes = colours_to_classes(lab.read())
    img, cls = make_scene(spec)
    assert np.array_equal(classes, cls)  # the label TIFF is exactly the generated class map
    assert len(set(np.unique(cls)) & {0, 1, 2, 3}) == 4
    assert manifest["dataset"] == "potsdam" and manifest["synthetic"]["size"] == 512
    assert sum(s["tiles"] for s in manifest["splits"].values()) == 16
    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "shards").rglob("*.parquet"))
    assert rows == 16


@pytest.mark.slow
def test_default_scene_defeats_colour_but_not_context():
    img, cls = make_scene(SceneSpec())
    assert img.shape == (3, 2048, 2048)
    shares = np.bincount(np.array(POTSDAM3)[cls].ravel(), minlength=3) / cls.size
    assert shares.min() > 0.15  # no class is a rounding error
    kmeans = colour_kmeans_accuracy(img, cls)
    colour = supervised_accuracy(img, cls, context=False)
    context = supervised_accuracy(img, cls, context=True)
    assert kmeans <= 0.7
    assert context >= 0.9 and context > colour + 0.04 and context > kmeans + 0.3


def test_rural_scene_skews_the_classes_toward_vegetation():
    def shares(spec: SceneSpec) -> np.ndarray:
        cls = make_scene(spec)[1]
        return np.bincount(np.array(POTSDAM3)[cls].ravel(), minlength=3) / cls.size

    default = shares(SceneSpec(size=1024))
    rural = shares(SceneSpec(size=1024, roads=1, buildings=0.1))
    assert default.max() < 0.5
    assert rural[2] > 0.65 and rural[2] > default[2] + 0.2  # vegetation (with trees)
    assert rural[0] < default[0] / 2  # roads


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"size": 128}, r"scene size must be >= 256 px, got 128"),
        ({"size": 256, "roads": 200}, r"scene roads must be 0-136 per direction .* got 200"),
        ({"roads": -1}, r"scene roads must be 0-1928 .* got -1"),
        ({"buildings": 5}, r"scene buildings must be a density in \[0, 4\], got 5"),
        ({"trees": -0.5}, r"scene trees must be a density in \[0, 4\], got -0.5"),
    ],
)
def test_scene_spec_refuses_what_cannot_be_drawn(spec, match):
    with pytest.raises(ValueError, match=match):
        SceneSpec(**spec)


def test_the_smallest_documented_scene_prepares_with_its_baselines(tmp_path):
    """--size 256 (the documented minimum) failed in the baselines after the shards were
    written, leaving a manifest without them."""
    manifest = prepare_synthetic(tmp_path, TilingOptions(progress=False), SceneSpec(size=256))
    assert set(manifest["baselines_potsdam3"]) == {
        "kmeans_on_pixel_colour_acc",
        "supervised_pixel_colour_acc",
        "supervised_colour_and_context_acc",
    }
    assert manifest["synthetic"]["size"] == 256
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text()) == manifest
