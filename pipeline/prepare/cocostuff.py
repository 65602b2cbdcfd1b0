"""COCO-Stuff 164k -> Parquet shards for COCO-Stuff-3 (sky, plant, ground) or -15 (stuff).

Fine labels (``stuffthingmaps``: one byte per pixel, 0-181, 255 unlabelled) are mapped to the 27
coarse superclasses of the COCO-Stuff hierarchy, then to the subset's classes; every other pixel
becomes 255 (ignored by the loss and the metric). Images are read in RGB order (the reference
read BGR by mistake), kept if at least ``--min-target`` of their pixels are target classes and
their shorter side is at least ``--min-side`` pixels (or if listed in ``--ids``), pre-scaled
(images bilinear, labels nearest) and centre-cropped to a ``--tile`` square; pairs take random
crops from it at training time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import IGNORE_INDEX
from pipeline.data.format import PrepareError, Tile
from pipeline.prepare.run import TilingOptions
from pipeline.prepare.shards import ShardWriter

# COCO-Stuff fine classes by label id (ids 0-90 things incl. the 11 unused COCO ids, 91-181 stuff).
FINE = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "street_sign stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra "
    "giraffe hat backpack umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard "
    "sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle plate "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog "
    "pizza donut cake chair couch potted_plant bed mirror dining_table window desk toilet door tv "
    "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator blender "
    "book clock vase scissors teddy_bear hair_drier toothbrush hair_brush "
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet "
    "ceiling-other ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt "
    "door-stuff fence floor-marble floor-other floor-stone floor-tile floor-wood flower fog "
    "food-other fruit furniture-other grass gravel ground-other hill house leaves light mat "
    "metal mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other plastic "
    "platform playingfield railing railroad river road rock roof rug salad sand sea shelf "
    "sky-other skyscraper snow solid-other stairs stone straw structural-other table tent "
    "textile-other towel tree vegetable wall-brick wall-concrete wall-other wall-panel "
    "wall-stone wall-tile wall-wood water-other waterdrops window-blind window-other wood"
).split()

# The hierarchy: coarse superclass -> its fine classes (12 thing, then 15 stuff superclasses).
_THINGS = {
    "electronic": "tv laptop mouse remote keyboard cell_phone",
    "appliance": "microwave oven toaster sink refrigerator blender",
    "food-things": "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake",
    "furniture-things": "chair couch potted_plant bed mirror dining_table window desk toilet door",
    "indoor": "book clock vase scissors teddy_bear hair_drier toothbrush hair_brush",
    "kitchen": "bottle plate wine_glass cup fork knife spoon bowl",
    "accessory": "hat backpack umbrella shoe eye_glasses handbag tie suitcase",
    "animal": "bird cat dog horse sheep cow elephant bear zebra giraffe",
    "outdoor": "traffic_light fire_hydrant street_sign stop_sign parking_meter bench",
    "person": "person",
    "sports": "frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket",
    "vehicle": "bicycle car motorcycle airplane bus train truck boat",
}
_STUFF = {
    "ceiling": "ceiling-other ceiling-tile",
    "floor": "carpet floor-marble floor-other floor-stone floor-tile floor-wood",
    "food": "food-other fruit salad vegetable",
    "furniture": "cabinet counter cupboard desk-stuff door-stuff furniture-other light "
    "mirror-stuff shelf stairs table",
    "rawmaterial": "cardboard metal paper plastic",
    "textile": "banner blanket cloth clothes curtain mat napkin pillow rug textile-other towel",
    "wall": "wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood",
    "window": "window-blind window-other",
    "building": "bridge building-other house roof skyscraper tent",
    "ground": "dirt gravel ground-other mud pavement platform playingfield railroad road sand snow",
    "plant": "branch bush flower grass leaves moss plant-other straw tree",
    "sky": "clouds sky-other",
    "solid": "hill mountain rock solid-other stone wood",
    "structural": "cage fence net railing structural-other",
    "water": "fog river sea water-other waterdrops",
}
COARSE = tuple(_THINGS) + tuple(_STUFF)
SUBSETS = {3: ("sky", "plant", "ground"), 15: tuple(_STUFF)}


def fine_to_coarse() -> np.ndarray:
    """256-entry lookup: fine id -> coarse id (0-26), 255 elsewhere."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for coarse_id, members in enumerate([*_THINGS.values(), *_STUFF.values()]):
        for name in members.split():
            lut[FINE.index(name)] = coarse_id
    return lut


def subset_lut(subset: int) -> np.ndarray:
    """256-entry lookup: fine id -> class id of COCO-Stuff-3 or -15, 255 for everything else."""
    if subset not in SUBSETS:
        raise PrepareError(f"--subset must be one of {sorted(SUBSETS)}, got {subset!r}")
    coarse = fine_to_coarse()
    to_subset = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for i, name in enumerate(SUBSETS[subset]):
        to_subset[COARSE.index(name)] = i
    return to_subset[coarse]


def _load(image: Path, label: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(label) as lab:
            fine = np.asarray(lab)
    except (UnidentifiedImageError, OSError) as err:
        raise PrepareError(f"{image}: not a readable image/label pair ({err})") from err
    if fine.ndim != 2:
        raise PrepareError(f"{label}: expected one byte per pixel, got shape {fine.shape}")
    if fine.shape != rgb.shape[:2]:
        raise PrepareError(
            f"{label}: label is {fine.shape[1]}x{fine.shape[0]}, expected "
            f"{rgb.shape[1]}x{rgb.shape[0]} like {image.name}"
        )
    return rgb, fine


def _scale_crop(
    rgb: np.ndarray, labels: np.ndarray, scale: float, tile: int
) -> tuple[np.ndarray, np.ndarray] | None:
    from PIL import Image

    h, w = labels.shape
    nh, nw = round(h * scale), round(w * scale)
    if min(nh, nw) < tile:
        return None
    img = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(labels).resize((nw, nh), Image.NEAREST))
    y, x = (nh - tile) // 2, (nw - tile) // 2
    return img[y : y + tile, x : x + tile].transpose(2, 0, 1), lab[y : y + tile, x : x + tile]


def prepare_cocostuff(
    src: Path,
    out: Path,
    opts: TilingOptions,
    subset: int = 3,
    prescale: float = 0.33,
    min_target: float = 0.75,
    min_side: int = 360,
    ids: Path | None = None,
) -> dict:
    """Curate, map, rescale and crop COCO-Stuff into shards (train2017 -> train,
    val2017 -> test). ``opts.tile`` is the stored square side. Returns the manifest."""
    lut = subset_lut(subset)
    wanted = None if ids is None else set(ids.read_text().split())
    counts = {"seen": 0, "kept": 0, "too_few_target": 0, "too_small": 0}
    n = len(SUBSETS[subset])
    with ShardWriter(out, n, opts.rows_per_shard, opts.compression, opts.overwrite) as writer:
        found = False
        for folder, split in (("train2017", "train"), ("val2017", "test")):
            image_dir, label_dir = (
                src / "images" / folder,
                src / "stuffthingmaps_trainval2017" / folder,
            )
            if not image_dir.is_dir():
                continue
            found = True
            with writer.source(f"cocostuff{subset}-{folder}", str(image_dir)):
                for image in sorted(image_dir.glob("*.jpg")):
                    counts["seen"] += 1
                    if wanted is not None and image.stem not in wanted:
                        continue
                    label = label_dir / f"{image.stem}.png"
                    try:
                        rgb, fine = _load(image, label)
                    except PrepareError as err:
                        writer.skip(str(image), str(err))
                        continue
                    tile = _curate(
                        rgb,
                        lut[fine],
                        wanted is not None,
                        prescale,
                        min_target,
                        min_side,
                        opts.tile,
                        counts,
                    )
                    if tile is not None:
                        img, lab = tile
                        writer.add(
                            Tile(
                                tile_id=image.stem,
                                source=str(image.relative_to(src)),
                                row_off=0,
                                col_off=0,
                                src_height=fine.shape[0],
                                src_width=fine.shape[1],
                                image=img,
                                label=lab,
                                label_source=str(label.relative_to(src)),
                            ),
                            split,
                        )
                        counts["kept"] += 1
        if not found:
            raise PrepareError(
                f"{src}: no images/train2017 or images/val2017 folder (expected the "
                "COCO-Stuff 164k layout)"
            )
        meta = {
            "dataset": f"cocostuff{subset}",
            "bands": 3,
            "band_names": ["R", "G", "B"],
            "classes": list(SUBSETS[subset]),
            "ignore_index": IGNORE_INDEX,
            "curation": {
                "prescale": prescale,
                "min_target": min_target,
                "min_side": min_side,
                "ids": str(ids) if ids else None,
                **counts,
            },
        }
        return writer.finish(meta, opts.skip_bad)


def _curate(
    rgb, labels, listed, prescale, min_target, min_side, tile, counts
) -> tuple[np.ndarray, np.ndarray] | None:
    if not listed:
        if min(labels.shape) < min_side:
            counts["too_small"] += 1
            return None
        if (labels != IGNORE_INDEX).mean() < min_target:
            counts["too_few_target"] += 1
            return None
    out = _scale_crop(rgb, labels, prescale, tile)
    if out is None:
        counts["too_small"] += 1
    return out
