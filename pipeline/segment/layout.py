"""Which windows of a raster the model sees, and which of its pixels each window answers for.

The raster is cut into square *cores* of ``core`` pixels that tile it exactly (the last row and
column of cores reach past the edge, and what lies outside the raster is dropped on writing).
The model reads each core with a ``margin`` of context on every side (a window of ``core + 2 *
margin`` pixels, padded and masked past the raster's border) and only the core's pixels are
kept. This is the centre-keeping form of overlapping-tile blending: when the margin is at
least the network's receptive-field radius, every kept pixel is exactly what a forward pass on
any window around it gives, so tile borders leave no seam; with ``margin=0`` they do (the
pixels next to a border see zero padding instead of their neighbours).

Kept rather than a smooth (Hann) weighting because it is exact rather than approximately
seam-free, and because each window then sends back one byte per core pixel (its cluster id)
instead of a K-channel float map that would have to be summed into a raster-sized buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A GeoTIFF block side must be a multiple of 16; cores are written as whole blocks.
BLOCK_MULTIPLE = 16


@dataclass(frozen=True)
class Layout:
    """The windows of one raster.

    Args:
        height, width: raster size in pixels.
        core: side of the part of each window that is kept (a multiple of 16: also the
            output's block size, so every window writes whole blocks).
        margin: context read around each core on every side (0: plain tiling, with seams).

    Raises:
        ValueError: a size, core or margin out of range (the message names the option).
    """

    height: int
    width: int
    core: int = 256
    margin: int = 32

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"raster size {self.width}x{self.height}: expected at least 1x1")
        if self.core < BLOCK_MULTIPLE or self.core % BLOCK_MULTIPLE:
            raise ValueError(f"--core: expected a multiple of {BLOCK_MULTIPLE}, got {self.core}")
        if self.margin < 0:
            raise ValueError(f"--margin: expected >= 0, got {self.margin}")

    @property
    def tile(self) -> int:
        """Side of the window the model reads."""
        return self.core + 2 * self.margin

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.core)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.core)

    def __len__(self) -> int:
        return self.rows * self.cols

    def cores(self) -> list[tuple[int, int]]:
        """(row, col) of every core's top-left pixel, row by row."""
        return [(r * self.core, c * self.core) for r in range(self.rows) for c in range(self.cols)]

    def window(self, row: int, col: int) -> tuple[int, int]:
        """(row, col) of the top-left pixel the model reads for the core at (row, col); it may
        lie outside the raster (negative, or past its size): that part is padding."""
        return row - self.margin, col - self.margin

    def kept(self, row: int, col: int) -> tuple[int, int]:
        """(rows, cols) of the core at (row, col) that lie inside the raster."""
        return min(self.core, self.height - row), min(self.core, self.width - col)
