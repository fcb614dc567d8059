"""Image utilities shared by ingestion: colour to one channel, crop boxes, flux-conserving resampling.

Conventions
-----------
Images are numpy arrays indexed ``[row, column]`` = ``[y, x]``. A pixel ``j`` covers the
interval ``[j, j + 1)`` along its axis, so its centre is at ``j + 0.5``. A *box* is
``(y0, x0, y1, x1)`` in those continuous pixel coordinates, end-exclusive; integer boxes
are ordinary slices, and boxes with fractional edges are allowed (used to centre a
stamp exactly on a detected galaxy).

Resampling a box to ``n x n`` output pixels makes each output pixel ``s = side / n``
source pixels wide:

- ``s >= 1`` (shrinking): *area averaging*. Each output pixel is the mean of the source
  pixels it overlaps, weighted by the overlapping area. This preserves surface
  brightness, and therefore flux: ``sum(output) * s**2 == sum(source pixels in box)``.
  For an integer ``s`` and an integer box it is exactly the mean over ``s x s`` blocks.
- ``s < 1`` (enlarging a stamp smaller than the output): *linear interpolation* between
  source pixel centres (constant beyond the outermost centres). It invents no structure
  and keeps the mean surface brightness to within edge effects, but conserves flux only
  approximately; such stamps are flagged ``upsampled``.

Both are separable: ``output = Wy @ image @ Wx.T`` with one weight matrix per axis.
"""

from __future__ import annotations

import math

import numpy as np

LUMINANCE_WEIGHTS = (0.2126, 0.7152, 0.0722)
"""Weights of red, green and blue in the default colour -> one channel rule (ITU-R BT.709
luma), applied to the stored pixel values as they are (no gamma linearisation)."""

CHANNEL_NAMES = {"r": 0, "red": 0, "g": 1, "green": 1, "b": 2, "blue": 2}

Box = tuple[float, float, float, float]


def parse_band(band) -> int | str | None:
    """Normalise a ``--band`` value: None or "luminance" -> None, "r"/"g"/"b" -> "r"/"g"/"b",
    a non-negative integer (or its string) -> that int (a FITS cube plane or a channel index).

    Raises ValueError for anything else.
    """
    if band is None:
        return None
    if isinstance(band, (int, np.integer)) and not isinstance(band, bool):
        if band < 0:
            raise ValueError(f"--band {band}: a plane index must be >= 0")
        return int(band)
    text = str(band).strip().lower()
    if text in ("", "luminance", "lum", "l"):
        return None
    if text in CHANNEL_NAMES:
        return "rgb"[CHANNEL_NAMES[text]]
    if text.isdigit():
        return int(text)
    raise ValueError(f"--band {band!r}: expected r, g, b, luminance or a plane index 0, 1, 2, ...")


def to_single_channel(image: np.ndarray, band: int | str | None = None) -> tuple[np.ndarray, str]:
    """Reduce an image to one channel.

    image: (H, W) grey, or (H, W, C) with C = 2 (grey + alpha), 3 (RGB) or 4 (RGBA).
    band:  None -> grey as it is, colour as luminance with LUMINANCE_WEIGHTS;
           "r" / "g" / "b" or a channel index -> that channel of a colour image.
    Alpha channels are ignored. Returns ((H, W) float64, a short description of the rule).
    Raises ValueError if the shape or band does not fit.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.float64), "grey"
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected a grey (H, W) or colour (H, W, 3) image, got shape {image.shape}")
    channels = image.shape[2]
    if channels <= 2:
        return image[..., 0].astype(np.float64), "grey"
    if band is None:
        rgb = image[..., :3].astype(np.float64)
        return rgb @ np.asarray(LUMINANCE_WEIGHTS), "luminance 0.2126 R + 0.7152 G + 0.0722 B"
    index = CHANNEL_NAMES[band] if isinstance(band, str) else band
    if index >= 3:
        raise ValueError(f"--band {band}: a colour image has channels 0, 1, 2 (r, g, b)")
    return image[..., index].astype(np.float64), f"{'rgb'[index]} channel"


def centre_box(shape: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """The integer ``side x side`` box centred in an image of ``shape`` (H, W).

    When the margin is odd the box sits half a pixel towards the start (floor), so
    centre-cropping 207 of 424 pixels gives rows and columns 108..314.
    """
    height, width = shape
    if side > min(height, width):
        raise ValueError(f"cannot cut a {side} px box from a {height}x{width} image")
    y0, x0 = (height - side) // 2, (width - side) // 2
    return y0, x0, y0 + side, x0 + side


def square_box_on_light(image: np.ndarray) -> tuple[int, int, int, int]:
    """The largest square box in ``image`` (H, W), placed so that the light stays centred.

    A square image is kept whole. For an oblong one the square slides along the long axis
    to be centred on the light-weighted centroid of the pixels more than 3 sigma above the
    sky (median and scaled median absolute deviation), clamped to the image. Returns an
    integer box (y0, x0, y1, x1).
    """
    height, width = image.shape
    side = min(height, width)
    if height == width:
        return 0, 0, side, side
    sky = np.median(image)
    noise = 1.4826 * np.median(np.abs(image - sky))
    weights = np.where(image > sky + 3 * noise, image - sky, 0.0)
    axis_profile = weights.sum(axis=1 if height > width else 0)
    total = axis_profile.sum()
    long_side = max(height, width)
    centre = (axis_profile @ (np.arange(long_side) + 0.5)) / total if total > 0 else long_side / 2
    start = int(round(centre - side / 2))
    start = min(max(start, 0), long_side - side)
    if height > width:
        return start, 0, start + side, side
    return 0, start, side, start + side


def box_around(x: float, y: float, side: float) -> Box:
    """The ``side``-wide box (y0, x0, y1, x1) centred exactly on the point (x, y), in pixel coordinates
    where pixel j's centre is at j + 0.5 (add 0.5 to array-index centroids before calling)."""
    half = side / 2
    return y - half, x - half, y + half, x + half


def enclosing_integer_box(box: Box) -> tuple[int, int, int, int]:
    """The smallest integer box containing ``box`` (for the ``crop_box`` metadata column)."""
    y0, x0, y1, x1 = box
    return math.floor(y0 + 1e-9), math.floor(x0 + 1e-9), math.ceil(y1 - 1e-9), math.ceil(x1 - 1e-9)


def box_inside(box: Box, shape: tuple[int, int]) -> bool:
    """Whether ``box`` lies entirely within an image of ``shape`` (H, W)."""
    y0, x0, y1, x1 = box
    return y0 >= 0 and x0 >= 0 and y1 <= shape[0] and x1 <= shape[1]


def area_average_weights(start: float, stop: float, n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights averaging source pixels over ``n_out`` equal cells spanning [start, stop).

    Row i holds, for each source pixel j, the length of overlap between [j, j + 1) and the
    cell [start + i*s, start + (i+1)*s), divided by s = (stop - start) / n_out. Rows sum to 1.
    """
    scale = (stop - start) / n_out
    lo = start + scale * np.arange(n_out)[:, None]
    hi = lo + scale
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None) / scale


def linear_weights(start: float, stop: float, n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation between source pixel centres at the
    centres of ``n_out`` equal cells spanning [start, stop); constant beyond the outermost centres."""
    scale = (stop - start) / n_out
    centres = start + scale * (np.arange(n_out) + 0.5) - 0.5  # in source-index units
    centres = np.clip(centres, 0.0, n_in - 1.0)
    left = np.minimum(np.floor(centres).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
    frac = centres - left
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    weights[rows, left] += 1.0 - frac
    if n_in > 1:
        weights[rows, left + 1] += frac
    return weights


def axis_weights(start: float, stop: float, n_out: int, n_in: int) -> np.ndarray:
    """Area averaging when shrinking (cells >= 1 source pixel), linear interpolation when enlarging."""
    if stop - start >= n_out:
        return area_average_weights(start, stop, n_out, n_in)
    return linear_weights(start, stop, n_out, n_in)


def resample(image: np.ndarray, box: Box, size: int) -> tuple[np.ndarray, float, bool]:
    """Cut ``box`` out of ``image`` (H, W) and resample it to (size, size).

    box: (y0, x0, y1, x1), square, inside the image; fractional edges allowed.
    Returns (stamp (size, size) float64 in the image's units per source pixel area,
    scale s = source pixels per output pixel, upsampled = s < 1). See the module docstring
    for the two regimes. Raises ValueError for a non-square box or one outside the image.
    """
    y0, x0, y1, x1 = box
    if not box_inside(box, image.shape):
        raise ValueError(f"box {box} extends outside the {image.shape[0]}x{image.shape[1]} image")
    if not math.isclose(y1 - y0, x1 - x0, rel_tol=1e-9):
        raise ValueError(f"box {box} is not square")
    iy0, ix0, iy1, ix1 = enclosing_integer_box(box)
    patch = np.asarray(image[iy0:iy1, ix0:ix1], dtype=np.float64)
    wy = axis_weights(y0 - iy0, y1 - iy0, size, iy1 - iy0)
    wx = axis_weights(x0 - ix0, x1 - ix0, size, ix1 - ix0)
    scale = (y1 - y0) / size
    return wy @ patch @ wx.T, scale, scale < 1


def is_blank(image: np.ndarray) -> bool:
    """Whether every pixel of ``image`` has the same value (an empty or failed frame)."""
    return bool(np.ptp(image) == 0)
