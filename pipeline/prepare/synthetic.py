"""A generated aerial-like scene in the Potsdam release layout: the embedded default dataset.

Roads (with lane markings and cars), buildings (gabled roofs of several materials), low
vegetation and trees. The classes are made to overlap in colour (grey roofs look like asphalt,
moss-green roofs like grass, dry grass like terracotta) and to differ in texture and structure
(smooth straight bands, flat rectangles with a ridge, fine noise, round blobs with shading), so
per-pixel colour alone cannot separate them but context can. ``colour_kmeans_accuracy`` and
``context_kmeans_accuracy`` measure exactly that.

The scene is written as GeoTIFFs exactly where the real release keeps them, so the demo runs the
same preparation path as real data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage

from pipeline.prepare.potsdam import COLOURS, POTSDAM3

IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR = 0, 1, 2, 3, 4
MIN_SCENE = 256


@dataclass(frozen=True)
class SceneSpec:
    size: int = 2048
    seed: int = 0
    roads: int = 0  # per direction; 0: one per 256 px of side
    tiles: tuple[tuple[int, int], ...] = ((1, 1),)
    # Density of buildings and trees, 1 = the default scene; lower values skew the classes
    # toward vegetation (a rural scene), as real scenes often are.
    buildings: float = 1.0
    trees: float = 1.0

    def __post_init__(self) -> None:
        # Buildings are up to 240 px a side and roads keep 60 px from the edges.
        if self.size < MIN_SCENE:
            raise ValueError(f"scene size must be >= {MIN_SCENE} px, got {self.size!r}")
        if not 0 <= self.roads <= self.size - 120:
            raise ValueError(
                f"scene roads must be 0-{self.size - 120} per direction for a {self.size} px "
                f"scene, got {self.roads!r}"
            )
        for key in ("buildings", "trees"):
            if not 0 <= getattr(self, key) <= 4:
                raise ValueError(
                    f"scene {key} must be a density in [0, 4], got {getattr(self, key)!r}"
                )


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation and correlation length ~sigma px."""
    # Centred, and sigma capped by the scene size: on a small scene a wide filter leaves a
    # near-constant field whose mean, divided by its tiny spread, would saturate the image.
    field = ndimage.gaussian_filter(rng.standard_normal(shape), min(sigma, min(shape) / 8))
    field -= field.mean()
    return field / (field.std() + 1e-9)


def _draw_layout(
    rng: np.random.Generator, size: int, n_roads: int, buildings: float = 1.0, trees: float = 1.0
) -> tuple[np.ndarray, list]:
    """Class map (h, w) uint8 and the road rectangles."""
    cls = np.full((size, size), LOW_VEG, dtype=np.uint8)
    roads = []
    for axis in (0, 1):
        for pos in np.sort(rng.choice(np.arange(60, size - 60), n_roads, replace=False)):
            width = int(rng.integers(30, 70))
            lo = max(0, pos - width // 2)
            sl = (
                (slice(lo, lo + width), slice(None))
                if axis == 0
                else (slice(None), slice(lo, lo + width))
            )
            cls[sl] = IMPERVIOUS
            roads.append((axis, lo, width))
    # Buildings: rectangles that must not cover roads.
    for _ in range(int(size * size * buildings) // 2000):
        h, w = int(rng.integers(40, 240)), int(rng.integers(40, 240))
        y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        if (cls[y : y + h, x : x + w] == LOW_VEG).all():
            cls[y : y + h, x : x + w] = BUILDING
    # Trees: discs on vegetation only.
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(size * size * trees) // 12000):
        r = int(rng.integers(8, 34))
        y, x = int(rng.integers(r, size - r)), int(rng.integers(r, size - r))
        win = (slice(y - r, y + r + 1), slice(x - r, x + r + 1))
        disc = (yy[win] - y) ** 2 + (xx[win] - x) ** 2 <= r * r
        patch = cls[win]
        patch[disc & (patch == LOW_VEG)] = TREE
    return cls, roads


def _paint(rng: np.random.Generator, cls: np.ndarray, roads: list) -> np.ndarray:
    size = cls.shape[0]
    img = np.zeros((size, size, 3), dtype=np.float64)
    # Low vegetation: green to dry-brown patches, fine grass texture.
    mix = (_noise(rng, cls.shape, 60) > 0.3).astype(float)[..., None]
    green, dry = np.array([95, 125, 70]), np.array([150, 115, 85])
    veg = green * (1 - mix) + dry * mix + 16 * _noise(rng, cls.shape, 1.0)[..., None]
    img[:] = veg
    # Trees: dark canopy, coarse leaf texture, shaded towards the rims.
    canopy = np.array([55, 95, 50]) + 22 * _noise(rng, cls.shape, 2.0)[..., None]
    dist = ndimage.distance_transform_edt(cls == TREE)
    shade = np.clip(dist / 12, 0.45, 1.0)[..., None]
    img = np.where((cls == TREE)[..., None], canopy * shade + 20, img)
    # Roads: smooth asphalt with per-road tone and dashed centre lines.
    asphalt = np.full(cls.shape, 118.0) + 3 * _noise(rng, cls.shape, 0.7)
    marks = np.zeros(cls.shape, bool)
    for axis, lo, width in roads:
        centre = lo + width // 2
        dash = (np.arange(size) // 24) % 2 == 0
        if axis == 0:
            marks[centre - 1 : centre + 2, dash] = True
        else:
            marks[dash, centre - 1 : centre + 2] = True
    road = np.repeat(asphalt[..., None], 3, axis=2)
    road[marks] = 225
    img = np.where((cls == IMPERVIOUS)[..., None], road, img)
    # Buildings: roofs copy another class's colour *and* per-pixel spread (asphalt-grey or
    # grass-green/dry-brown with the same noise amplitude), but their noise is spatially smooth
    # and they have a ridge and dark eaves: only neighbourhoods tell them apart.
    labels, _ = ndimage.label(cls == BUILDING)
    materials = [(np.array([118.0, 118.0, 120.0]), 3.0), (green, 16.0), (dry, 16.0)]
    smooth = _noise(rng, cls.shape, 5.0)[..., None]
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[sl] == i
        base, spread = materials[rng.integers(len(materials))]
        h, w = mask.shape
        ridge = np.zeros((h, w, 1))
        if h > w:
            ridge[:, : w // 2] = 1
        else:
            ridge[: h // 2] = 1
        roof = base * (0.97 + 0.06 * ridge) + spread * smooth[sl]
        edge = mask & ~ndimage.binary_erosion(mask, iterations=3)
        roof[edge] = base * 0.6
        img[sl][mask] = roof[mask]
    # Cars on roads: small saturated rectangles.
    road_px = np.argwhere((cls == IMPERVIOUS) & ~marks)
    for y, x in road_px[rng.choice(len(road_px), size * size // 40000, replace=False)]:
        h, w = (10, 20) if rng.random() < 0.5 else (20, 10)
        win = (slice(y, y + h), slice(x, x + w))
        if (cls[win] == IMPERVIOUS).all() and cls[win].shape == (h, w):
            cls[win] = CAR
            img[win] = rng.choice([[200, 30, 30], [230, 230, 235], [30, 40, 160], [20, 20, 20]])
    # Sun and haze: a slow illumination field over everything.
    img *= (1 + 0.12 * _noise(rng, cls.shape, 200))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def make_scene(spec: SceneSpec, tile: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """(image (3, h, w) uint8, class map (h, w) uint8) of one generated scene tile."""
    rng = np.random.default_rng([spec.seed, *tile])
    n_roads = spec.roads or max(1, spec.size // 256)
    cls, roads = _draw_layout(rng, spec.size, n_roads, spec.buildings, spec.trees)
    img = _paint(rng, cls, roads)
    return img.transpose(2, 0, 1), cls


def classes_to_colours(cls: np.ndarray, boundary: bool = False) -> np.ndarray:
    """(3, h, w) Potsdam colour label; with ``boundary`` class edges are eroded to black."""
    palette = np.array(COLOURS, dtype=np.uint8)
    rgb = palette[cls].transpose(2, 0, 1).copy()
    if boundary:
        edges = ndimage.grey_dilation(cls, size=3) != ndimage.grey_erosion(cls, size=3)
        rgb[:, edges] = 0
    return rgb


def _write_tif(path: Path, array: np.ndarray, transform) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    profile = {
        "driver": "GTiff",
        "height": array.shape[1],
        "width": array.shape[2],
        "count": array.shape[0],
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array)
    tmp.replace(path)


def write_scene_tile(out: Path, spec: SceneSpec, tile: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Generate one scene tile and write ortho and both label TIFFs in the Potsdam layout.

    Returns:
        (image (3, h, w), class map (h, w)).
    """
    r, c = tile
    img, cls = make_scene(spec, tile)
    # 5 cm pixels in UTM 33N near Potsdam, tiles side by side.
    transform = from_origin(
        368000 + c * spec.size * 0.05, 5808000 - r * spec.size * 0.05, 0.05, 0.05
    )
    stem = f"top_potsdam_{r}_{c}"
    _write_tif(out / "2_Ortho_RGB" / f"{stem}_RGB.tif", img, transform)
    _write_tif(out / "5_Labels_all" / f"{stem}_label.tif", classes_to_colours(cls), transform)
    _write_tif(
        out / "5_Labels_all_noBoundary" / f"{stem}_label_noBoundary.tif",
        classes_to_colours(cls, boundary=True),
        transform,
    )
    return img, cls


def _matched_acc(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    from pipeline.metrics import cluster_scores

    counts = np.zeros((k, int(target.max()) + 1), dtype=np.int64)
    np.add.at(counts, (pred, target), 1)
    return cluster_scores(counts).acc


def _kmeans_acc(features: np.ndarray, target: np.ndarray, k: int, seed: int) -> float:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    fit = rng.choice(len(features), min(len(features), 50_000), replace=False)
    km = KMeans(k, n_init=4, random_state=seed).fit(features[fit])
    return _matched_acc(km.predict(features), target, k)


def colour_kmeans_accuracy(img: np.ndarray, cls: np.ndarray, seed: int = 0) -> float:
    """Potsdam-3 accuracy of k-means (k=3) on per-pixel colour: the baseline to beat."""
    target = np.array(POTSDAM3, dtype=np.int64)[cls].ravel()
    return _kmeans_acc(img.reshape(3, -1).T.astype(np.float64), target, 3, seed)


def _context_features(img: np.ndarray) -> np.ndarray:
    """Per-pixel colour, plus local means and texture (local grey std) at two scales."""
    bands = img.astype(np.float64)
    grey = bands.mean(axis=0)
    feats = list(bands)
    for sigma in (3, 9):
        feats += [ndimage.gaussian_filter(b, sigma) for b in bands]
        local = ndimage.gaussian_filter(grey, sigma)
        feats.append(np.sqrt(np.maximum(ndimage.gaussian_filter(grey**2, sigma) - local**2, 0)))
    return np.stack([f.ravel() for f in feats], axis=1)


def supervised_accuracy(img: np.ndarray, cls: np.ndarray, context: bool, seed: int = 0) -> float:
    """Potsdam-3 accuracy of a classifier trained on the top half, tested on the bottom half.

    With ``context=False`` it sees one pixel's colour: an upper bound for any per-pixel colour
    method. With ``context=True`` it also sees neighbourhood means and texture. The gap shows
    the scene rewards context, which is what IID's dense loss learns without labels.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = _context_features(img) if context else img.reshape(3, -1).T.astype(np.float64)
    y = np.array(POTSDAM3, dtype=np.int64)[cls].ravel()
    half = x.shape[0] // 2
    rng = np.random.default_rng(seed)
    train = rng.choice(half, min(half, 60_000), replace=False)  # all of a small scene
    test = half + rng.choice(x.shape[0] - half, min(x.shape[0] - half, 60_000), replace=False)
    model = HistGradientBoostingClassifier(max_iter=100, random_state=seed)
    model.fit(x[train], y[train])
    return float((model.predict(x[test]) == y[test]).mean())


def prepare_synthetic(
    out: Path,
    opts,
    spec: SceneSpec = SceneSpec(),
    baselines: bool = True,
    say: Callable[[str], None] = lambda line: None,
) -> dict:
    """Generate the scene under ``out/raw`` (Potsdam layout) and prepare it into ``out/shards``
    through the Potsdam path; the baselines are recorded in the manifest. ``say`` hears what
    each stage is about to do (the scene and the baselines take a while before any tile).
    """
    from pipeline.prepare.potsdam import prepare_potsdam
    from pipeline.prepare.shards import check_output

    check_output(out / "shards", opts.overwrite)  # before the scene is generated
    say(f"generating the {spec.size} x {spec.size} scene ({len(spec.tiles)} tile(s)) in {out}/raw")
    img, cls = write_scene_tile(out / "raw", spec, spec.tiles[0])
    for tile in spec.tiles[1:]:
        write_scene_tile(out / "raw", spec, tile)
    extra = {
        "synthetic": {
            "size": spec.size,
            "seed": spec.seed,
            "tiles": [list(t) for t in spec.tiles],
        }
        | {"roads": spec.roads, "buildings": spec.buildings, "trees": spec.trees}
    }
    if baselines:  # before the shards: the manifest is written once, whole
        say("measuring the baselines: k-means on colour, supervised on colour and context")
        extra["baselines_potsdam3"] = {
            "kmeans_on_pixel_colour_acc": round(colour_kmeans_accuracy(img, cls, spec.seed), 4),
            "supervised_pixel_colour_acc": round(supervised_accuracy(img, cls, False), 4),
            "supervised_colour_and_context_acc": round(supervised_accuracy(img, cls, True), 4),
        }
    say(f"tiling into {out}/shards")
    manifest = prepare_potsdam(out / "raw", out / "shards", opts, variant="rgb", extra=extra)
    return manifest
