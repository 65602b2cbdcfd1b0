"""g: the random transformations that make the training pairs (x, g(x)), and undoing them.

g is: an optional stroke-width jitter (whole-image clustering), colour jitter (brightness and
contrast on the bands ``rgb_bands`` names, never on infrared; saturation and hue in HSV too when
they name an R, G, B triple), then an optional random affine (rotation, shear, scale, shift), then
a horizontal flip with probability 0.5, or with ``dihedral`` one of the 8 symmetries of the square
(D4: a rotation by a multiple of 90 degrees, with or without a flip, equally likely; square images
only), then optional Gaussian pixel noise. One ``strength`` knob scales every jitter, affine,
stroke and noise range (0 leaves only the flips, or the D4 elements). The spatial part is one 2x3
matrix per pair in ``affine_grid`` coordinates (a D4 element is an integer 2x2 matrix multiplied
into the affine's); the pair carries its inverse, and ``undo`` warps the second view's prediction
back into the first view's frame (bilinear, zero padding) with the mask of pixels that stayed
inside. Without the affine, flips and quarter turns move whole pixels: both paths apply them
exactly, and every pixel is restorable.

``make_pairs`` is plain torch on whatever device its input is on: the trainer may run it on GPU
tensors. ``make_pairs_u8`` makes the same draws from the same functions and applies them with
OpenCV on 8-bit pixels (2-3x faster on CPU; tests hold it within 1/255 of ``make_pairs``): what
the pair actors of ``pipeline.data.pairs`` run on 8-bit tiles.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import PairConfig
from pipeline.data.format import from_wire

try:  # the CPU fast path of ``warp``; grid_sample does the same without it
    import cv2 as _cv2

    _cv2.setNumThreads(1)  # one core per actor, as torch: the pool gives the parallelism
except ImportError:  # pragma: no cover - opencv-python-headless is a dependency
    _cv2 = None


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


# RGB <-> YIQ (NTSC). In YIQ, HSV's hue is (to first order) the angle in the I-Q plane and its
# saturation the radius, so a whole HSV jitter becomes one 3x3 matrix per image: the same trick
# as NVIDIA DALI's hsv operator, and ~10x cheaper than converting every pixel to HSV and back.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _hsv_draws(
    n: int, cfg: PairConfig, gen: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue angle in radians, saturation factor, value factor), each (n,), in this order."""
    s = cfg.strength
    hue = _uniform(n, -s * cfg.hue, s * cfg.hue, gen, device) * 2 * math.pi
    sat = _uniform(n, 1 - s * cfg.saturation, 1 + s * cfg.saturation, gen, device)
    val = _uniform(n, 1 - s * cfg.brightness, 1 + s * cfg.brightness, gen, device)
    return hue, sat, val


def colour_matrices(n: int, cfg: PairConfig, gen: torch.Generator, device) -> torch.Tensor:
    """(n, 3, 3) per-image colour transforms: hue rotation, saturation and brightness (value).

    Args:
        n: images.
        cfg: the ranges (and ``strength``).
        gen: random generator, on ``device``.
        device: where the matrices go.

    Returns:
        The matrices, to multiply (R, G, B) column vectors in [0, 1].
    """
    hue, sat, val = _hsv_draws(n, cfg, gen, device)
    chroma = torch.zeros(n, 3, 3, device=device)
    chroma[:, 0, 0] = 1
    chroma[:, 1, 1], chroma[:, 1, 2] = sat * hue.cos(), -sat * hue.sin()
    chroma[:, 2, 1], chroma[:, 2, 2] = sat * hue.sin(), sat * hue.cos()
    return val.view(n, 1, 1) * (_YIQ2RGB.to(device) @ chroma @ _RGB2YIQ.to(device))


def _colour_draws(
    n: int, bands: int, cfg: PairConfig, gen: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """colour_jitter's random draws for images of ``bands`` bands, in their order: ((n, k, k)
    colour matrices of the k named bands, (n,) contrast factors), or None (and nothing drawn)
    when the config jitters nothing."""
    if not cfg.jitters:
        return None
    for band in cfg.rgb_bands:  # the config cannot know the band count: checked where it is
        if band >= bands:
            raise ValueError(
                f"pairs.rgb_bands names band {band}, but the images have {bands} bands "
                f"(0 to {bands - 1})"
            )
    s = cfg.strength
    k = len(cfg.rgb_bands)
    if k == 3:
        m = colour_matrices(n, cfg, gen, device)
    else:
        # Hue and saturation turn a colour triple: other band sets get the brightness only.
        # All three are still drawn, so that the stream does not depend on the band count.
        val = _hsv_draws(n, cfg, gen, device)[2]
        m = val.view(n, 1, 1) * torch.eye(k, device=device)
    return m, _uniform(n, 1 - s * cfg.contrast, 1 + s * cfg.contrast, gen, device)


def colour_jitter(x: torch.Tensor, cfg: PairConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-image brightness and contrast changes of the bands ``cfg.rgb_bands`` names, and hue
    and saturation changes too when they name 3 (R, G, B).

    Args:
        x: (n, B, H, W) in [0, 1].
        cfg: the ranges, ``strength`` and ``rgb_bands``.
        gen: random generator, on x's device.

    Returns:
        A jittered copy in [0, 1] (x itself when nothing is jittered); bands outside
        ``cfg.rgb_bands`` (infrared) are untouched.

    Raises:
        ValueError: ``cfg.rgb_bands`` names a band that x does not have.
    """
    n, bands, h, w = x.shape
    draws = _colour_draws(n, bands, cfg, gen, x.device)
    if draws is None:
        return x
    m, contrast = draws[0], draws[1].view(n, 1, 1)
    k, first = len(cfg.rgb_bands), cfg.rgb_bands[0]
    # consecutive bands -> a slice (a view) instead of fancy indexing (a copy)
    idx = (
        slice(first, first + k)
        if tuple(cfg.rgb_bands) == tuple(range(first, first + k))
        else list(cfg.rgb_bands)
    )
    rgb = x[:, idx].reshape(n, k, h * w)
    # Contrast blends with the image's mean grey: fold it into the matrix and one offset.
    grey = (m @ rgb.mean(dim=2, keepdim=True)).mean(dim=1, keepdim=True)  # (n, 1, 1)
    out = x.clone()
    out[:, idx] = (
        torch.baddbmm((1 - contrast) * grey, contrast * m, rgb).clamp_(0, 1).view(n, k, h, w)
    )
    return out


def _d4() -> torch.Tensor:
    """(8, 2, 2): the dihedral group D4 as ``affine_grid`` matrices D (the output reads the input
    at D p). Element e is ``torch.rot90(x.flip(-1) if e // 4 else x, e % 4, (-2, -1))``.

    ``affine_grid`` points are (x: column, y: row, downwards): rot90 reads output pixel (x, y)
    from input (-y, x), so a quarter turn is [[0, -1], [1, 0]]; a horizontal flip negates x.
    Read through both, D = flip @ turn^k. Integer entries: products with them are exact.
    """
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    flip = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    turns = [torch.linalg.matrix_power(turn, k) for k in range(4)]
    return torch.stack(turns + [flip @ t for t in turns])


D4 = _d4()


def spatial_matrices(n: int, cfg: PairConfig, gen: torch.Generator, device) -> torch.Tensor:
    """(n, 2, 3) ``affine_grid`` matrices of g's spatial part: the affine, then a flip or,
    with ``cfg.dihedral``, an element of ``D4`` (uniformly drawn, index ``e`` as ``D4[e]``).

    Args:
        n: images.
        cfg: what to draw.
        gen: random generator, on ``device``.
        device: where the matrices go.

    Returns:
        theta, as ``affine_grid`` and ``warp`` take it.
    """
    s = cfg.strength
    m = torch.eye(2, device=device).repeat(n, 1, 1)
    if cfg.affine and s > 0:
        rot = _uniform(n, -s * cfg.rotation, s * cfg.rotation, gen, device) * math.pi / 180
        shear = _uniform(n, -s * cfg.shear, s * cfg.shear, gen, device) * math.pi / 180
        zoom = _uniform(n, 1 - s * cfg.scale, 1 + s * cfg.scale, gen, device)
        cos, sin = rot.cos(), rot.sin()
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
        shearing = torch.eye(2, device=device).repeat(n, 1, 1)
        shearing[:, 0, 1] = shear.tan()
        # grid_sample reads the input at M @ p: reading at p / zoom magnifies by `zoom`.
        m = rotation @ shearing / zoom.view(n, 1, 1)
    t = torch.zeros(n, 2, 1, device=device)
    if cfg.affine and s * cfg.shift > 0:
        t = _uniform(2 * n, -s * cfg.shift, s * cfg.shift, gen, device).view(n, 2, 1)
    if cfg.dihedral:
        # The output reads the affine's result at D p, i.e. the input at M D p: D4 acts after
        # the affine, around the centre (t stays), as the flip does.
        e = torch.randint(0, 8, (n,), generator=gen, device=device)
        m = m @ D4.to(device)[e]
    elif cfg.flip:
        flips = torch.rand(n, generator=gen, device=device) < 0.5
        m[:, :, 0] = torch.where(flips[:, None], -m[:, :, 0], m[:, :, 0])
    return torch.cat([m, t], dim=2)


def invert(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of (n, 2, 3) affine matrices."""
    a_inv = torch.linalg.inv(theta[:, :, :2])
    return torch.cat([a_inv, -a_inv @ theta[:, :, 2:]], dim=2)


def _coords(theta: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source coordinates (u, v), each (n, H, W), of ``affine_grid(theta)`` by broadcasting:
    several times faster on CPU than affine_grid's (n, HW, 3) @ (3, 2) batched matmul."""
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    t = theta.view(-1, 6, 1, 1)
    xs, ys = xs.view(1, 1, w), ys.view(1, h, 1)
    return t[:, 0] * xs + t[:, 1] * ys + t[:, 2], t[:, 3] * xs + t[:, 4] * ys + t[:, 5]


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (n, C, H, W) at ``theta @ p`` for every pixel p (as ``affine_grid``), zero
    padding outside.

    Bilinear warps of CPU images that need no gradient (the pair stage's) go to OpenCV's
    ``warpAffine``, 2-4x faster than ``grid_sample`` on CPU, with the same matrices, sampling
    grid and zero padding (tests hold the two within 1e-4). Everything else (GPU tensors, g* on
    predictions, which needs gradients) runs ``grid_sample``.
    """
    if mode == "bilinear" and _cv2 is not None and _plain_cpu(x):
        return _warp_cv2(x, theta)
    return _grid_warp(x, theta, mode)


def _grid_warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``warp`` with ``grid_sample`` (exact weights: OpenCV rounds sample positions to 1/32
    pixel, so a weight below that can vanish there but not here)."""
    u, v = _coords(theta.to(x.dtype), x.shape[2], x.shape[3])
    grid = torch.stack([u, v], dim=-1)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _plain_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad


def pixel_matrices(theta: torch.Tensor, h: int, w: int) -> np.ndarray:
    """``affine_grid`` matrices (normalised coordinates, align_corners=False) as (n, 2, 3)
    maps from output to input pixel indices (pixel centres at integers), OpenCV's convention."""
    to_norm = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    to_pixel = np.linalg.inv(to_norm)
    t = theta.detach().cpu().double().numpy()
    full = np.concatenate([t, np.broadcast_to([[[0.0, 0.0, 1.0]]], (len(t), 1, 3))], axis=1)
    return (to_pixel @ full @ to_norm)[:, :2]


def _warp_cv2(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    planes = x.contiguous().numpy()
    mats = pixel_matrices(theta, x.shape[2], x.shape[3])
    out = np.empty_like(planes)
    for i in range(len(planes)):
        _warp_planes(planes[i], mats[i], out[i])
    return torch.from_numpy(out)


def _warp_planes(img: np.ndarray, mat: np.ndarray, out: np.ndarray) -> None:
    """Bilinear-warp (B, H, W) planes with a ``pixel_matrices`` matrix into ``out``, zero
    padding. OpenCV warps interleaved (H, W, <=4) images: cv2.merge/split convert 20x faster
    than numpy's transposing copy (measured)."""
    c, h, w = img.shape
    flags = _cv2.INTER_LINEAR | _cv2.WARP_INVERSE_MAP
    for b in range(0, c, 4):  # at most 4 channels per warp
        chunk = list(img[b : b + 4])
        dst = _cv2.warpAffine(_cv2.merge(chunk), mat, (w, h), flags=flags, borderValue=0)
        _cv2.split(dst.reshape(h, w, len(chunk)), list(out[b : b + 4]))


def undo(pred: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g*: bring the second view's (n, C, H, W) maps back to the first view's frame.

    On CPU without gradients (OpenCV, which rounds sample positions to 1/32 pixel) the flips
    and quarter turns of a pure D4 g are undone exactly; ``grid_sample`` (GPU, gradients) is
    exact up to float rounding of the sample positions (weights of ~1e-6 on a neighbour).

    Args:
        pred: (n, C, H, W) maps of the second view.
        inverse: (n, 2, 3) inverses of g's matrices (``make_pairs``' ``inverse``).

    Returns:
        (warped maps, (n, H, W) bool mask of pixels that came from inside the second view).
    """
    n, _, h, w = pred.shape
    return warp(pred, inverse), valid_mask(invert(inverse), h, w)


def valid_mask(theta: torch.Tensor, h: int, w: int, margin_px: float = 1.5) -> torch.Tensor:
    """(n, H, W) bool: pixels p of the first view that g* can restore.

    p is valid when its source ``theta^-1 p`` in the second view and p itself lie at least
    ``margin_px`` inside their frames, so neither bilinear pass touches the zero padding.
    Along a row, each condition is linear in x, so every row's valid pixels are one interval:
    the bounds are solved per row and the mask is two comparisons per pixel (~2x faster than
    evaluating the coordinates at every pixel; the tests check both give the same mask).
    """
    n, dt, dev = theta.shape[0], theta.dtype, theta.device
    lim_u, lim_v = 1 - 2 * margin_px / w, 1 - 2 * margin_px / h
    inv = invert(theta)
    xs = (torch.arange(w, device=dev, dtype=dt) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=dev, dtype=dt) * 2 + 1) / h - 1
    inf = torch.full((n, h), float("inf"), device=dev, dtype=dt)
    lo, hi = torch.full_like(inf, -lim_u), torch.full_like(inf, lim_u)
    for row, lim in ((0, lim_u), (1, lim_v)):
        # source coordinate along this axis: a * x + b on row y
        a = inv[:, row, 0].view(n, 1)
        b = inv[:, row, 1].view(n, 1) * ys + inv[:, row, 2].view(n, 1)
        flat = a == 0
        safe = torch.where(flat, torch.ones_like(a), a)
        e1, e2 = (-lim - b) / safe, (lim - b) / safe
        whole = b.abs() <= lim  # for a == 0: the whole row or none of it
        lo = torch.maximum(lo, torch.where(flat, torch.where(whole, -inf, inf), e1.minimum(e2)))
        hi = torch.minimum(hi, torch.where(flat, torch.where(whole, inf, -inf), e1.maximum(e2)))
    hi = torch.where(ys.abs() <= lim_v, hi, -inf)
    xv = xs.view(1, 1, w)
    inside = (xv >= lo.unsqueeze(2)) & (xv <= hi.unsqueeze(2))
    return inside | _identity(theta, h, w)


def _identity(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # Pure D4 elements (flips, quarter turns, the identity) move whole pixels: every pixel is
    # restorable.
    return _pure_dihedral(theta, h, w).view(-1, 1, 1).expand(-1, h, w)


def _pure_flips(theta: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(2, device=theta.device)
    return ((theta[:, :, :2].abs() == eye).all(-1).all(-1)) & (theta[:, :, 2] == 0).all(-1)


def _pure_dihedral(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n,) bool: theta is an element of D4 with no translation, so it moves whole pixels of an
    H x W grid (quarter turns only of a square one)."""
    pure = _pure_flips(theta)
    if h != w:
        return pure
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=theta.device)
    turned = (theta[:, :, :2].abs() == swap).all(-1).all(-1) & (theta[:, :, 2] == 0).all(-1)
    return pure | turned


def _move(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``warp`` for pure D4 matrices (``_pure_dihedral``), exactly: every pixel is copied from
    its source, never interpolated: on CPU, numpy views per image as the 8-bit path moves
    them (6x faster there than a gather, measured); elsewhere, or with gradients, one gather."""
    n, c, h, w = x.shape
    if x.device.type == "cpu" and not x.requires_grad:
        moves = theta[:, :, :2].round().int().tolist()
        planes = x.contiguous().numpy()
        out = np.empty_like(planes)
        for i in range(n):
            out[i] = _moved_planes(planes[i], moves[i])
        return torch.from_numpy(out)
    a = theta[:, :, :2].round().long()
    # Pixel centres in half-pixel units about the grid's centre: integers, and D4 maps each
    # onto another (on a square grid); the source index follows with no rounding.
    cx = (torch.arange(w, device=x.device) * 2 - (w - 1)).view(1, 1, w)
    cy = (torch.arange(h, device=x.device) * 2 - (h - 1)).view(1, h, 1)
    col = a[:, 0, 0].view(n, 1, 1) * cx + a[:, 0, 1].view(n, 1, 1) * cy
    row = a[:, 1, 0].view(n, 1, 1) * cx + a[:, 1, 1].view(n, 1, 1) * cy
    src = ((row + h - 1) // 2 * w + (col + w - 1) // 2).view(n, 1, h * w)
    return x.reshape(n, c, h * w).gather(2, src.expand(n, c, h * w)).view(n, c, h, w)


def _check_square(cfg: PairConfig, h: int, w: int) -> None:
    if cfg.dihedral and h != w:
        raise ValueError(
            f"pairs.dihedral needs square images (a quarter turn must keep the shape), got "
            f"{h}x{w}; set pairs.crop"
        )


def make_pairs(
    x: torch.Tensor,
    cfg: PairConfig,
    gen: torch.Generator,
    valid: torch.Tensor | np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Draw g for every image of a batch and apply it.

    Args:
        x: (n, B, H, W) images in [0, 1] (any device; ``gen`` on the same device).
        cfg: what to draw.
        gen: random generator.
        valid: optional (n, H, W) bool, False where x has no data (nodata, padding).

    Returns:
        dict with ``x`` (the first view), ``gx`` (the second), ``theta`` (g's spatial matrix),
        ``inverse`` (its inverse, for ``undo``), and ``mask`` (n, H, W): pixels of the first
        view whose counterpart lies inside the second view and, with ``valid``, that hold data
        in both views (see ``_pair``).

    Raises:
        ValueError: ``cfg.dihedral`` on non-square images, or ``cfg.rgb_bands`` naming a band
            that x does not have.
    """
    gx, theta = _draw_view(x, cfg, gen)
    if cfg.augment_first:  # drawn after g: g, its inverse and mask do not change with it
        x, _ = _draw_view(x, cfg, gen)
    return _pair(x, gx, theta, valid)


def _pair(
    x: torch.Tensor | np.ndarray,
    gx: torch.Tensor | np.ndarray,
    theta: torch.Tensor,
    valid: torch.Tensor | np.ndarray | None = None,
) -> dict[str, torch.Tensor | np.ndarray]:
    """The pair as both ``make_pairs`` paths return it: views, g, g's inverse and mask.

    With ``valid``, the mask also drops every pixel that is invalid in the first view, and
    every pixel whose prediction g* brings back from a pixel of the second view that g's
    bilinear resampling drew, with any weight, from an invalid pixel. No value of a pixel
    without data reaches the loss, by either view.
    """
    h, w = gx.shape[-2:]
    inverse = invert(theta)
    mask = valid_mask(theta, h, w)
    if valid is not None:
        v = torch.as_tensor(valid, device=theta.device)
        touched = _grid_warp((~v).unsqueeze(1).float(), theta) > 0  # in the second view
        brought_back = _grid_warp(touched.float(), inverse)[:, 0] > 0
        mask = mask & v & ~brought_back
    return {"x": x, "gx": gx, "theta": theta, "inverse": inverse, "mask": mask}


def stroke_jitter(x: torch.Tensor, cfg: PairConfig, gen: torch.Generator) -> torch.Tensor:
    """Each image of x (n, B, H, W) blended toward its 3x3 grey dilation or erosion by a
    factor drawn from [-stroke, stroke] (``PairConfig.stroke``); x itself when off (nothing
    drawn then)."""
    v = min(1.0, cfg.stroke * cfg.strength)  # beyond a full dilation, the blend would overshoot
    if not v:
        return x
    t = _uniform(len(x), -v, v, gen, x.device).view(-1, 1, 1, 1)
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return x + t.clamp(min=0) * (dilated - x) + (-t).clamp(min=0) * (eroded - x)


def _draw_view(x: torch.Tensor, cfg: PairConfig, gen: torch.Generator):
    """(g(x), theta) for one fresh draw of g on every image of x."""
    n, _, h, w = x.shape
    _check_square(cfg, h, w)
    theta = spatial_matrices(n, cfg, gen, x.device)
    gx = colour_jitter(stroke_jitter(x, cfg, gen), cfg, gen)
    if cfg.affine and cfg.strength > 0:
        gx = warp(gx, theta)
    elif cfg.dihedral:  # flips and quarter turns: whole pixels, exactly
        gx = _move(gx, theta)
    else:
        # Flips move whole pixels: do them exactly, without interpolation.
        flipped = theta[:, 0, 0] < 0
        gx = torch.where(flipped.view(n, 1, 1, 1), gx.flip(-1), gx)
    return _noisy(gx, cfg, gen), theta


def fits_u8_path(raw: np.ndarray, cfg: PairConfig) -> bool:
    """Whether ``make_pairs_u8`` takes these (n, B, H, W) images and this g: uint8, B <= 4,
    OpenCV there, and no stroke jitter (``make_pairs`` alone draws it)."""
    return raw.dtype == np.uint8 and raw.shape[1] <= 4 and _cv2 is not None and not cfg.stroke


def _adds_noise(cfg: PairConfig) -> bool:
    return cfg.noise > 0 and cfg.strength > 0


def _noisy(gx: torch.Tensor, cfg: PairConfig, gen: torch.Generator) -> torch.Tensor:
    """g's last step: Gaussian noise on the (float) second view, when configured."""
    if not _adds_noise(cfg):
        return gx
    noise = torch.randn(gx.shape, generator=gen, device=gx.device, dtype=gx.dtype)
    return gx + cfg.strength * cfg.noise * noise


def make_pairs_u8(
    raw: np.ndarray, cfg: PairConfig, gen: torch.Generator, valid: np.ndarray | None = None
) -> dict:
    """``make_pairs`` for 8-bit images on CPU, with OpenCV's 8-bit kernels.

    The same random draws, in the same order, as ``make_pairs`` with the same generator (so the
    same theta, inverse and mask); jitter and warp round to 8 bits, so the second view is within
    about 1/255 of ``make_pairs``' (exact flips stay exact).

    Args:
        raw: (n, B, H, W) uint8 images, B <= 4 (OpenCV's per-pixel transform takes at most 4).
        cfg: what to draw.
        gen: CPU random generator.
        valid: optional (n, H, W) bool, as ``make_pairs`` takes it.

    Returns:
        As ``make_pairs``, with ``x`` the input itself (unless ``cfg.augment_first``) and
        ``gx`` uint8 (float32 in [0, 1] plus the noise when ``cfg.noise`` is on, as noise
        leaves [0, 1]); so is ``x`` when it is drawn.

    Raises:
        ValueError: not uint8, more than 4 bands, or OpenCV missing; and as ``make_pairs``.
    """
    if not fits_u8_path(raw, cfg):
        raise ValueError(
            f"make_pairs_u8 needs uint8 images of <= 4 bands, OpenCV and pairs.stroke 0, got "
            f"{raw.dtype} with {raw.shape[1]} bands and stroke {cfg.stroke}"
        )
    gx, theta = _draw_view_u8(raw, cfg, gen)
    x = _draw_view_u8(raw, cfg, gen)[0] if cfg.augment_first else raw
    return _pair(x, gx, theta, valid)


def _draw_view_u8(raw: np.ndarray, cfg: PairConfig, gen: torch.Generator):
    """``_draw_view`` on uint8 images with OpenCV: (g(raw), theta)."""
    n, _, h, w = raw.shape
    _check_square(cfg, h, w)
    theta = spatial_matrices(n, cfg, gen, "cpu")
    colour = _colour_transforms(raw, cfg, gen)
    warped = cfg.affine and cfg.strength > 0
    mats = pixel_matrices(theta, h, w) if warped else None
    moves = None if warped else theta[:, :, :2].round().int().tolist()
    out = np.empty_like(raw)
    for i in range(n):
        img = raw[i] if colour is None else _jitter_planes(raw[i], colour[i], cfg.rgb_bands)
        if warped:
            _warp_planes(img, mats[i], out[i])
        else:  # flips and quarter turns move whole pixels: exactly, as make_pairs
            out[i] = _moved_planes(img, moves[i])
    gx = torch.from_numpy(out)
    if _adds_noise(cfg):
        gx = _noisy(from_wire(gx), cfg, gen)
    return gx, theta


def _moved_planes(img: np.ndarray, a: list[list[int]]) -> np.ndarray:
    """(B, H, W) planes moved by a pure D4 matrix ``a`` (integer entries; the output reads the
    input at a p, as ``_move``): a view of ``img`` (reversed and swapped axes, as np.flip and
    np.rot90 give), so no pixel is interpolated."""
    (xx, xy), (yx, yy) = a
    if xx:  # diagonal: a flip along each axis whose entry is -1
        return img[:, ::yy, ::xx]
    # Off-diagonal (quarter turns, transposes): output row i reads input column i (xy = 1) or
    # its mirror, output column j input row j (yx = 1) or its mirror.
    return img.swapaxes(1, 2)[:, ::xy, ::yx]


def _colour_transforms(raw: np.ndarray, cfg: PairConfig, gen: torch.Generator):
    """colour_jitter's draws as (n, k, k + 1) float32 maps of the k named bands' 0-255 values
    (k weights and an offset per output band), or None when colour_jitter would do nothing
    (then nothing is drawn, as there)."""
    n, bands = raw.shape[:2]
    draws = _colour_draws(n, bands, cfg, gen, "cpu")
    if draws is None:
        return None
    m, contrast = draws[0].double(), draws[1].double()
    k = len(cfg.rgb_bands)
    rgb = raw[:, list(cfg.rgb_bands)].reshape(n, k, -1)
    means = torch.from_numpy(rgb.mean(axis=2))  # 0-255
    grey = (m @ means.unsqueeze(2)).mean(dim=(1, 2))  # as colour_jitter's, in 0-255 units
    offset = ((1 - contrast) * grey).view(n, 1, 1).expand(n, k, 1)
    return torch.cat([contrast.view(n, 1, 1) * m, offset], dim=2).float().numpy()


def _jitter_planes(img: np.ndarray, t: np.ndarray, rgb_bands: tuple[int, ...]) -> np.ndarray:
    """(B, H, W) uint8 with the k named bands mapped by ``t`` (k, k + 1), rounded and clamped
    as OpenCV's 8-bit arithmetic does; other bands (infrared) copied untouched."""
    c, h, w = img.shape
    rgb, k = list(rgb_bands), len(rgb_bands)
    mixed = t[:, :k] @ img[rgb].reshape(k, -1).astype(np.float32)
    mixed += t[:, k:]
    np.clip(mixed, 0, 255, out=mixed)
    out = img.copy()
    out[rgb] = np.rint(mixed, out=mixed).astype(np.uint8).reshape(k, h, w)
    return out


def random_crops(
    images: np.ndarray,
    labels: np.ndarray | None,
    size: int,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
    tries: int = 8,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The same random square window of each image (n, B, H, W), its label (n, H, W) and its
    valid mask (n, H, W).

    With a valid mask, a window holding no valid pixel (all padding or nodata) is drawn again,
    up to ``tries`` times: a batch of such windows would have nothing to learn from.
    """
    n, _, h, w = images.shape
    if size == 0 or (size == h and size == w):
        return images, labels, valid
    if size > min(h, w):
        raise ValueError(f"pairs.crop {size} is larger than the {h}x{w} tiles")
    ys, xs = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
    if valid is not None:
        for i in range(n):
            for _ in range(tries):
                if valid[i, ys[i] : ys[i] + size, xs[i] : xs[i] + size].any():
                    break
                ys[i], xs[i] = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        return np.stack(
            [
                a[i, ..., y : y + size, x : x + size]
                for i, (y, x) in enumerate(zip(ys, xs, strict=True))
            ]
        )

    return cut(images), cut(labels), cut(valid)
