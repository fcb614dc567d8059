"""The oversampled grid on which one stamp is rendered, in Fourier space and in real space.

A stamp is rendered on a periodic grid of ``GRID`` x ``GRID`` sub-pixels of
``SUB_SCALE`` = 0.198" (2 x oversampled), covering 96 x 96 SDSS pixels centred on the
69 x 69 stamp, so light from beyond the stamp edge is blurred into it and the
periodic wrap-around of the FFT lands outside the stamp.

- Smooth components (Sersic, exponential, inclined-disk profiles, point sources) are drawn by
  GalSim directly in Fourier space (``draw_k``): exact transforms, no cusp sampling errors.
- Components that need non-affine structure (spiral arms, dust, clumps) are brought to real
  space (``to_real``), multiplied by numpy fields on the ``x``/``y`` sub-pixel coordinates,
  and taken back (``to_k``).
- ``observe`` multiplies by the PSF and the native-pixel response (a box of 0.396") and
  samples the native pixel centres: each stamp pixel is the PSF-convolved flux falling in it.

Coordinates are in arcsec from the stamp centre (the centre of pixel (34, 34)); x runs
along columns (axis 1), y along rows (axis 0), as in GalSim.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft

from galaxyvae import STAMP_SIZE
from galaxyvae.simulation.observing import PIXEL_SCALE, PSFSpec

OVERSAMPLE = 2
GRID_NATIVE = 96
GRID = GRID_NATIVE * OVERSAMPLE
SUB_SCALE = PIXEL_SCALE / OVERSAMPLE
MARGIN = (GRID_NATIVE - STAMP_SIZE) // 2
CENTRE = (MARGIN + STAMP_SIZE // 2) * OVERSAMPLE
"""Sub-pixel index of the stamp centre; native pixel centres are the even sub-pixel indices."""

K_SCALE = 2 * np.pi / (GRID * SUB_SCALE)
"""Spacing of the Fourier grid, radians per arcsec."""


@lru_cache(maxsize=1)
def subpixel_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """(x, y): (GRID, GRID) float32 arcsec offsets of every sub-pixel from the stamp centre."""
    axis = ((np.arange(GRID) - CENTRE) * SUB_SCALE).astype(np.float32)
    x, y = np.meshgrid(axis, axis)
    return x, y


@lru_cache(maxsize=1)
def wavenumbers() -> tuple[np.ndarray, np.ndarray]:
    """(kx, ky): (GRID, GRID//2 + 1) float32 wavenumbers in radians/arcsec, in rfft2 layout."""
    ky = 2 * np.pi * scipy.fft.fftfreq(GRID, SUB_SCALE)
    kx = 2 * np.pi * scipy.fft.rfftfreq(GRID, SUB_SCALE)
    kx, ky = np.meshgrid(kx, ky)
    return kx.astype(np.float32), ky.astype(np.float32)


@lru_cache(maxsize=1)
def pixel_response() -> np.ndarray:
    """Fourier transform of the native 0.396" square pixel, (GRID, GRID//2 + 1) float32."""
    kx, ky = wavenumbers()
    return (np.sinc(kx * PIXEL_SCALE / (2 * np.pi)) * np.sinc(ky * PIXEL_SCALE / (2 * np.pi))).astype(np.float32)


def draw_k(profile, x: float = 0.0, y: float = 0.0) -> np.ndarray:
    """A GalSim profile centred at (x, y) arcsec, as its Fourier transform on the grid.

    Returns (GRID, GRID//2 + 1) complex64 in rfft2 layout; the value at k=0 is the flux.
    """
    import galsim

    half = GRID // 2
    image = galsim.ImageCF(galsim.BoundsI(0, half, -half, half - 1), scale=K_SCALE)
    profile.shift(x + CENTRE * SUB_SCALE, y + CENTRE * SUB_SCALE).drawKImage(image=image, recenter=False)
    return np.fft.ifftshift(image.array, axes=0)


def shifted(k_image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """A Fourier-space scene moved by (dx, dy) arcsec (a separable phase ramp)."""
    kx, ky = wavenumbers()
    ramp_x = np.exp(-1j * kx[0].astype(np.float64) * dx).astype(np.complex64)
    ramp_y = np.exp(-1j * ky[:, 0].astype(np.float64) * dy).astype(np.complex64)
    return k_image * ramp_y[:, None] * ramp_x[None, :]


def to_real(k_image: np.ndarray) -> np.ndarray:
    """Fourier grid -> (GRID, GRID) float32 flux per sub-pixel (band-limited at the sub-pixel Nyquist)."""
    return scipy.fft.irfft2(k_image, s=(GRID, GRID)).astype(np.float32, copy=False)


def to_k(real_image: np.ndarray) -> np.ndarray:
    """(GRID, GRID) flux per sub-pixel -> Fourier grid (complex64)."""
    return scipy.fft.rfft2(real_image.astype(np.float32, copy=False))


def deposit_points(x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Point sources at (x, y) arcsec with ``flux`` nmgy, shared bilinearly among the four nearest
    sub-pixels (which keeps each point's centroid). Returns (GRID, GRID) float32."""
    col = np.asarray(x, dtype=float) / SUB_SCALE + CENTRE
    row = np.asarray(y, dtype=float) / SUB_SCALE + CENTRE
    inside = (col >= 0) & (col < GRID - 1) & (row >= 0) & (row < GRID - 1)
    col, row, flux = col[inside], row[inside], np.asarray(flux, dtype=float)[inside]
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fc, fr = col - c0, row - r0
    grid = np.zeros(GRID * GRID)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)),
                           (1, 1, fr * fc)):
        grid += np.bincount((r0 + dr) * GRID + c0 + dc, weights=flux * weight, minlength=GRID * GRID)
    return grid.reshape(GRID, GRID).astype(np.float32)


def gaussian_blur_k(sigma_arcsec: float) -> np.ndarray:
    """Fourier transform of a unit-flux round Gaussian of rms ``sigma_arcsec``, on the grid."""
    kx, ky = wavenumbers()
    return np.exp(-0.5 * sigma_arcsec ** 2 * (kx * kx + ky * ky)).astype(np.float32)


def psf_k(psf: PSFSpec) -> np.ndarray:
    """The PSF's Fourier transform on the grid, normalised to 1 at k=0.

    A Kolmogorov transform is analytic, so GalSim draws it in Fourier space; a Moffat transform
    is costly for general beta, so its (smooth) real-space profile is sampled and transformed.
    """
    import galsim

    profile = psf.galsim_profile()
    if psf.model == "kolmogorov":
        transform = draw_k(profile, -CENTRE * SUB_SCALE, -CENTRE * SUB_SCALE)
    else:
        image = profile.drawImage(nx=GRID, ny=GRID, scale=SUB_SCALE, method="no_pixel", use_true_center=False)
        transform = to_k(np.fft.ifftshift(image.array))
    transform /= transform[0, 0].real
    return transform.astype(np.complex64)


def random_field(rng: np.random.Generator, correlation_arcsec: float) -> np.ndarray:
    """A unit-variance Gaussian random field on the grid, smooth on ``correlation_arcsec`` scales.

    White noise filtered by a Gaussian of rms ``correlation_arcsec``, made directly in Fourier
    space: only wavenumbers the filter passes (|k| < 4 / correlation) are drawn. Returns (GRID, GRID) float32.
    """
    kx, ky = wavenumbers()
    cut = min(int(np.ceil(4.0 / correlation_arcsec / K_SCALE)) + 1, GRID // 2)
    rows = np.r_[0:cut, GRID - cut + 1:GRID]
    block = rng.standard_normal((len(rows), cut, 2)).astype(np.float32)
    transform = np.zeros((GRID, GRID // 2 + 1), np.complex64)
    k2 = kx[rows, :cut] ** 2 + ky[rows, :cut] ** 2
    transform[rows, :cut] = (block[..., 0] + 1j * block[..., 1]) * np.exp(-0.5 * correlation_arcsec ** 2 * k2)
    field = to_real(transform)
    return field / max(float(field.std()), 1e-12)


def isophotal_centroid(stamp: np.ndarray, threshold: float) -> tuple[float, float]:
    """Flux-weighted centroid (x, y) in arcsec from the stamp centre of the pixels of a (69, 69)
    stamp above ``threshold``: where a detection pipeline would centre a cutout."""
    weights = np.where(stamp > threshold, stamp, 0).astype(float)
    if weights.sum() <= 0:
        return 0.0, 0.0
    y, x = np.mgrid[:STAMP_SIZE, :STAMP_SIZE] - STAMP_SIZE // 2
    return (float((weights * x).sum() / weights.sum()) * PIXEL_SCALE,
            float((weights * y).sum() / weights.sum()) * PIXEL_SCALE)


def observe(k_image: np.ndarray, psf_transform: np.ndarray) -> np.ndarray:
    """Blur an intrinsic scene by the PSF and the native pixel; return the (69, 69) float32 stamp
    of flux per native pixel (nmgy if the scene is in nmgy), before noise."""
    blurred = to_real(k_image * psf_transform * pixel_response())
    native = blurred[::OVERSAMPLE, ::OVERSAMPLE][MARGIN:MARGIN + STAMP_SIZE, MARGIN:MARGIN + STAMP_SIZE]
    return native * np.float32(OVERSAMPLE ** 2)
