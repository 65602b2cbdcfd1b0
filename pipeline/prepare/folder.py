"""A folder of the user's own imagery (PNG, JPEG, TIFF), with or without masks -> Parquet shards.

Masks pair with images by relative path and stem: ``SRC/a/b/x.tif`` takes the mask
``LABELS/a/b/x.<png|jpg|jpeg|tif|tiff>``. A SRC holding ``img_dir/`` and ``ann_dir/`` (the
layout of mmsegmentation, LoveDA and others) pairs ``img_dir`` with ``ann_dir`` without
``--labels``. A mask is a class-index raster (1 band of integer class ids) or, with
``--palette``, a colour-coded RGB raster (``pipeline.prepare.labels``). Images without a mask
are tiled into the unlabelled split (trained on, not scored); masks without an image are listed
in the manifest (``unpaired_masks``) and fail nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pipeline import IGNORE_INDEX
from pipeline.data.format import PrepareError
from pipeline.prepare.labels import (
    MAX_CLASSES,
    Classes,
    IndexLabels,
    Palette,
    PaletteLabels,
    parse_merges,
    read_classes,
    scan_values,
)
from pipeline.prepare.raster import LabelFn, raster_info
from pipeline.prepare.run import Source, TilingOptions, prepare_tiles

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMG_DIR, ANN_DIR = "img_dir", "ann_dir"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _listing(root: Path, exclude: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``root``, recursively, sorted; hidden files and
    anything under ``exclude`` left out."""
    skip = [x.resolve() for x in exclude]
    images, others = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # hidden files (.DS_Store, editors' swap files, a prepare's staging)
        # The folder, not the file, is resolved: a symlinked image still counts as imagery.
        where = path.parent.resolve()
        if any(where.is_relative_to(x) for x in skip):
            continue  # the dataset being replaced, or the masks, are not imagery
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return images, others


def find_images(src: Path, exclude: Iterable[Path] = ()) -> tuple[list[Path], list[dict]]:
    """Images under ``src`` (recursively) and the non-image files found beside them as bad
    files; nothing under ``exclude`` (the output folder, the masks, when inside ``src``).

    Raises:
        PrepareError: if ``src`` is not a folder or holds no image.
    """
    if not src.is_dir():
        raise PrepareError(f"{src}: not a folder")
    images, others = _listing(src, exclude)
    bad = [
        {
            "file": str(p),
            "error": f"{p}: not an image (expected one of {', '.join(IMAGE_SUFFIXES)})",
        }
        for p in others
    ]
    if not images:
        raise PrepareError(f"{src}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images, bad


def pair_masks(
    images: Sequence[Path], image_root: Path, masks_root: Path, exclude: Iterable[Path] = ()
) -> tuple[list[Source], list[dict], list[str]]:
    """Each image with the mask of the same relative path and stem, any image suffix.

    Returns:
        (sources, bad files, masks without an image relative to ``masks_root``). An image that
        two masks match (``x.png`` and ``x.tif``) is a bad file: neither is a safe guess.
    """
    masks, _ = _listing(masks_root, exclude)  # other files beside masks are no input
    by_key: dict[Path, list[Path]] = {}
    for mask in masks:
        by_key.setdefault(mask.relative_to(masks_root).with_suffix(""), []).append(mask)
    sources, bad, used = [], [], set()
    for image in images:
        found = by_key.get(image.relative_to(image_root).with_suffix(""), [])
        used.update(found)
        if len(found) > 1:
            bad.append(
                {
                    "file": str(image),
                    "error": f"{image}: {len(found)} masks match it "
                    f"({', '.join(map(str, found))}); keep one",
                }
            )
            continue
        sources.append(Source(image, found[0] if found else None))
    unpaired = [str(m.relative_to(masks_root)) for m in masks if m not in used]
    return sources, bad, unpaired


def select_bands(
    sources: Sequence[Source], bands: int | None
) -> tuple[int | None, list[Source], list[dict]]:
    """Keep the images with ``bands`` bands, by default the count most of them have (ties:
    the first image's in name order); the others become bad files. Unreadable images are
    kept: ``prepare_tiles`` lists them with the reason.

    Returns:
        (band count, kept sources, bad files).
    """
    counts = []
    for s in sources:
        try:
            counts.append(raster_info(s.image)[0])
        except PrepareError:
            counts.append(None)
    if bands is None:
        tally = Counter(n for n in counts if n is not None)
        if not tally:
            return None, list(sources), []
        bands = tally.most_common(1)[0][0]
        why = "the majority of the images; pass --bands to choose"
    else:
        why = "--bands"
    keep, bad = [], []
    for s, n in zip(sources, counts, strict=True):
        if n is None or n == bands:
            keep.append(s)
        else:
            error = f"{s.image}: has {n} band{'s' if n != 1 else ''}, expected {bands} ({why})"
            bad.append({"file": str(s.image), "error": error})
    return bands, keep, bad


def _check_label_flags(
    masks: Path | None,
    classes: Path | None,
    num_classes: int | None,
    palette: Path | None,
    ignore_index: int | None,
    merges: Sequence[str],
) -> None:
    """The mask options agree with each other (before any file is read)."""
    flags = (
        ("--classes", classes),
        ("--num-classes", num_classes),
        ("--palette", palette),
        ("--ignore-index", ignore_index),
        ("--merge", merges or None),
    )
    given = [flag for flag, value in flags if value is not None]
    if masks is None and given:
        raise PrepareError(
            f"{given[0]} describes masks, but there are none: pass --labels LABELS (or give a "
            f"SRC holding {IMG_DIR}/ and {ANN_DIR}/)"
        )
    if palette is not None and (classes is not None or num_classes is not None):
        other = "--classes" if classes is not None else "--num-classes"
        raise PrepareError(f"--palette names the classes itself: drop {other}")
    if palette is not None and ignore_index is not None:
        raise PrepareError(
            "--ignore-index is for class-index masks; with --palette, pixels off the palette "
            "(or of an ignore: true colour) are ignored"
        )
    if classes is not None and num_classes is not None:
        raise PrepareError("give --classes or --num-classes, not both")
    if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
        raise PrepareError(f"--num-classes must be in 1-{MAX_CLASSES}, got {num_classes}")
    if ignore_index is not None and ignore_index < 0:
        raise PrepareError(f"--ignore-index must be >= 0, got {ignore_index}")


def _index_classes(
    masks: Sequence[Path],
    masks_root: Path,
    classes: Path | None,
    num_classes: int | None,
    ignore: int,
) -> Classes:
    """The classes of class-index masks: --classes, --num-classes, or else the values found in
    the masks (one pass over them)."""
    if classes is not None:
        found = read_classes(classes, "--classes")
        origin = f"the id of class {{name!r}} in --classes {classes}"
    elif num_classes is not None:
        found = Classes.numbered(range(num_classes))
        origin = f"a class id (--num-classes {num_classes} makes 0-{num_classes - 1} classes)"
    else:
        values, multiband = scan_values(masks, ignore)
        if not values:
            several = (
                f"; {len(multiband)} have several bands, first: {multiband[0]} (colour-coded "
                "masks need --palette)"
                if multiband
                else ""
            )
            raise PrepareError(
                f"{masks_root}: no class ids in the masks (other than --ignore-index "
                f"{ignore}){several}"
            )
        if len(values) > MAX_CLASSES:
            raise PrepareError(
                f"{masks_root}: {len(values)} distinct values in the masks, at most "
                f"{MAX_CLASSES} classes (not class-index masks? pass --palette for colours)"
            )
        return Classes.numbered(values)  # the ignore value is not among them
    if ignore in found.ids:
        name = found.names[found.ids.index(ignore)]
        raise PrepareError(f"--ignore-index {ignore} is also " + origin.format(name=name))
    return found


def _label_scheme(
    sources: Sequence[Source],
    masks_root: Path,
    classes: Path | None,
    num_classes: int | None,
    palette: Path | None,
    ignore_index: int | None,
) -> tuple[Classes, LabelFn, dict, Callable[[], dict] | None]:
    """(classes, label function, manifest entries, late manifest entries) of the masks."""
    if palette is not None:
        found = read_classes(palette, "--palette", need_colours=True)
        counter = PaletteLabels(
            Palette(found.colours, dict(found.ignored)),
            hint=", as --palette says; a class-index mask needs no --palette",
        )
        return (
            found,
            counter,
            {"labels": "palette"},
            lambda: {"ignored_label_pixels": dict(counter.counts)},
        )
    ignore = IGNORE_INDEX if ignore_index is None else ignore_index
    masks = [s.label for s in sources if s.label is not None]
    found = _index_classes(masks, masks_root, classes, num_classes, ignore)
    meta = {"labels": "index", "mask_values": list(found.ids), "mask_ignore_index": ignore}
    return found, IndexLabels(found.ids, ignore), meta, None


def _folders(src: Path, labels: Path | None) -> tuple[Path, Path | None]:
    """(image folder, mask folder or None): ``img_dir``/``ann_dir`` when SRC holds both."""
    if labels is not None:
        if not labels.is_dir():
            raise PrepareError(f"--labels {labels}: not a folder")
        if labels.resolve() == src.resolve():
            raise PrepareError(
                f"--labels {labels}: is SRC itself; masks need a folder of their own"
            )
    if (src / IMG_DIR).is_dir() and (src / ANN_DIR).is_dir():
        # Images from img_dir even with --labels: ann_dir's masks are no imagery.
        return src / IMG_DIR, labels or src / ANN_DIR
    return src, labels


def prepare_folder(
    src: Path,
    out: Path,
    opts: TilingOptions,
    bands: int | None = None,
    *,
    labels: Path | None = None,
    classes: Path | None = None,
    num_classes: int | None = None,
    palette: Path | None = None,
    ignore_index: int | None = None,
    merges: Sequence[str] = (),
) -> dict:
    """Tile every image of a folder, with its mask when it has one. Returns the manifest.

    Args:
        src: image folder (or one holding ``img_dir/`` and ``ann_dir/``).
        out: output folder.
        opts: tiling options.
        bands: required band count; by default the count most images have. Images with
            another count are skipped and listed as bad files.
        labels: mask folder, mirroring ``src`` (relative path and stem).
        classes: YAML file naming the classes of class-index masks (``labels.read_classes``);
            without it and ``num_classes``, the values found in the masks are the classes.
        num_classes: class-index masks hold the classes 0..num_classes-1.
        palette: YAML file of class colours: the masks are colour-coded RGB.
        ignore_index: mask value of ignored pixels in class-index masks (default 255).
        merges: ``NAME=GROUPS`` specs or YAML files (``labels.parse_merges``), recorded in the
            manifest for training's ``data.merge``.

    Raises:
        PrepareError: options that disagree, a bad classes/palette/merge file or spec, no
            image, no mask pairing with any image (one line each).
        BadFilesError: see ``prepare_tiles`` (files of another band count, masks with values
            outside the classes, image and mask of different sizes, ...).
    """
    if bands is not None and bands < 1:
        raise PrepareError(f"--bands must be >= 1, got {bands}")
    image_root, masks_root = _folders(src, labels)
    _check_label_flags(masks_root, classes, num_classes, palette, ignore_index, merges)
    root = src
    exclude = [out] + ([masks_root] if masks_root and _inside(masks_root, image_root) else [])
    images, bad = find_images(image_root, exclude=exclude)
    unpaired: list[str] = []
    if masks_root is None:
        sources = [Source(p) for p in images]
    else:
        inner = [out] + ([image_root] if _inside(image_root, masks_root) else [])
        sources, ambiguous, unpaired = pair_masks(images, image_root, masks_root, inner)
        bad += ambiguous
        if not any(s.label for s in sources):
            suffixes = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
            raise PrepareError(
                f"{masks_root}: no mask pairs with an image (the image {image_root}/a/x.tif "
                f"pairs with the mask {masks_root}/a/x.<{suffixes}>)"
            )
    bands, sources, wrong = select_bands(sources, bands)
    bad += wrong
    meta: dict = {"dataset": "folder", "bands": bands}
    n_classes, label_fn, late = 0, None, None
    if masks_root is None:
        meta |= {"classes": [], "ignore_index": IGNORE_INDEX}
    else:
        found, label_fn, extra, late = _label_scheme(
            sources, masks_root, classes, num_classes, palette, ignore_index
        )
        n_classes = len(found.names)
        meta |= found.manifest() | {"ignore_index": IGNORE_INDEX} | extra
        meta["merges"] = parse_merges(merges, found)
        meta["labelled_sources"] = sum(1 for s in sources if s.label is not None)
    meta["sources"] = len(images)
    if unpaired:
        meta["unpaired_masks"] = unpaired
        log.info(  # `iid prepare folder` prints it as a warning
            "%d mask(s) in %s pair with no image (listed in the manifest's unpaired_masks), "
            "first: %s",
            len(unpaired),
            masks_root,
            unpaired[0],
        )
    return prepare_tiles(
        sources,
        out,
        opts,
        meta=meta,
        n_classes=n_classes,
        label_fn=label_fn,
        expect_bands=bands,
        root=root,
        bad_files=bad,
        late_meta=late,
    )
