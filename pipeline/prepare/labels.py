"""Label rasters of any dataset: class-index masks and colour-coded (palette) masks, the label
functions that turn their windows into stored class ids, and class merges.

Stored labels are one byte per pixel: class ids 0..K-1 in the order the classes are defined,
and IGNORE_INDEX (255) for pixels that count for nothing. A class keeps the id the user's files
give it (a mask value, a list position or a mapping key in a classes or palette file) for
reference in ``--merge``; sparse ids (LoveDA's 1..7 beside a 0 no-data value) are stored
renumbered 0..K-1, so that no class exists only in name.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pipeline import IGNORE_INDEX
from pipeline.config import ConfigError, read_yaml
from pipeline.data.format import PrepareError
from pipeline.prepare.raster import GDAL_CACHE_MB, LabelValueError

MAX_CLASSES = IGNORE_INDEX  # ids 0..254: 255 is the ignore index of the stored labels
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Classes:
    """The classes of a labelled dataset, in stored id order.

    Attributes:
        names: class name of each stored id.
        ids: the id of each class in the user's files (mask value, or palette/classes key).
        colours: RGB colour of each class, when known (a palette, or colours in --classes).
        ignored: colours that mark ignored pixels, by name (a palette's boundary); counted.
    """

    names: tuple[str, ...]
    ids: tuple[int, ...]
    colours: tuple[Colour, ...] | None = None
    ignored: tuple[tuple[str, Colour], ...] = ()

    @classmethod
    def numbered(cls, ids: Iterable[int]) -> Classes:
        """Unnamed classes (from --num-classes or the values found in the masks)."""
        ids = tuple(sorted(ids))
        return cls(tuple(f"class_{i}" for i in ids), ids)

    def manifest(self) -> dict:
        """The manifest's ``classes`` and, when known, ``colours``."""
        out: dict = {"classes": list(self.names)}
        if self.colours is not None:
            out["colours"] = [list(c) for c in self.colours]
        return out


# ------------------------------------------------------------------------- classes files
def read_classes(path: Path, flag: str, need_colours: bool = False) -> Classes:
    """Classes from a YAML file: a list (the position is the id) or a mapping id -> entry, where
    an entry is a name or ``{name: NAME, colour: [r, g, b]}``. An entry with ``ignore: true``
    is no class: its colour marks ignored pixels, counted under its name.

    Args:
        path: the YAML file.
        flag: the option that gave it (``--classes``, ``--palette``), for the messages.
        need_colours: every class must have a colour (a palette).

    Raises:
        PrepareError: unreadable file, or a malformed entry (one line naming the file).
    """
    where = f"{flag} {path}"
    try:
        raw = read_yaml(path, flag.lstrip("-") + " file")
    except ConfigError as err:
        raise PrepareError(f"{flag} {err}") from err
    if isinstance(raw, list):
        entries = list(enumerate(raw))
    elif isinstance(raw, dict):
        entries = []
        for key, entry in raw.items():
            try:
                entries.append((int(key), entry))
            except (TypeError, ValueError):
                raise PrepareError(
                    f"{where}: key {key!r} is not a class id (an integer); a mapping goes "
                    "from id to name or to {name:, colour:}"
                ) from None
    else:
        raise PrepareError(
            f"{where}: expected a list of classes or a mapping id -> class, got "
            f"{type(raw).__name__}"
        )
    classes, ignored, position = [], [], 0
    for key, entry in entries:
        name, colour, ignore = _entry(entry, where)
        if ignore:
            if colour is None:
                raise PrepareError(f"{where}: ignored entry {name!r} has no colour")
            ignored.append((name, colour))
            continue
        # In a list, ignored entries take no position: the classes are numbered without them.
        cid = position if isinstance(raw, list) else key
        position += 1
        if cid < 0:
            raise PrepareError(f"{where}: class id {cid} of {name!r} is negative")
        if need_colours and colour is None:
            raise PrepareError(
                f"{where}: class {name!r} has no colour (expected colour: [r, g, b])"
            )
        classes.append((cid, name, colour))
    if not classes:
        raise PrepareError(f"{where}: no classes defined")
    if len(classes) > MAX_CLASSES:
        raise PrepareError(
            f"{where}: {len(classes)} classes, at most {MAX_CLASSES} fit the stored labels"
        )
    classes.sort()
    names = [n for _, n, _ in classes] + [n for n, _ in ignored]
    dup = _first_duplicate(names)
    if dup is not None:
        raise PrepareError(f"{where}: name {dup!r} is given twice")
    colours = [c for _, _, c in classes]
    known = [c for c in colours if c is not None] + [c for _, c in ignored]
    dup = _first_duplicate(known)
    if dup is not None:
        raise PrepareError(f"{where}: colour {list(dup)} is given twice")
    return Classes(
        names=tuple(n for _, n, _ in classes),
        ids=tuple(i for i, _, _ in classes),
        colours=tuple(colours) if all(c is not None for c in colours) else None,
        ignored=tuple(ignored),
    )


def _entry(entry: object, where: str) -> tuple[str, Colour | None, bool]:
    """(name, colour or None, ignore) of one classes-file entry."""
    if isinstance(entry, str) and entry.strip():
        return entry.strip(), None, False
    if not isinstance(entry, dict):
        raise PrepareError(
            f"{where}: entry {entry!r} is neither a name nor {{name:, colour: [r, g, b]}}"
        )
    unknown = set(entry) - {"name", "colour", "color", "ignore"}
    if unknown:
        raise PrepareError(
            f"{where}: entry {entry!r} has unknown key(s) {sorted(map(str, unknown))} "
            "(expected name, colour, ignore)"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PrepareError(f"{where}: entry {entry!r} has no name")
    colour = entry.get("colour", entry.get("color"))
    if colour is not None:
        if not (
            isinstance(colour, list | tuple)
            and len(colour) == 3
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour
            )
        ):
            raise PrepareError(
                f"{where}: colour {colour!r} of {name!r} is not [r, g, b] with values 0-255"
            )
        colour = (int(colour[0]), int(colour[1]), int(colour[2]))
    return name.strip(), colour, bool(entry.get("ignore", False))


def _first_duplicate(items: Iterable) -> object | None:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


# ------------------------------------------------------------------------ colour-coded masks
def _colour_keys(rgb: np.ndarray) -> np.ndarray:
    # 16 bits per channel, so that 16-bit masks cannot alias a palette colour.
    return (rgb[0].astype(np.int64) << 32) | (rgb[1].astype(np.int64) << 16) | rgb[2]


class Palette:
    """Colour-coded labels: one RGB colour per class (in stored id order), and named colours
    that mark ignored pixels (Potsdam's black boundary). Any other colour is off the palette.

    Raises:
        PrepareError: a colour given twice, or more classes than the stored labels hold.
    """

    def __init__(self, colours: Sequence[Colour], ignored: Mapping[str, Colour] | None = None):
        if len(colours) > MAX_CLASSES:
            raise PrepareError(f"{len(colours)} palette colours, at most {MAX_CLASSES} classes")
        keys = _colour_keys(np.array(colours, dtype=np.int64).reshape(-1, 3).T)
        ignored = dict(ignored or {})
        ignored_keys = _colour_keys(np.array(list(ignored.values()), np.int64).reshape(-1, 3).T)
        if len(set(keys.tolist()) | set(ignored_keys.tolist())) != len(keys) + len(ignored_keys):
            raise PrepareError(f"palette colours {list(colours)} + {ignored} repeat a colour")
        order = np.argsort(keys)
        self._sorted, self._ids = keys[order], order.astype(np.uint8)
        self._ignored = dict(zip(ignored, ignored_keys.tolist(), strict=True))

    @property
    def ignored_names(self) -> list[str]:
        return list(self._ignored)

    def _lookup(self, rgb: np.ndarray, hint: str) -> tuple[np.ndarray, np.ndarray]:
        """(keys, class ids with 255 off the palette) of a (bands >= 3, h, w) window."""
        if rgb.shape[0] < 3:
            n = rgb.shape[0]
            raise LabelValueError(
                f"has {n} band{'s' if n != 1 else ''}, expected 3 (RGB colours{hint})"
            )
        key = _colour_keys(rgb[:3])
        if not len(self._sorted):
            return key, np.full(key.shape, IGNORE_INDEX, np.uint8)
        at = np.minimum(np.searchsorted(self._sorted, key), len(self._sorted) - 1)
        hit = self._sorted[at] == key
        return key, np.where(hit, self._ids[at], np.uint8(IGNORE_INDEX)).astype(np.uint8)

    def classes(self, rgb: np.ndarray, hint: str = "") -> np.ndarray:
        """Map a (3, h, w) colour window to (h, w) class ids; ignored colours and colours off
        the palette become IGNORE_INDEX (guessing the class of an undefined colour would plant
        wrong labels). A 4th band (alpha) is not read.

        Raises:
            LabelValueError: fewer than 3 bands (``hint`` ends its message).
        """
        return self._lookup(rgb, hint)[1]

    def count(self, rgb: np.ndarray, hint: str = "") -> tuple[np.ndarray, dict[str, int]]:
        """Class ids of a window (as ``classes``) and its ignored pixels: per ignored colour's
        name, then ``off_palette``."""
        key, ids = self._lookup(rgb, hint)
        unmapped = ids == IGNORE_INDEX
        counts = {name: int((key == k).sum()) for name, k in self._ignored.items()}
        counts["off_palette"] = int(unmapped.sum()) - sum(counts.values())
        return ids, counts


class PaletteLabels:
    """LabelFn of colour-coded masks that also counts the pixels it ignores, for the manifest's
    ``ignored_label_pixels``.

    Args:
        palette: the colours.
        hint: appended to a wrong-band-count message (which option asked for colours).
    """

    def __init__(self, palette: Palette, hint: str = "") -> None:
        self.palette, self.hint = palette, hint
        self.counts = {name: 0 for name in palette.ignored_names} | {"off_palette": 0}

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        ids, counts = self.palette.count(rgb, self.hint)
        for name, n in counts.items():
            self.counts[name] += n
        return ids


# --------------------------------------------------------------------------- class-index masks
class IndexLabels:
    """LabelFn of class-index masks (1 band, integers): the mask value of each class -> its
    stored id, ``ignore`` -> IGNORE_INDEX; any other value is an error, not a guess.

    Args:
        values: the mask value of each stored class id.
        ignore: the mask value of ignored pixels.
    """

    def __init__(self, values: Sequence[int], ignore: int) -> None:
        self.values, self.ignore = list(values), ignore
        order = np.argsort(self.values)
        self._sorted = np.asarray(self.values, np.int64)[order]
        self._ids = order.astype(np.uint8)

    def __call__(self, window: np.ndarray) -> np.ndarray:
        if window.shape[0] != 1:
            raise LabelValueError(
                f"has {window.shape[0]} bands, expected 1 (class ids); a colour-coded mask "
                "needs --palette"
            )
        v = window[0]
        if v.dtype.kind == "f":
            whole = np.isfinite(v) & (v == np.floor(v))
            if not whole.all():
                raise LabelValueError(f"value {v[~whole][0].item()} is not a class id (an integer)")
        at = np.minimum(np.searchsorted(self._sorted, v), len(self._sorted) - 1)
        hit = self._sorted[at] == v
        ignored = v == self.ignore
        bad = ~hit & ~ignored
        if bad.any():
            found = np.unique(v[bad]).tolist()
            shown = ", ".join(map(str, found[:3])) + (", ..." if len(found) > 3 else "")
            verb = "are not class ids" if len(found) > 1 else "is not a class id"
            raise LabelValueError(
                f"value{'s' if len(found) > 1 else ''} {shown} {verb} (classes: "
                f"{_ranges(self.values)}; ignored: {self.ignore}; see --classes, --num-classes, "
                "--ignore-index)"
            )
        return np.where(hit, self._ids[at], np.uint8(IGNORE_INDEX)).astype(np.uint8)


def _ranges(ids: Sequence[int]) -> str:
    """``0-5`` for a run of ids, else the ids (the first few)."""
    ids = sorted(ids)
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def scan_values(
    masks: Iterable[Path], ignore: int, rows: int = 512
) -> tuple[list[int], list[Path]]:
    """The distinct values of 1-band masks other than ``ignore``, read ``rows`` rows at a time
    (one pass, before tiling, when no --classes or --num-classes says what the classes are).

    Returns:
        (sorted values, the masks passed over for having several bands). Unreadable masks are
        passed over too: tiling lists them.
    """
    found: set[int] = set()
    multiband = []
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20):
        for path in masks:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    src = rasterio.open(path)
                with src:
                    if src.count != 1:
                        multiband.append(path)
                        continue
                    for row in range(0, src.height, rows):
                        block = src.read(1, window=Window(0, row, src.width, rows)).ravel()
                        if block.dtype.kind == "u" and block.dtype.itemsize <= 2:
                            found.update(np.flatnonzero(np.bincount(block)).tolist())
                        else:
                            found.update(np.unique(block).tolist())
            except RasterioError:
                continue
    found.discard(ignore)
    return sorted(found), multiband


# ------------------------------------------------------------------------------ class merges
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_merges(specs: Sequence[str], classes: Classes) -> dict[str, dict]:
    """Class merges as the manifest records them: ``{NAME: {"map": [merged id of each stored
    class, 255 for a class in no group], "classes": [merged names]}}``.

    A spec is ``NAME=GROUPS`` or a YAML file. GROUPS are comma-separated groups of classes
    joined by ``+`` (class names, or the ids the masks or the classes file give them), each
    optionally named ``label:a+b`` (default: the members' names joined by ``_and_``). A file
    maps NAME to such a GROUPS string or to a list of groups, each a list of classes or a
    one-entry mapping ``{label: [classes]}``.

    Raises:
        PrepareError: a malformed spec, an unknown class, a class in two groups, a name given
            twice (one line naming --merge).
    """
    merges: dict[str, dict] = {}
    for spec in specs:
        for name, groups in _merge_specs(spec):
            where = f"--merge {name}"
            if not _NAME.match(name):
                raise PrepareError(
                    f"--merge {spec!r}: merge name {name!r} must be letters, digits, _ . -"
                )
            if name in merges:
                raise PrepareError(f"{where}: defined twice")
            merges[name] = _merge(groups, classes, where)
    return merges


def _merge_specs(spec: str) -> list[tuple[str, list[tuple[str | None, list]]]]:
    """(name, [(label or None, members)]) of a ``NAME=GROUPS`` spec or a merges file."""
    if "=" in spec:
        name, _, groups = spec.partition("=")
        return [(name.strip(), _groups_of(groups, f"--merge {spec!r}"))]
    try:
        raw = read_yaml(spec, "merges file")
    except ConfigError as err:
        raise PrepareError(f"--merge {err} (expected NAME=GROUPS or a YAML file)") from err
    if not isinstance(raw, dict) or not raw:
        raise PrepareError(f"--merge {spec}: expected a mapping NAME -> groups")
    out = []
    for name, groups in raw.items():
        where = f"--merge {spec}: {name}"
        if isinstance(groups, str):
            out.append((str(name), _groups_of(groups, where)))
        elif isinstance(groups, list):
            out.append((str(name), [_yaml_group(g, where) for g in groups]))
        else:
            raise PrepareError(f"{where}: expected a GROUPS string or a list of groups")
    return out


def _groups_of(text: str, where: str) -> list[tuple[str | None, list]]:
    """``a+b,label:c+d`` -> [(None, [a, b]), (label, [c, d])]."""
    if not text.strip():
        raise PrepareError(f"{where}: no groups (expected NAME=a+b,c+d)")
    groups = []
    for part in text.split(","):
        label, sep, members = part.partition(":")
        groups.append((label.strip(), members.split("+")) if sep else (None, part.split("+")))
    return groups


def _yaml_group(group: object, where: str) -> tuple[str | None, list]:
    """One group of a merges file: [a, b], {label: [a, b]}, or "label:a+b"."""
    if isinstance(group, dict) and len(group) == 1:
        ((label, members),) = group.items()
        return str(label), members if isinstance(members, list) else [members]
    if isinstance(group, list):
        return None, group
    if isinstance(group, str | int) and "," not in str(group):
        return _groups_of(str(group), where)[0]
    raise PrepareError(f"{where}: group {group!r} is not a list of classes or {{label: [...]}}")


def _merge(groups: list[tuple[str | None, list]], classes: Classes, where: str) -> dict:
    by_name = {n: i for i, n in enumerate(classes.names)}
    by_id = {cid: i for i, cid in enumerate(classes.ids)}
    mapping = [IGNORE_INDEX] * len(classes.names)
    labels: list[str] = []
    for label, members in groups:
        stored = []
        for member in members:
            text = str(member).strip()
            if not text:
                raise PrepareError(f"{where}: an empty class in a group (expected a+b,c+d)")
            if text in by_name:  # names first: a class may be named "3"
                stored.append(by_name[text])
            elif re.fullmatch(r"\d+", text) and int(text) in by_id:
                stored.append(by_id[int(text)])
            else:
                shown = ", ".join(classes.names[:12]) + (", ..." if len(classes.names) > 12 else "")
                raise PrepareError(f"{where}: unknown class {text!r} (classes: {shown})")
        for i in stored:
            if mapping[i] != IGNORE_INDEX or stored.count(i) > 1:
                raise PrepareError(f"{where}: class {classes.names[i]!r} is in two groups")
            mapping[i] = len(labels)
        label = label or "_and_".join(classes.names[i] for i in stored)
        if not label:
            raise PrepareError(f"{where}: a group has an empty name")
        if label in labels:
            raise PrepareError(f"{where}: group name {label!r} is used twice")
        labels.append(label)
    return {"map": mapping, "classes": labels}
