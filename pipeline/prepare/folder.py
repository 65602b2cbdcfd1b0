"""A folder of the user's own imagery (PNG, JPEG, TIFF; no labels) -> Parquet shards."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.format import PrepareError
from pipeline.prepare.raster import raster_info
from pipeline.prepare.run import Source, TilingOptions, prepare_tiles

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def find_images(src: Path, exclude: Path | None = None) -> tuple[list[Source], list[dict]]:
    """Images under ``src`` (recursively) and the non-image files found beside them; nothing
    under ``exclude`` (the output folder, when it lies inside ``src``).

    Raises:
        PrepareError: if ``src`` is not a folder or holds no image.
    """
    if not src.is_dir():
        raise PrepareError(f"{src}: not a folder")
    sources, bad = [], []
    skip = exclude.resolve() if exclude else None
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(src).parts):
            continue  # hidden files (.DS_Store, editors' swap files, a prepare's staging)
        if skip and path.resolve().is_relative_to(skip):
            continue  # the dataset being replaced is not imagery
        if path.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(Source(path))
        else:
            bad.append(
                {
                    "file": str(path),
                    "error": f"{path}: not an image (expected one of {', '.join(IMAGE_SUFFIXES)})",
                }
            )
    if not sources:
        raise PrepareError(f"{src}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return sources, bad


def prepare_folder(src: Path, out: Path, opts: TilingOptions, bands: int | None = None) -> dict:
    """Tile every image of a folder; all must have the same band count (``bands``, or the first
    readable image's). Returns the manifest.
    """
    if bands is not None and bands < 1:
        raise PrepareError(f"--bands must be >= 1, got {bands}")
    sources, bad = find_images(src, exclude=out)
    if bands is None:
        for s in sources:
            try:
                bands = raster_info(s.image)[0]
                break
            except PrepareError:
                continue
    meta = {
        "dataset": "folder",
        "bands": bands,
        "classes": [],
        "ignore_index": 255,
        "sources": len(sources),
    }
    return prepare_tiles(
        sources, out, opts, meta=meta, n_classes=0, expect_bands=bands, root=src, bad_files=bad
    )
