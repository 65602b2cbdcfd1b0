"""ISPRS Potsdam in the release's own layout -> Parquet shards.

Labels are stored with the 6 Potsdam classes; the Potsdam-3 merge is recorded in the manifest
(``merges.potsdam3``) and applied by training, so one preparation serves both benchmarks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.data.format import PrepareError
from pipeline.prepare.labels import Palette, PaletteLabels
from pipeline.prepare.run import Source, TilingOptions, prepare_tiles

CLASSES = ("impervious", "building", "low_vegetation", "tree", "car", "clutter")
COLOURS = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
BOUNDARY = (0, 0, 0)
POTSDAM3 = (0, 1, 2, 2, 0, 1)  # roads+cars, buildings+clutter, low vegetation+trees
POTSDAM3_CLASSES = ("roads_and_cars", "buildings_and_clutter", "vegetation")

VARIANTS = {  # variant -> (folder, file suffix, bands)
    "rgb": ("2_Ortho_RGB", "RGB", 3),
    "irrg": ("3_Ortho_IRRG", "IRRG", 3),
    "rgbir": ("4_Ortho_RGBIR", "RGBIR", 4),
}
BAND_NAMES = {"rgb": ["R", "G", "B"], "irrg": ["IR", "R", "G"], "rgbir": ["R", "G", "B", "IR"]}
LABEL_SETS = {  # --labels -> (folder, file suffix)
    "noboundary": ("5_Labels_all_noBoundary", "label_noBoundary"),
    "all": ("5_Labels_all", "label"),
}

PALETTE = Palette(COLOURS, ignored={"boundary": BOUNDARY})


def colours_to_classes(rgb: np.ndarray) -> np.ndarray:
    """Map a (3, h, w) colour-coded label to (h, w) class ids.

    Black (eroded boundary) and any colour off the palette become IGNORE_INDEX: guessing the
    class of a colour the release does not define would plant wrong labels.

    Raises:
        LabelValueError: fewer than 3 bands.
    """
    return PALETTE.classes(rgb)


def count_unmapped(rgb: np.ndarray) -> tuple[int, int]:
    """(boundary pixels, off-palette pixels) of a (3, h, w) colour label."""
    counts = PALETTE.count(rgb)[1]
    return counts["boundary"], counts["off_palette"]


def find_sources(src: Path, variant: str, labels: str) -> tuple[list[Source], list[dict]]:
    """Image/label pairs of a Potsdam release folder.

    Returns:
        (sources, bad files), where a bad file is an image whose name does not parse.

    Raises:
        PrepareError: unknown variant, missing folder, or no image at all.
    """
    if variant not in VARIANTS:
        raise PrepareError(f"--variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    folder, suffix, _ = VARIANTS[variant]
    image_dir = src / folder
    if not image_dir.is_dir():
        raise PrepareError(
            f"{image_dir}: folder not found (expected the ISPRS Potsdam layout "
            f"with {folder}/top_potsdam_<row>_<col>_{suffix}.tif)"
        )
    label_dir, label_suffix = LABEL_SETS[labels]
    pattern = re.compile(rf"top_potsdam_(\d+)_(\d+)_{suffix}\.tif$")
    sources, bad = [], []
    for path in sorted(image_dir.glob("*.tif")):
        m = pattern.match(path.name)
        if not m:
            bad.append(
                {
                    "file": str(path),
                    "error": f"{path}: name does not match top_potsdam_<row>_<col>_{suffix}.tif",
                }
            )
            continue
        label = src / label_dir / f"top_potsdam_{m[1]}_{m[2]}_{label_suffix}.tif"
        sources.append(Source(path, label if label.is_file() else None))
    if not sources:
        raise PrepareError(f"{image_dir}: no top_potsdam_*_{suffix}.tif images found")
    return sources, bad


def prepare_potsdam(
    src: Path,
    out: Path,
    opts: TilingOptions,
    variant: str = "rgb",
    labels: str = "noboundary",
    extra: dict | None = None,
) -> dict:
    """Tile a Potsdam release into shards; returns the manifest (with ``extra`` in it).

    Raises:
        PrepareError / BadFilesError: see ``prepare_tiles``.
    """
    if labels not in LABEL_SETS:
        raise PrepareError(f"--labels must be one of {sorted(LABEL_SETS)}, got {labels!r}")
    sources, bad = find_sources(src, variant, labels)
    counter = PaletteLabels(PALETTE)  # counts boundary and off-palette pixels on the way
    meta = {
        "dataset": "potsdam",
        "variant": variant,
        "bands": VARIANTS[variant][2],
        "band_names": BAND_NAMES[variant],
        "classes": list(CLASSES),
        "colours": [list(c) for c in COLOURS],
        "ignore_index": 255,
        "merges": {"potsdam3": {"map": list(POTSDAM3), "classes": list(POTSDAM3_CLASSES)}},
        "labels": labels,
        "sources": len(sources),
    } | (extra or {})
    return prepare_tiles(
        sources,
        out,
        opts,
        meta=meta,
        n_classes=len(CLASSES),
        label_fn=counter,
        expect_bands=VARIANTS[variant][2],
        root=src,
        bad_files=bad,
        late_meta=lambda: {"ignored_label_pixels": dict(counter.counts)},
    )
