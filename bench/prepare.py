"""Tiling a large 4-band GeoTIFF: throughput against a plain sequential read, and peak memory.

Generates a SIZE x SIZE 4-band uint8 GeoTIFF (20000 -> 1.6 GB) by windows, then, each in its own
process so that peak RSS is its own: (1) reads it sequentially in full-width strips and throws
the data away, (2) runs `iid prepare folder` on it (200 px tiles, zstd Parquet shards).

    .venv/bin/python bench/prepare.py                 # 20000 x 20000
    .venv/bin/python bench/prepare.py --size 8000     # quicker
"""

from __future__ import annotations

import argparse
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

READ_SCRIPT = """
import sys, rasterio
from rasterio.windows import Window
with rasterio.open(sys.argv[1]) as src:
    for row in range(0, src.height, 256):
        src.read(window=Window(0, row, src.width, min(256, src.height - row)))
"""


def make_raster(path: Path, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": 4,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "BIGTIFF": "YES",
        "crs": "EPSG:32633",
        "transform": rasterio.transform.from_origin(368000, 5808000, 0.05, 0.05),
    }
    ramp = (np.arange(size, dtype=np.uint16) % 256).astype(np.uint8)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 512):
            h = min(512, size - row)
            block = rng.integers(0, 64, (4, h, size), dtype=np.uint8) + ramp[None, None, :] // 2
            dst.write(block, window=Window(0, row, size, h))


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all of them: report only a new maximum honestly
    return seconds, max(peak, before) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--tile", type=int, default=200)
    ap.add_argument("--workdir", default=None, help="where the raster and shards go (temp)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    src = work / "imagery"
    src.mkdir(parents=True, exist_ok=True)
    raster = src / "big.tif"
    t0 = time.perf_counter()
    make_raster(raster, args.size)
    gen_s = time.perf_counter() - t0
    gb = raster.stat().st_size / 1e9
    # Tiling first (lower peak RSS child), then the read, so each child's peak is visible.
    iid = str(Path(sys.executable).parent / "iid")
    tile_s, tile_rss = run_measured(
        [
            iid,
            "prepare",
            "folder",
            str(src),
            str(work / "shards"),
            "--tile",
            str(args.tile),
            "--no-progress",
        ]
    )
    read_s, read_rss = run_measured([sys.executable, "-c", READ_SCRIPT, str(raster)])
    tiles = (args.size // args.tile) ** 2
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"raster: {args.size}x{args.size}x4 uint8 GeoTIFF, {gb:.2f} GB (generated in {gen_s:.0f} s)"
    )
    print(f"plain sequential read: {read_s:.1f} s ({gb / read_s * 1e3:.0f} MB/s)")
    print(
        f"iid prepare folder:    {tile_s:.1f} s ({gb / tile_s * 1e3:.0f} MB/s, {tiles} tiles "
        f"of {args.tile} px, {tiles / tile_s:.0f} tiles/s)"
    )
    print(f"tiling throughput = {read_s / tile_s:.2f} of the plain read")
    print(f"peak RSS of the tiling process: {tile_rss:.2f} GB (raster {gb:.2f} GB)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
