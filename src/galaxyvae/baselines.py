"""Per-image parametric baselines: today's practice that the VAE is judged against.

Two models, each fitted by least squares over all pixels of every image at once:

- ``fit_gaussian``: the paper's *scaled bivariate Gaussian density*,
  ``x_hat(p) = flux * N2(p; centre, Sigma) (+ sky)``, with a full covariance (two widths and
  a rotation). In astropy's terms it is ``Gaussian2D`` (+ ``Const2D``), whose ``amplitude``
  is the peak value: ``flux = amplitude * 2 * pi * sigma_major * sigma_minor``.
- ``fit_sersic``: beyond the paper, a single elliptical Sersic profile parameterised exactly
  as astropy's ``Sersic2D`` (amplitude at r_eff, r_eff along the major axis, n, x_0, y_0,
  ellip, theta), with ``b_n = scipy.special.gammaincinv(2n, 0.5)`` as astropy computes it.

Models are evaluated at pixel centres, pixel (row i, column j) sitting at ``x = j, y = i``
(astropy's convention with ``np.mgrid``), so fitted parameters plug straight into astropy.

A constant sky level is fitted only when asked (``fit_sky=True``): the simulated survey is
sky-subtracted (``attrs["sky_subtracted"] = True``), so its baselines have no sky term, while
data that still carry their sky (JPEG cut-outs, for example) need one.

The solver is a batched Levenberg-Marquardt in numpy (see ``docs/baselines.md``): a start
chosen among moment-based candidates, then damped Newton (Gaussian) or Gauss-Newton (Sersic)
steps whose small normal equations are solved for all images at once. Amplitude and sky are
re-solved exactly (linear least squares) at every trial point; the shape is the Cholesky factor
of the inverse covariance, so it stays positive definite; widths, centre and Sersic index are
kept inside bounds by projection. Pixel sums over the Jacobian are moments of weighted images,
so no (N, P, H*W) Jacobian is ever formed. Iterations see the float32 images (Gaussian profiles
only over the window where they are not negligible), and fits that float32 cannot resolve are
finished in float64; the reported models and squared errors come from one pass over every pixel.
Every pass over pixels of the Gaussian fit is a compiled numba kernel (float64 sums, image by
image; compiled on first use and cached on disk); the Sersic fit's own passes are numpy.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field, replace

import llvmlite.ir
import numba
import numba.extending
import numpy as np
import scipy.special

from galaxyvae.errors import InputError

DEFAULT_CHUNK_SIZE = 1024
"""Images fitted together. Beyond the returned models (4 bytes a pixel), a chunk needs a float32
copy of its images (unless they are float32 already) and a few megabytes of work arrays."""

SERSIC_STARTS = (0.5, 2.5)
"""Starting Sersic indices: 0.5, where the profile is the fitted Gaussian (so the Sersic fit is
never worse than it), and 2.5, between exponential discs (1) and de Vaucouleurs bulges (4)."""

CPU_THREADS = 1
"""BLAS threads numpy may use while fitting. The batched work is many short passes over arrays
of a few hundred kilobytes; on a shared machine a second thread that has lost its core stalls
every pass (20-40x slower measured), while on an idle one it gains little."""

_BLOCK = 32
"""Images per pixel pass: their float32 work arrays (about 0.6 MB each) stay in the CPU's cache.
Smaller windows go in proportionally larger blocks (as many pixels as _BLOCK stamps of
_STAMP_PIXELS), since each pass has a fixed cost too."""

_STAMP_PIXELS = 69 * 69

_ITERATION_WINDOW_Q = 20.0
"""While iterating, a Gaussian is evaluated only where its squared elliptical radius q is below
this (there it is above exp(-10) = 4.5e-5 of its peak); what lies beyond moves the optimum by a
negligible amount (second order in that fraction: measured, the fits' squared errors stayed
within 1.1e-7 of astropy's at 30, 25, 20 and 16). The reported fit is evaluated everywhere."""

_START_WINDOW_Q = 12.0
"""The starting points of the float32 iterations are evaluated over the smaller window q <= 12
(above exp(-6) = 2.5e-3 of the peak, 99.75% of the profile's flux): there the evaluation only
picks the better start and sets the direction of the first step, which is never taken as the
last (its landing point is evaluated over the full iteration window). Measured on the held-out
survey stamps: the same iteration counts as at q <= 20; from q <= 6 on, the first steps worsen."""

_FLOAT32_COST_NOISE = 1e-6
"""Relative rounding error of a float32 squared error, in units of cost + sqrt(cost * signal)
(measured at most 5e-7): cost changes below it are not told apart from zero."""

_FLOAT32_FLOOR = 1e-10
"""Newton reductions below this fraction of the model's signal power sum(model^2) are under
float32's resolution (measured agreement with float64 to 1.5e-11): such fits finish in float64."""

_LAST_STEP = 1e-4
"""A Newton step (exact Hessian, barely damped) that promises less than this fraction of the
squared error is the last: convergence is quadratic (measured on simulated galaxies, the next
step promises about 3 (p / cost)^2 cost after one promising p), so what remains after it is of
order 3e-8 of the squared error. The step is checked by the final pass (``_final_fits``)."""

_FLOAT32_RESOLVED = 1e-5
"""Fits with squared errors below this fraction of the signal power (noiseless images) are
finished in float64: float32's rounding of the model is then a large part of the residual."""

_SHAPE_PARAMETERS = 5  # x0, y0 and the three entries of the Cholesky factor of the precision
_HALF_LIGHT_PER_SIGMA = math.sqrt(2 * math.log(2))  # half-light radius of a 2-D Gaussian / sigma


@dataclass
class BaselineFit:
    """Per-image fits of one parametric model to N images of H x W pixels.

    name:         "gaussian" or "sersic"
    model_images: (N, H, W) float32, the fitted model at pixel centres (sky included if fitted),
                  in the images' units
    params:       parameter name -> (N,) float64 array (see ``fit_gaussian`` / ``fit_sersic``)
    mse:          (N,) float64 mean squared residual over pixels, in squared image units
    converged:    (N,) bool, True where the solver met its tolerance before its iteration limit
    iterations:   (N,) int, solver iterations used (for the best start, for Sersic fits)
    """

    name: str
    model_images: np.ndarray
    params: dict[str, np.ndarray]
    mse: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class _Settings:
    """Solver settings shared by both models; bounds in pixels, tolerances relative."""

    fit_sky: bool
    max_iterations: int
    tolerance: float
    chunk_size: int
    width_bounds: tuple[float, float]
    centre_margin: float
    n_extra: int = 0
    log_n_bounds: tuple[float, float] = (0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Public API


def fit_gaussian(images, fit_sky: bool = False, *, max_iterations: int = 100,
                 tolerance: float = 1e-8, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 sigma_bounds: tuple[float, float | None] = (0.1, None)) -> BaselineFit:
    """Fit ``amplitude * exp(-d^T Sigma^-1 d / 2) (+ sky)`` to every image by least squares.

    images:  (N, H, W) numpy array or torch tensor (copied to the CPU), any real dtype.
             Units are kept: parameters and model are in image units.
    fit_sky: also fit a constant sky level (for data that are not sky-subtracted).
    max_iterations: Levenberg-Marquardt iterations per image at most (per precision stage).
    tolerance: an image has converged when the Newton step promises to lower its sum of
        squares by less than this fraction (1e-8: its squared error is within about that
        fraction of the local minimum's).
    chunk_size: images solved together (see DEFAULT_CHUNK_SIZE for the memory it takes).
    sigma_bounds: (min, max) of both widths in pixels; max defaults to 10 * max(H, W).

    Returns a ``BaselineFit`` named "gaussian" whose params are, each (N,) float64:
    ``flux`` (total, = amplitude * 2 pi sigma_major sigma_minor), ``amplitude`` (peak),
    ``x0``, ``y0`` (pixels, x along columns), ``sigma_major``, ``sigma_minor`` (pixels),
    ``theta`` (radians in [0, pi), major axis from +x towards +y) and ``sky`` when fitted.
    These are astropy's ``Gaussian2D(amplitude, x0, y0, sigma_major, sigma_minor, theta)``.
    """
    y = _as_batch(images)
    settings = _Settings(
        fit_sky=bool(fit_sky), max_iterations=_positive_int(max_iterations, "max_iterations"),
        tolerance=float(tolerance), chunk_size=_positive_int(chunk_size, "chunk_size"),
        width_bounds=_width_bounds(sigma_bounds, 10.0 * max(y.shape[1:]), "sigma_bounds"),
        centre_margin=0.5 * max(y.shape[1:]))
    with _blas_threads():
        parts = [_fit_gaussian_chunk(_Stamps(chunk), settings) for chunk in _chunks(y, settings.chunk_size)]
    return _package("gaussian", parts, settings, y.shape)


def fit_sersic(images, fit_sky: bool = False, *, n_starts: tuple[float, ...] = SERSIC_STARTS,
               n_bounds: tuple[float, float] = (0.3, 8.0),
               r_eff_bounds: tuple[float, float | None] = (0.1, None), max_iterations: int = 200,
               tolerance: float = 1e-8, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BaselineFit:
    """Fit one elliptical Sersic profile (+ sky) to every image by least squares.

    The model is astropy's ``Sersic2D`` (boxiness c = 0):
    ``amplitude * exp(-b_n (z^(1/n) - 1))``, ``z^2 = (x_maj / r_eff)^2 + (x_min / ((1 - ellip) r_eff))^2``,
    ``b_n = gammaincinv(2 n, 0.5)``. Each image is first fitted with a Gaussian; the Sersic
    fit starts from its centre and half-light ellipse at every index in ``n_starts`` and the
    start with the lowest squared error is kept. The Gaussian itself is a Sersic profile of
    index 1/2, and a fit that ends worse than it is replaced by it, so the Sersic fit is never
    worse than the Gaussian one.

    images:  (N, H, W) numpy array or torch tensor (copied to the CPU); units kept.
    fit_sky: also fit a constant sky level.
    n_bounds: allowed Sersic indices (n is kept inside by projection).
    r_eff_bounds: (min, max) in pixels of both semi-axes at the half-light isophote;
        max defaults to 4 * max(H, W).
    max_iterations, tolerance, chunk_size: as for ``fit_gaussian`` (per start).

    Returns a ``BaselineFit`` named "sersic" whose params are, each (N,) float64:
    ``amplitude`` (surface brightness at r_eff), ``r_eff`` (pixels, semi-major axis of the
    half-light ellipse), ``n``, ``x0``, ``y0``, ``ellip`` (1 - minor/major), ``theta``
    (radians in [0, pi)), ``flux`` (total, analytic, over the infinite plane) and ``sky``
    when fitted.
    """
    y = _as_batch(images)
    low, high = (float(v) for v in n_bounds)
    if not 0 < low <= high:
        raise InputError(f"n_bounds must be 0 < min <= max, got {n_bounds!r}.")
    starts = tuple(float(n) for n in n_starts)
    if not starts or any(not low <= n <= high for n in starts):
        raise InputError(f"n_starts must be a non-empty tuple of indices inside n_bounds {n_bounds!r}, "
                         f"got {n_starts!r}.")
    settings = _Settings(
        fit_sky=bool(fit_sky), max_iterations=_positive_int(max_iterations, "max_iterations"),
        tolerance=float(tolerance), chunk_size=_positive_int(chunk_size, "chunk_size"),
        width_bounds=_width_bounds(r_eff_bounds, 4.0 * max(y.shape[1:]), "r_eff_bounds"),
        centre_margin=0.5 * max(y.shape[1:]), n_extra=1, log_n_bounds=(math.log(low), math.log(high)))
    # The Gaussian that seeds each start has the same half-light ellipse, hence these widths.
    gaussian_settings = replace(
        settings, n_extra=0, log_n_bounds=(0.0, 0.0), max_iterations=100,
        width_bounds=tuple(w / _HALF_LIGHT_PER_SIGMA for w in settings.width_bounds))
    with _blas_threads():
        parts = [_fit_sersic_chunk(_Stamps(chunk), starts, settings, gaussian_settings)
                 for chunk in _chunks(y, settings.chunk_size)]
    return _package("sersic", parts, settings, y.shape)


def max_gaussian_log_likelihood(images, model_images) -> np.ndarray:
    """Maximum over sigma > 0 of log N(x; x_hat, sigma^2 I), per image, in nats.

    images, model_images: (N, H, W) arrays (numpy or torch) in the same units.
    The maximum is at sigma^2 = s2 = mean squared residual, where it equals
    ``-m/2 * (log(2 pi s2) + 1)`` with m = H * W pixels. A model that reproduces an image
    exactly (s2 = 0) has no finite maximum: its value is +inf.
    Returns (N,) float64.
    """
    x = _to_numpy64(images, "images")
    x_hat = _to_numpy64(model_images, "model_images")
    if x.ndim != 3 or x.shape != x_hat.shape:
        raise InputError(f"images and model_images must both be (N, H, W) with the same shape, "
                         f"got {x.shape} and {x_hat.shape}.")
    m = x.shape[1] * x.shape[2]
    s2 = np.mean((x - x_hat) ** 2, axis=(1, 2))
    exact = s2 == 0
    with np.errstate(divide="ignore"):
        value = -0.5 * m * (np.log(2 * np.pi * np.where(exact, 1.0, s2)) + 1.0)
    return np.where(exact, np.inf, value)


# ---------------------------------------------------------------------------------------------
# Input handling


def _as_batch(images) -> np.ndarray:
    """(N, H, W) float32 or float64 numpy array (other dtypes become float64), on the CPU;
    raises InputError."""
    if hasattr(images, "detach"):  # a torch tensor, on any device
        images = images.detach().cpu().numpy()
    try:
        y = np.asarray(images)
        if y.dtype not in (np.float32, np.float64) or not y.dtype.isnative:
            y = y.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"images must be a numeric (N, H, W) array: {error}.") from None
    if y.ndim != 3 or min(y.shape) == 0:
        raise InputError(f"images must be a non-empty (N, H, W) array, got shape {tuple(y.shape)}.")
    with np.errstate(over="ignore", invalid="ignore"):
        # One cheap sum finds any NaN or infinity; only then is every pixel looked at.
        finite = np.isfinite(y.sum()) or np.isfinite(y).all()
    if not finite:
        raise InputError("images contain NaN or infinite pixels; fix them before fitting.")
    return y


def _to_numpy64(array, name: str) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _positive_int(value, name: str) -> int:
    if int(value) != value or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _width_bounds(bounds, default_high: float, name: str) -> tuple[float, float]:
    low = float(bounds[0])
    high = float(bounds[1]) if bounds[1] is not None else default_high
    if not 0 < low < high:
        raise InputError(f"{name} must be 0 < min < max in pixels, got {bounds!r}.")
    return low, high


@functools.lru_cache(maxsize=1)
def _thread_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _blas_threads():
    """Within the block, BLAS (numpy's matrix products) runs on CPU_THREADS threads, and
    floating-point warnings of the solver's deliberate over- and underflows are silenced."""
    with _thread_controller().limit(limits=CPU_THREADS, user_api="blas"), \
            np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        yield


def _chunks(y: np.ndarray, size: int):
    """Consecutive (size, H, W) views of y (the last may be shorter)."""
    for start in range(0, len(y), size):
        yield y[start:start + size]


# ---------------------------------------------------------------------------------------------
# The images of one chunk, and the windows the iterations look at


class _Stamps:
    """The images of one chunk: a float32 copy for the iterations, the source for float64 passes.

    source: (n, H, W) float32 or float64. Pixel (i, j) sits at x = j - cx, y = i - cy, relative
    to the stamp's centre (cx, cy) = ((W - 1) / 2, (H - 1) / 2).
    """

    def __init__(self, source: np.ndarray):
        self.source = np.ascontiguousarray(source)
        self.y32 = np.ascontiguousarray(source, np.float32)
        n, self.height, self.width = source.shape
        self.pixels = self.height * self.width
        self.cx, self.cy = (self.width - 1) / 2.0, (self.height - 1) / 2.0
        # (n,) float64 sums of each image's pixels and of their squares: of the float32 copy that
        # the windowed evaluations see, and of the source; and the block-averaged images
        # (n, H // b, W // b) float32 the starts are measured on. One pass over the images.
        self.binning = 3 if min(self.height, self.width) >= 24 else 1
        self.coarse = np.empty((n, self.height // self.binning, self.width // self.binning), np.float32)
        self.sums32, self.squares32 = np.empty(n), np.empty(n)
        _image_statistics(self.y32, self.binning, self.coarse, self.sums32, self.squares32)
        self.sums, self.squares = ((self.sums32, self.squares32) if self.source.dtype == np.float32
                                   else _sums_and_squares(self.source))
        self._views = {}

    def images(self, index, dtype) -> np.ndarray:
        """(len(index), H, W) images index in dtype, read only: a view where index is a run of
        consecutive images and dtype float32, else a copy."""
        if dtype == np.float32:
            consecutive = len(index) and index[-1] - index[0] == len(index) - 1
            return self.y32[index[0]:index[-1] + 1] if consecutive else self.y32[index]
        return self.source[index].astype(np.float64)

    def windows(self, index, top, left, height: int, width: int) -> np.ndarray:
        """(len(index), height, width) float32 copies of the windows with corners (top, left)."""
        if height == self.height and width == self.width:
            return self.y32[index]
        if (height, width) not in self._views:
            self._views[height, width] = np.lib.stride_tricks.sliding_window_view(
                self.y32, (height, width), axis=(1, 2))
        return self._views[height, width][index, top, left]


def _window_side(reach, size: int) -> np.ndarray:
    """Per image the side (pixels) that holds the centre's pixel and reach (n,) pixels on either
    side of the centre, whatever its rounding, or the whole size where that is not smaller."""
    need = 2 * np.ceil(np.minimum(reach, size)).astype(np.int64) + 3
    return np.minimum(need, size)


def _windows(stamps: _Stamps, x0, y0, a, b, c, q_limit: float):
    """Per image the window (or the whole stamp) holding every pixel with q <= q_limit, the
    bounding box of that ellipse: (top, left, height, width), each (n,) int64; q_limit = inf
    gives the whole stamp."""
    det = a * c - b * b
    heights = _window_side(np.sqrt(q_limit * a / det), stamps.height)
    widths = _window_side(np.sqrt(q_limit * c / det), stamps.width)
    top = _clip(np.rint(y0 + stamps.cy).astype(np.int64) - heights // 2, 0, stamps.height - heights)
    left = _clip(np.rint(x0 + stamps.cx).astype(np.int64) - widths // 2, 0, stamps.width - widths)
    return top, left, heights, widths


def _blocks(members: np.ndarray, pixels: int):
    """Slices of members in blocks of about _BLOCK full stamps' worth of pixels each."""
    size = max(1, _BLOCK * _STAMP_PIXELS // pixels)
    for start in range(0, len(members), size):
        yield slice(start, start + size)


# ---------------------------------------------------------------------------------------------
# Parameter vector theta, per image: [amplitude, (sky), x0, y0, l1, l2, l3, (log n)].
# x0, y0 are relative to the stamp centre; the shape is the Cholesky factor of the precision Q,
# L = [[exp(l1), 0], [l2, exp(l3)]], Q = L L^T, so q = (exp(l1) dx + l2 dy)^2 + (exp(l3) dy)^2
# is positive definite for every theta.


def _n_linear(settings: _Settings) -> int:
    return 2 if settings.fit_sky else 1


def _shape_slice(settings: _Settings) -> slice:
    start = _n_linear(settings)
    return slice(start, start + _SHAPE_PARAMETERS)


def _n_parameters(settings: _Settings) -> int:
    return _n_linear(settings) + _SHAPE_PARAMETERS + settings.n_extra


def _precision(shape):
    """Entries (a, b, c) of Q = L L^T = [[a, b], [b, c]] for the shape part of theta."""
    e1, l2, e3 = np.exp(shape[:, 2]), shape[:, 3], np.exp(shape[:, 4])
    return e1 * e1, e1 * l2, l2 * l2 + e3 * e3


def _cholesky_parameters(a, b, c):
    """(l1, l2, l3) of the Cholesky factor of a positive definite [[a, b], [b, c]]."""
    e1 = np.sqrt(a)
    det = np.maximum(a * c - b * b, 1e-300)
    return np.log(e1), b / e1, 0.5 * np.log(det / a)


def _clip(x, low, high):
    """np.clip without its Python-level overhead (it is called on small arrays, often)."""
    return np.minimum(np.maximum(x, low), high)


def _eigen(a, b, c):
    """Eigenvalues (larger, smaller) of [[a, b], [b, c]] and the angle of the larger one's axis."""
    mean = 0.5 * (a + c)
    radius = np.hypot(0.5 * (a - c), b)
    return mean + radius, mean - radius, 0.5 * np.arctan2(2 * b, a - c)


def _clip_eigenvalues(a, b, c, low: float, high: float):
    """[[a, b], [b, c]] with its eigenvalues clipped into [low, high], same eigenvectors."""
    larger, smaller, angle = _eigen(a, b, c)
    larger, smaller = _clip(larger, low, high), _clip(smaller, low, high)
    cos, sin = np.cos(angle), np.sin(angle)
    return (larger * cos * cos + smaller * sin * sin, (larger - smaller) * sin * cos,
            larger * sin * sin + smaller * cos * cos)


def _inverse_2x2(a, b, c):
    det = a * c - b * b
    return c / det, -b / det, a / det


def _box_bounds(settings: _Settings, stamps: _Stamps):
    """(lower, upper), each (P,): the box of the centre and Sersic index, infinite elsewhere.
    The Cholesky entries get a loose box, several e-folds beyond the width bounds, only so that
    a wild step cannot overflow before the widths are projected."""
    size = _n_parameters(settings)
    lower, upper = np.full(size, -np.inf), np.full(size, np.inf)
    start = _n_linear(settings)
    lower[start], upper[start] = -stamps.cx - settings.centre_margin, stamps.cx + settings.centre_margin
    lower[start + 1], upper[start + 1] = -stamps.cy - settings.centre_margin, stamps.cy + settings.centre_margin
    low, high = settings.width_bounds
    for k in (2, 4):
        lower[start + k], upper[start + k] = -math.log(high) - 10.0, -math.log(low) + 10.0
    lower[start + 3], upper[start + 3] = -1e4 / low, 1e4 / low
    if settings.n_extra:
        lower[-1], upper[-1] = settings.log_n_bounds
    return lower, upper


def _project(theta, settings: _Settings, stamps: _Stamps):
    """theta (a copy) with its widths inside settings.width_bounds and boxed entries in their box."""
    lower, upper = _box_bounds(settings, stamps)
    theta = np.minimum(np.maximum(theta, lower), upper)
    shape = _shape_slice(settings)
    low, high = settings.width_bounds
    # The profile's semi-axes (sigmas, or r_eff and the minor axis) are 1 / sqrt(eigenvalues of Q).
    a, b, c = _clip_eigenvalues(*_precision(theta[:, shape]), 1.0 / high ** 2, 1.0 / low ** 2)
    theta[:, shape.start + 2:shape.stop] = np.stack(_cholesky_parameters(a, b, c), 1)
    return theta


def _frozen(theta, gradient, settings: _Settings, stamps: _Stamps):
    """Boxed entries at a bound whose descent direction points out of the box: (n, P) bool."""
    lower, upper = _box_bounds(settings, stamps)
    tiny = 1e-12 * (1.0 + np.abs(theta))
    return ((theta <= lower + tiny) & (gradient < 0)) | ((theta >= upper - tiny) & (gradient > 0))


# ---------------------------------------------------------------------------------------------
# Pixel moments. With d = (dx, dy) the offsets of a pixel from the profile's centre,
# dq/d(shape_k) = sum_ab c[k, b, a] dy^b dx^a is a quadratic polynomial, so every pixel sum over
# the Jacobian is a moment sum_p w_p dy^b dx^a of some weight image w, a, b <= 4.


def _placement(entries: list[list[tuple]], shape: tuple[int, ...]) -> np.ndarray:
    """(len(entries), prod(shape)) 0/1 matrix putting value i at each index tuple of entries[i]."""
    matrix = np.zeros((len(entries), math.prod(shape)))
    for i, positions in enumerate(entries):
        for position in positions:
            matrix[i, np.ravel_multi_index(position, shape)] = 1.0
    return matrix


# d q / d shape_k = sum_ab c[k, b, a] dy^b dx^a, shape_k over x0, y0, l1, l2, l3, as values:
# -2 e1^2, -2 e1 l2, -2 (l2^2 + e3^2), 2 e1^2, 2 e1 l2, 2 e1, 2 l2, 2 e3^2.
_FIRST = _placement([[(0, 0, 1)], [(0, 1, 0), (1, 0, 1)], [(1, 1, 0)], [(2, 0, 2)], [(2, 1, 1)],
                     [(3, 1, 1)], [(3, 2, 0)], [(4, 2, 0)]], (_SHAPE_PARAMETERS, 3, 3))

# d2 q / d shape_k d shape_l = sum_ab c[k, l, b, a] dy^b dx^a, as values:
# 2 e1^2, 2 e1 l2, -4 e1^2, -2 e1 l2, -2 e1, 2 (l2^2 + e3^2), -4 l2, -4 e3^2, 4 e1^2, 2, 4 e3^2.
_SECOND = _placement(
    [[(0, 0, 0, 0)], [(0, 1, 0, 0), (1, 0, 0, 0), (2, 2, 1, 1)], [(0, 2, 0, 1), (2, 0, 0, 1)],
     [(0, 2, 1, 0), (2, 0, 1, 0), (1, 2, 0, 1), (2, 1, 0, 1)],
     [(0, 3, 1, 0), (3, 0, 1, 0), (1, 3, 0, 1), (3, 1, 0, 1)], [(1, 1, 0, 0)],
     [(1, 3, 1, 0), (3, 1, 1, 0)], [(1, 4, 1, 0), (4, 1, 1, 0)], [(2, 2, 0, 2)], [(3, 3, 2, 0)],
     [(4, 4, 2, 0)], [(2, 3, 1, 1), (3, 2, 1, 1)]],
    (_SHAPE_PARAMETERS, _SHAPE_PARAMETERS, 3, 3))

_QUADRATIC = np.array([b * 5 + a for b in range(3) for a in range(3)])
"""Where, among the flattened 5x5 moments (index b * 5 + a), the 3x3 of order <= 2 per axis lie."""

_PAIRS = np.array([[(bi + bj) * 5 + (ai + aj) for bj in range(3) for aj in range(3)]
                   for bi in range(3) for ai in range(3)])
"""Where, among the flattened 5x5 moments, the product of two quadratic terms falls: (9, 9)."""


def _polynomials(shape):
    """Coefficients c[n, k, 9] of dq/d(shape_k) = sum c[b * 3 + a] dy^b dx^a, shape_k over
    x0, y0, l1, l2, l3: (n, 5, 9)."""
    e1, l2, e3 = np.exp(shape[:, 2]), shape[:, 3], np.exp(shape[:, 4])
    values = np.stack([-2 * e1 * e1, -2 * e1 * l2, -2 * (l2 * l2 + e3 * e3), 2 * e1 * e1, 2 * e1 * l2,
                       2 * e1, 2 * l2, 2 * e3 * e3], 1)
    return (values @ _FIRST).reshape(len(shape), _SHAPE_PARAMETERS, 9)


def _second_derivative_sums(shape, weights):
    """sum_m c[n, k, l, m] weights[n, m] for the coefficients c of d2q/d(shape_k)d(shape_l)
    (shape_k over x0, y0, l1, l2, l3) and weights (n, 9) of the monomials dy^b dx^a at
    b * 3 + a: (n, 5, 5)."""
    e1, l2, e3 = np.exp(shape[:, 2]), shape[:, 3], np.exp(shape[:, 4])
    values = np.stack([2 * e1 * e1, 2 * e1 * l2, -4 * e1 * e1, -2 * e1 * l2, -2 * e1,
                       2 * (l2 * l2 + e3 * e3), -4 * l2, -4 * e3 * e3, 4 * e1 * e1,
                       np.full_like(e1, 2.0), 4 * e3 * e3, 2 * e1], 1)
    per_value = (weights @ _SECOND_BY_MONOMIAL).reshape(len(shape), len(_SECOND), _SHAPE_PARAMETERS ** 2)
    return np.einsum("ni,nik->nk", values, per_value).reshape(len(shape), _SHAPE_PARAMETERS, _SHAPE_PARAMETERS)


_SECOND_BY_MONOMIAL = _SECOND.reshape(len(_SECOND), _SHAPE_PARAMETERS ** 2, 9).transpose(2, 0, 1).reshape(9, -1)
"""_SECOND regrouped by monomial: (9, values x 25), so that weights (n, 9) @ it gives, per value,
the (k, l) sums."""


def _powers(d, dtype, order: int = 4) -> np.ndarray:
    """(n, L) offsets -> (n, L, order + 1) in dtype: d^0 ... d^order."""
    out = np.empty(d.shape + (order + 1,), dtype)
    out[..., 0] = 1.0
    out[..., 1] = d
    for k in range(2, order + 1):
        np.multiply(out[..., k - 1], out[..., 1], out=out[..., k])
    return out


def _moments(weights, dx, dy, order: int = 4) -> np.ndarray:
    """sum_p w_p dy^b dx^a for a, b <= order: weights (m, k, h, w), dx (m, w), dy (m, h) ->
    (m, k, (order + 1)^2) float64, index b * (order + 1) + a, summed in the weights' dtype. Rows
    first, then columns: two small matrix products per image instead of one per moment."""
    dtype = weights.dtype
    rows = np.matmul(_powers(dy, dtype, order).transpose(0, 2, 1)[:, None], weights)   # (m, k, o+1, w)
    moments = np.matmul(rows, _powers(dx, dtype, order)[:, None])                      # (m, k, o+1, o+1)
    return moments.reshape(len(weights), weights.shape[1], (order + 1) ** 2).astype(np.float64)


def _quadratic_form(dx, dy, a, b, c, factor: float, out) -> np.ndarray:
    """factor * (a dx^2 + 2 b dx dy + c dy^2) at every pixel, written into out (m, h, w): one
    rank-3 matrix product [dy^2, dy, 1] @ [c, 2 b dx, a dx^2] per image."""
    m, h, w = out.shape
    rows = np.empty((m, h, 3), out.dtype)
    rows[:, :, 0] = dy * dy
    rows[:, :, 1] = dy
    rows[:, :, 2] = 1.0
    columns = np.empty((m, 3, w), out.dtype)
    columns[:, 0, :] = (factor * c)[:, None]
    columns[:, 1, :] = (2.0 * factor * b)[:, None] * dx
    columns[:, 2, :] = (factor * a)[:, None] * dx * dx
    return np.matmul(rows, columns, out=out)


_INTEGRABLE_Q = 20.0
_INTEGRABLE_SIGMA = 1.5


def _integrable(stamps: _Stamps, shape, a, b, c) -> np.ndarray:
    """(n,) bool: where the pixel sums of h^2 = exp(-q) times polynomials of degree <= 4 equal
    their integrals over the plane to about 1e-8: h^2 below exp(-_INTEGRABLE_Q) beyond the stamp,
    and both widths at least _INTEGRABLE_SIGMA pixels, so that sampling on the pixel grid
    aliases less than exp(-pi^2 sigma^2) (Poisson's summation formula)."""
    det = a * c - b * b
    reach_x, reach_y = np.sqrt(_INTEGRABLE_Q * c / det), np.sqrt(_INTEGRABLE_Q * a / det)
    inside = ((np.abs(shape[:, 0]) + reach_x <= stamps.cx + 0.5) & (np.abs(shape[:, 1]) + reach_y <= stamps.cy + 0.5))
    return inside & (_eigen(a, b, c)[0] <= 1.0 / _INTEGRABLE_SIGMA ** 2)


def _squared_gaussian_moments(a, b, c) -> np.ndarray:
    """Integrals over the plane of exp(-q) dy^b dx^a, q = a dx^2 + 2 b dx dy + c dy^2, for
    b + a <= 4 (zero elsewhere): (n, 25) float64, index b * 5 + a. exp(-q) is exp(-q/2)^2, a
    Gaussian of covariance (2Q)^-1 and total pi / sqrt(det Q); its fourth moments by Isserlis."""
    det = a * c - b * b
    cxx, cxy, cyy = c / (2 * det), -b / (2 * det), a / (2 * det)
    moments = np.zeros((len(a), 25))
    moments[:, _SQUARED_GAUSSIAN_SLOTS] = (np.pi / np.sqrt(det))[:, None] * np.stack(
        [np.ones_like(a), cxx, cxy, cyy, 3 * cxx * cxx, 3 * cxx * cxy, cxx * cyy + 2 * cxy * cxy,
         3 * cyy * cxy, 3 * cyy * cyy], 1)
    return moments


_SQUARED_GAUSSIAN_SLOTS = np.array([b * 5 + a for b, a in ((0, 0), (0, 2), (1, 1), (2, 0), (0, 4), (1, 3), (2, 2),
                                                             (3, 1), (4, 0))])


def _exp_(x) -> np.ndarray:
    """x <- exp(x) in place. In float64 arguments are first raised to -700: numpy's float64 exp
    is ten times slower where it underflows (below -745), and exp(-700) = 1e-304 is zero to any
    image; float32's underflow costs nothing."""
    if x.dtype == np.float64:
        np.maximum(x, -700.0, out=x)
    return np.exp(x, out=x)


def _sum_squares(images) -> np.ndarray:
    """Per image the sum of squares, (m, h, w) -> (m,) float64: along rows in the images' dtype,
    then in float64 (1e-8 relative in float32, where one long sum would be 1e-7 or worse)."""
    return np.einsum("ijk,ijk->ij", images, images).sum(1, dtype=np.float64)


def _sum_products(first, second) -> np.ndarray:
    """Per image the sum over pixels of first * second: (m, h, w) -> (m,) float64. A matrix
    product per image: in float32 five times more accurate (1e-7) than einsum, and faster."""
    m = len(first)
    return np.matmul(first.reshape(m, 1, -1), second.reshape(m, -1, 1))[:, 0, 0].astype(np.float64)


def _solve_linear(shh, shy, sh, y_sum, m: int):
    """Amplitude and sky minimising sum (y - A h - s)^2 from the sums of h^2, h y, h and y.

    sh is None when no sky is fitted (sky = 0). Returns amplitude, sky: (n,) each.
    """
    if sh is None:
        return np.where(shh > 0, shy / np.maximum(shh, 1e-300), 0.0), np.zeros_like(shh)
    det = shh * m - sh * sh
    # A profile that is numerically flat cannot be told apart from the sky: fit the sky alone.
    solvable = det > 1e-12 * shh * m
    safe = np.where(solvable, det, 1.0)
    amplitude = np.where(solvable, (shy * m - sh * y_sum) / safe, 0.0)
    sky = np.where(solvable, (shh * y_sum - sh * shy) / safe, y_sum / m)
    return amplitude, sky


# ---------------------------------------------------------------------------------------------
# Compiled pixel kernels (numba). Each visits every pixel of an image once or twice and does all
# the work of a pass there: the profile's exponent and exp, the weights, their moments and the
# residual, summed in float64, image after image, so that an image's sums never depend on the
# others in the batch. Compiled on first use and cached on disk (``cache=True``).

_SUMS = {"contract", "reassoc", "nsz"}
"""Fast-math flags of the summing kernels: reassociation lets LLVM vectorise the sums (their
order then depends only on the number of pixels); no flag that assumes finite values."""

_LOG2_E = 1.4426950408889634
_LN2_HIGH = 0.6931471803691238  # ln 2 to 32 bits, so that k ln 2 is exact for |k| < 2^20
_LN2_LOW = 1.9082149292705877e-10
_ROUNDING_SHIFT = 6755399441055744.0  # 1.5 * 2^52: adding it rounds to an integer, kept in the low bits


@numba.extending.intrinsic
def _float64_bits(typingctx, value):
    """The bits of a float64 as an int64 (a free bit cast, which LLVM vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.IntType(64))
    return numba.types.int64(numba.types.float64), codegen


@numba.extending.intrinsic
def _bits_float64(typingctx, bits):
    """The float64 whose bits are the int64 bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.DoubleType())
    return numba.types.float64(numba.types.int64), codegen


@numba.njit(cache=True, fastmath={"contract"})
def _exp(x, accurate):
    """exp(x) for x <= 0, and exp(-700) = 1e-304 (zero to any image) below -700. Unlike libm's
    exp it vectorises inside a loop (5x faster here). 2^k by bit arithmetic, exp(r) of the
    remainder |r| <= ln(2) / 2 by its Taylor polynomial: of degree 12 where accurate (1 ulp,
    measured 3e-16), else of degree 8 (relative error below 3e-10, far below float32's 6e-8: for
    the float32 iterations and models). Compiled without reassociation, on which the rounding
    by _ROUNDING_SHIFT relies; the flags are per instruction, so they survive inlining."""
    x = max(x, -700.0)
    shifted = x * _LOG2_E + _ROUNDING_SHIFT
    k = shifted - _ROUNDING_SHIFT
    r = (x - k * _LN2_HIGH) - k * _LN2_LOW
    if accurate:
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
    else:
        p = 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _bits_float64((_float64_bits(shifted) + 1023) << 52)


_PAD = 32
"""Flat buffers are padded to a multiple of this many entries, and exp is computed over the
padding too (its values are never read): a vectorised loop leaves up to VF x unroll (at most 32
here) iterations to a scalar remainder, and a scalar exp costs as much as 16 vector ones."""


@numba.njit(cache=True)
def _padded(size):
    return (size + _PAD - 1) // _PAD * _PAD


@numba.njit(cache=True)
def _grid(columns, rows, height, width):
    """columns[p], rows[p] = the column and row of flat pixel p of a height x width window."""
    for i in range(height):
        for j in range(width):
            columns[i * width + j] = j
            rows[i * width + j] = i


@numba.njit(cache=True, fastmath=_SUMS)
def _gaussian_values(h, columns, rows, x0, y0, a, b, c, accurate):
    """h[p] = exp(-q / 2), q = a dx^2 + 2 b dx dy + c dy^2, dx = columns[p] - x0,
    dy = rows[p] - y0, for every p < len(h) (flat)."""
    b2 = 2.0 * b
    if accurate:
        for p in range(len(h)):
            x, v = columns[p] - x0, rows[p] - y0
            h[p] = _exp(-0.5 * ((a * x + b2 * v) * x + c * v * v), True)
    else:
        for p in range(len(h)):
            x, v = columns[p] - x0, rows[p] - y0
            h[p] = _exp(-0.5 * ((a * x + b2 * v) * x + c * v * v), False)


@numba.njit(cache=True, fastmath=_SUMS)
def _profile_sums(h, y):
    """Sums over p < len(y) of h^2, h y, h, y^2 and y (flat)."""
    hh = hy = hs = yy = ys = 0.0
    for p in range(len(y)):
        value, data = h[p], np.float64(y[p])
        hh += value * value
        hy += value * data
        hs += value
        yy += data * data
        ys += data
    return hh, hy, hs, yy, ys


@numba.njit(cache=True)
def _gaussian_profile(h, columns, rows, y, x0, y0, a, b, c, accurate):
    """h[p] = exp(-q / 2) at the pixels y[p] (columns[p], rows[p]) about (x0, y0), for
    p < len(y) and over the padding after them (h, columns, rows at least _padded(len(y)) long);
    returns the sums of h^2, h y, h, y^2 and y over the pixels."""
    count = _padded(len(y))
    _gaussian_values(h[:count], columns, rows, x0, y0, a, b, c, accurate)
    return _profile_sums(h, y)


@numba.njit(cache=True, fastmath=_SUMS)
def _quartic_moments(weight, columns, rows, x0, y0, out):
    """out[5 b + a] = sum_p weight[p] dx^a dy^b for a + b <= 4, 0 beyond (dx = columns[p] - x0,
    dy = rows[p] - y0, p < len(weight)): the moments the normal equations use (every
    dq/dtheta is of degree 2)."""
    m00 = m01 = m02 = m03 = m04 = m10 = m11 = m12 = m13 = m20 = m21 = m22 = m30 = m31 = m40 = 0.0
    for p in range(len(weight)):
        x, v = columns[p] - x0, rows[p] - y0
        t0 = weight[p]
        t1 = t0 * x
        t2 = t1 * x
        t3 = t2 * x
        m00 += t0
        m01 += t1
        m02 += t2
        m03 += t3
        m04 += t3 * x
        t0, t1, t2, t3 = t0 * v, t1 * v, t2 * v, t3 * v
        m10 += t0
        m11 += t1
        m12 += t2
        m13 += t3
        t0, t1, t2 = t0 * v, t1 * v, t2 * v
        m20 += t0
        m21 += t1
        m22 += t2
        t0, t1 = t0 * v, t1 * v
        m30 += t0
        m31 += t1
        m40 += t0 * v
    values = (m00, m01, m02, m03, m04, m10, m11, m12, m13, 0.0, m20, m21, m22, 0.0, 0.0,
              m30, m31, 0.0, 0.0, 0.0, m40, 0.0, 0.0, 0.0, 0.0)
    for i in range(25):
        out[i] = values[i]


@numba.njit(cache=True, fastmath=_SUMS)
def _residual_weights(h, y, amplitude, sky, out):
    """out[p] = r h with the residual r = y - amplitude h - sky, p < len(y); returns sum r^2."""
    total = 0.0
    for p in range(len(y)):
        residual = np.float64(y[p]) - amplitude * h[p] - sky
        out[p] = residual * h[p]
        total += residual * residual
    return total


@numba.njit(cache=True, fastmath=_SUMS)
def _squares(h, out):
    """out[p] = h[p]^2, p < len(out)."""
    for p in range(len(out)):
        out[p] = h[p] * h[p]


@numba.njit(cache=True, fastmath=_SUMS)
def _squared_residual(h, y, amplitude, sky):
    """Sum over p < len(y) of (y[p] - amplitude h[p] - sky)^2."""
    total = 0.0
    for p in range(len(y)):
        residual = np.float64(y[p]) - amplitude * h[p] - sky
        total += residual * residual
    return total


@numba.njit(cache=True)
def _linear_solution(shh, shy, sh, y_sum, pixels, fit_sky):
    """``_solve_linear`` for one image: (amplitude, sky)."""
    if not fit_sky:
        return (shy / shh if shh > 0 else 0.0), 0.0
    det = shh * pixels - sh * sh
    if det > 1e-12 * shh * pixels:
        return (shy * pixels - sh * y_sum) / det, (shh * y_sum - sh * shy) / det
    return 0.0, y_sum / pixels


@numba.njit(cache=True)
def _window_pixels(image, top, left, height, width, out):
    """The window's pixels of image (H, W), row by row, into out (flat); returns them (a view of
    image where the window is the whole image)."""
    if height == image.shape[0] and width == image.shape[1]:
        return image.reshape(height * width)
    for i in range(height):
        for j in range(width):
            out[i * width + j] = image[top + i, left + j]
    return out[:height * width]


@numba.njit(cache=True)
def _gaussian_window_pass(images, ids, top, left, heights, widths, x0, y0, a, b, c,
                          analytic_shh, image_sums, image_squares, fit_sky, derivatives, accurate,
                          amplitude, sky, cost, shh_out, moments):
    """Evaluate Gaussians h = exp(-q / 2) on windows of images and solve their linear parameters.

    images (N, H, W); per profile k: image ids[k], window corner (top, left) and size (heights,
    widths), centre (x0, y0) in pixel coordinates (x along columns) and precision (a, b, c).
    analytic_shh[k] > 0: the sum of h^2 to use (its integral over the plane), else the window's.
    image_sums, image_squares: the whole images' sums of y and y^2 (pixels outside the window
    count with h = 0). accurate: exp to 1 ulp (else to 3e-10). Writes amplitude, sky (0 unless
    fit_sky), cost (squared error over the whole image), shh_out (the sum of h^2 used) and, with
    derivatives, moments[k, w, 5 b + a] = sum w dy^b dx^a (a + b <= 4) over the window for
    w = h^2 (unless analytic), r h with the residual r = y - A h - sky, and h (with a sky).
    Profiles are best ordered by window width (the pixel grid is rebuilt when it changes).
    """
    pixels = images.shape[1] * images.shape[2]
    h, columns, rows = np.empty(_padded(pixels)), np.zeros(_padded(pixels)), np.zeros(_padded(pixels))
    window, weight = np.empty(pixels, images.dtype), np.empty(pixels)
    grid_width = -1
    for k in range(len(ids)):
        height, width = heights[k], widths[k]
        if width != grid_width:  # the grid of a shorter window of this width is a prefix of it
            _grid(columns, rows, images.shape[1], width)
            grid_width = width
        size = height * width
        y = _window_pixels(images[ids[k]], top[k], left[k], height, width, window)
        centre_x, centre_y = x0[k] - left[k], y0[k] - top[k]
        shh, shy, sh, syy, sy = _gaussian_profile(h, columns, rows, y, centre_x, centre_y, a[k], b[k], c[k],
                                                  accurate)
        if analytic_shh[k] > 0:
            shh = analytic_shh[k]
        amplitude[k], sky[k] = _linear_solution(shh, shy, sh, image_sums[k], pixels, fit_sky)
        if derivatives:
            total = _residual_weights(h, y, amplitude[k], sky[k], weight)
            _quartic_moments(weight[:size], columns, rows, centre_x, centre_y, moments[k, 1])
            if analytic_shh[k] <= 0:
                _squares(h, weight[:size])
                _quartic_moments(weight[:size], columns, rows, centre_x, centre_y, moments[k, 0])
            if fit_sky:
                _quartic_moments(h[:size], columns, rows, centre_x, centre_y, moments[k, 2])
        else:
            total = _squared_residual(h, y, amplitude[k], sky[k])
        outside = pixels - size
        if outside:
            total += image_squares[k] - syy
            if fit_sky:
                total += sky[k] * (sky[k] * outside - 2.0 * (image_sums[k] - sy))
        cost[k], shh_out[k] = total, shh


@numba.njit(cache=True)
def _gaussian_model_pass(fitted, source, ids, x0, y0, a, b, c, image_sums, fit_sky, precise,
                         out, amplitude, sky, cost):
    """The reported fits: Gaussians at every pixel of images ids (centres x0, y0 in pixel
    coordinates), linear parameters solved on fitted (the images the iterations saw; source
    where precise[k]), models A h + sky written into out[ids[k]] in float32, and cost[k] the
    squared error against source of the float32 model, or of the float64 one where precise[k]
    (whose exp is then accurate to 1 ulp, else to 3e-10)."""
    height, width = source.shape[1], source.shape[2]
    pixels = height * width
    h, columns, rows = np.empty(_padded(pixels)), np.zeros(_padded(pixels)), np.zeros(_padded(pixels))
    _grid(columns, rows, height, width)
    for k in range(len(ids)):
        if precise[k]:
            shh, shy, sh, syy, sy = _gaussian_profile(h, columns, rows, source[ids[k]].reshape(pixels),
                                                      x0[k], y0[k], a[k], b[k], c[k], True)
        else:
            shh, shy, sh, syy, sy = _gaussian_profile(h, columns, rows, fitted[ids[k]].reshape(pixels),
                                                      x0[k], y0[k], a[k], b[k], c[k], False)
        amplitude[k], sky[k] = _linear_solution(shh, shy, sh, image_sums[k], pixels, fit_sky)
        cost[k] = _write_models(h, source[ids[k]].reshape(pixels), out[ids[k]].reshape(pixels), amplitude[k],
                                sky[k], precise[k])


@numba.njit(cache=True, fastmath=_SUMS)
def _write_models(h, source, out, amplitude, sky, precise):
    """out = float32(amplitude h + sky) (flat); returns the squared error of source against it
    (against the float64 model where precise)."""
    total = 0.0
    for p in range(len(out)):
        model = amplitude * h[p] + sky
        rounded = np.float32(model)
        out[p] = rounded
        residual = np.float64(source[p]) - (model if precise else np.float64(rounded))
        total += residual * residual
    return total


@numba.njit(cache=True)
def _coarse_gaussian_sums(images, pick, gx, gy, x0, y0, a, b, c, raw, plain):
    """For profiles k of images pick[k] (n, h, w) on pixel centres gx (w,), gy (h,): raw[k, b, a]
    = sum h y gy^b gx^a (a + b <= 2, 0 beyond) and plain[k] = (sum h^2, sum h), h = exp(-q / 2)
    about (x0, y0) with precision (a, b, c), exp to 3e-10."""
    height, width = images.shape[1], images.shape[2]
    pixels = height * width
    h, columns, rows = np.empty(_padded(pixels)), np.zeros(_padded(pixels)), np.zeros(_padded(pixels))
    _grid(columns, rows, height, width)
    for p in range(pixels):
        columns[p], rows[p] = gx[int(columns[p])], gy[int(rows[p])]
    for k in range(len(pick)):
        _gaussian_values(h, columns, rows, x0[k], y0[k], a[k], b[k], c[k], False)
        r00, r01, r02, r10, r11, r20, hh, hs = _coarse_moments(h, images[pick[k]].reshape(pixels), columns, rows)
        raw[k, 0, 0], raw[k, 0, 1], raw[k, 0, 2], raw[k, 1, 0], raw[k, 1, 1], raw[k, 2, 0] = r00, r01, r02, r10, r11, r20
        raw[k, 1, 2] = raw[k, 2, 1] = raw[k, 2, 2] = 0.0
        plain[k, 0], plain[k, 1] = hh, hs


@numba.njit(cache=True, fastmath=_SUMS)
def _coarse_moments(h, y, x, v):
    """Sums over p < len(y) of h y v^b x^a for (b, a) = (0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
    (2, 0), then of h^2 and h."""
    r00 = r01 = r02 = r10 = r11 = r20 = hh = hs = 0.0
    for p in range(len(y)):
        weight = h[p] * np.float64(y[p])
        r00 += weight
        r01 += weight * x[p]
        r02 += weight * x[p] * x[p]
        r10 += weight * v[p]
        r11 += weight * v[p] * x[p]
        r20 += weight * v[p] * v[p]
        hh += h[p] * h[p]
        hs += h[p]
    return r00, r01, r02, r10, r11, r20, hh, hs


@numba.njit(cache=True, fastmath=_SUMS)
def _image_statistics(images, binning, coarse, sums, squares):
    """Per image of images (n, H, W): the means of its binning x binning blocks into coarse
    (n, H // binning, W // binning) (trailing rows and columns dropped), and the sums of y and
    of y^2 over its pixels into sums, squares (n,), in float64."""
    n, height, width = images.shape
    row = np.empty(width)
    scale = 1.0 / (binning * binning)
    for k in range(n):
        y = images[k].reshape(height * width)
        total = square = 0.0
        for p in range(height * width):
            value = np.float64(y[p])
            total += value
            square += value * value
        sums[k], squares[k] = total, square
        for i in range(coarse.shape[1]):
            row[:] = 0.0
            for r in range(binning):
                for j in range(width):
                    row[j] += images[k, i * binning + r, j]
            for j in range(coarse.shape[2]):
                block = 0.0
                for c in range(binning):
                    block += row[j * binning + c]
                coarse[k, i, j] = block * scale


@numba.njit(cache=True, fastmath=_SUMS)
def _sums_and_squares(images):
    """Per image (n, H, W) the sums of y and of y^2 over its pixels, in float64: (n,), (n,)."""
    n, pixels = images.shape[0], images.shape[1] * images.shape[2]
    sums, squares = np.empty(n), np.empty(n)
    for k in range(n):
        y = images[k].reshape(pixels)
        total = square = 0.0
        for p in range(pixels):
            value = np.float64(y[p])
            total += value
            square += value * value
        sums[k], squares[k] = total, square
    return sums, squares


# ---------------------------------------------------------------------------------------------
# The two models. ``evaluate`` returns, for n images at theta (amplitude and sky re-solved
# exactly), the squared errors and the moments from which ``system`` forms the normal equations.


@dataclass
class _Evaluation:
    """n images at theta: theta (n, P) with its linear entries solved, cost (n,) sum of squared
    residuals, signal (n,) sum of the profile's squares (amplitude included), moments (n, k, 25)
    and plain sums (n, j) for the normal equations (None when not asked for)."""

    theta: np.ndarray
    cost: np.ndarray
    signal: np.ndarray
    moments: np.ndarray | None = None
    plain: np.ndarray | None = None

    @classmethod
    def empty(cls, n: int, size: int, n_moments: int, n_plain: int, derivatives: bool) -> "_Evaluation":
        return cls(np.empty((n, size)), np.empty(n), np.empty(n),
                   np.empty((n, n_moments, 25)) if derivatives else None,
                   np.empty((n, n_plain)) if derivatives and n_plain else None)

    def take(self, index) -> "_Evaluation":
        pick = (lambda a: None if a is None else a[index])
        return _Evaluation(self.theta[index], self.cost[index], self.signal[index],
                           pick(self.moments), pick(self.plain))

    def where(self, better, other: "_Evaluation") -> "_Evaluation":
        """Per image other's entries where better (n,) is True, else this one's."""
        def pick(mine, theirs):
            return None if mine is None else np.where(better.reshape(-1, *[1] * (mine.ndim - 1)), theirs, mine)

        return _Evaluation(*(pick(getattr(self, f), getattr(other, f))
                             for f in ("theta", "cost", "signal", "moments", "plain")))


def _linear_and_cost(evaluation, rows, stamps, index, theta, h, y, sums, settings, outside):
    """Solve amplitude (and sky) for profile values h on data y from the sums (shh, shy, sh),
    store theta, signal and the squared error (window residual plus ``outside``, the pixels the
    window leaves out) into evaluation[rows]. h is overwritten with the residual."""
    shh, shy, sh = sums
    sky_sums = stamps.sums[index] if settings.fit_sky else None
    amplitude, sky = _solve_linear(shh, shy, sh, sky_sums, stamps.pixels)
    theta = theta.copy()
    theta[:, 0] = amplitude
    if settings.fit_sky:
        theta[:, 1] = sky
    residual = np.multiply(h, amplitude.astype(h.dtype)[:, None, None], out=h)
    np.subtract(y, residual, out=residual)
    if settings.fit_sky:
        residual -= sky.astype(h.dtype)[:, None, None]
    cost = _sum_products(residual, residual)
    if outside is not None:
        squares_out, sums_out, pixels_out = outside
        cost += squares_out
        if settings.fit_sky:
            cost += sky * (sky * pixels_out - 2.0 * sums_out)
    evaluation.theta[rows], evaluation.cost[rows] = theta, np.maximum(cost, 0.0)
    evaluation.signal[rows] = amplitude * amplitude * shh


class _Gaussian:
    """h = exp(-q / 2). Newton's method: the residual curvature is cheap (more moments of the
    same two weight images) and makes convergence quadratic where residuals are large."""

    start_window = _START_WINDOW_Q  # q_limit of the starts' evaluations in float32

    @staticmethod
    def evaluate(stamps: _Stamps, index, theta, settings: _Settings, dtype, derivatives: bool = True,
                 q_limit: float = _ITERATION_WINDOW_Q) -> _Evaluation:
        """Images index at theta (n, P): in float32, the float32 images over the window where
        q <= q_limit; in float64, the source images over every pixel (their squared errors are
        then exact). One compiled pass per image (``_gaussian_window_pass``), sums in float64."""
        shape = theta[:, _shape_slice(settings)]
        a, b, c = _precision(shape)
        n = len(theta)
        float32 = dtype == np.float32
        images = stamps.y32 if float32 else stamps.source
        sums, squares = (stamps.sums32, stamps.squares32) if float32 else (stamps.sums, stamps.squares)
        windows = _windows(stamps, shape[:, 0], shape[:, 1], a, b, c, q_limit if float32 else math.inf)
        analytic = np.zeros(n)
        if derivatives:
            # h^2 needs no pixel sums where they equal the integral over the plane.
            integrable = np.nonzero(_integrable(stamps, shape, a, b, c))[0]
            squared = _squared_gaussian_moments(a[integrable], b[integrable], c[integrable])
            analytic[integrable] = squared[:, 0]
        # Profiles in order of window width, so that the kernel builds each pixel grid once.
        order = np.argsort(windows[3], kind="stable")
        ids = np.asarray(index, np.int64)[order]
        amplitude, sky, cost, shh = (np.empty(n) for _ in range(4))
        moments = np.empty((n if derivatives else 0, 3, 25))
        centre = (shape[:, 0] + stamps.cx, shape[:, 1] + stamps.cy)
        _gaussian_window_pass(images, ids, *(w[order] for w in windows),
                              *_contiguous(*(v[order] for v in (*centre, a, b, c))), analytic[order], sums[ids],
                              squares[ids], settings.fit_sky, derivatives, not float32, amplitude, sky, cost, shh,
                              moments)
        restore = np.argsort(order)
        amplitude, sky, cost, shh = (v[restore] for v in (amplitude, sky, cost, shh))
        if derivatives:
            moments = moments[restore, :2 + settings.fit_sky]
            moments[integrable, 0] = squared
        theta = theta.copy()
        theta[:, 0] = amplitude
        if settings.fit_sky:
            theta[:, 1] = sky
        return _Evaluation(theta, np.maximum(cost, 0.0), amplitude * amplitude * shh,
                           moments if derivatives else None)

    @staticmethod
    def system(evaluation: _Evaluation, stamps: _Stamps, index, settings: _Settings):
        """J^T J (n, P, P), the residual curvature S (n, P, P) and J^T r (n, P), so that
        J^T J - S is the exact Hessian of the cost / 2.

        Columns of J: h (amplitude), 1 (sky), A dh/dq p_k = -A/2 h p_k (centre and shape, p_k =
        dq/dtheta_k). Sums with the residual r = y - A h - s are moments of r h (every p_k being
        of degree 2, moments of degree a + b <= 4 suffice).
        d2 model / dk dl = A (h p_k p_l / 4 - h p_kl / 2) for shape parameters, -h p_k / 2 for (A, k).
        """
        theta, moments = evaluation.theta, evaluation.moments
        n, linear, size = len(theta), _n_linear(settings), _n_parameters(settings)
        amplitude = theta[:, 0]
        squares, residual = moments[:, 0], moments[:, 1]
        first = _polynomials(theta[:, _shape_slice(settings)])
        column = first * (-0.5 * amplitude)[:, None, None]
        normal, gradient = np.zeros((n, size, size)), np.empty((n, size))
        normal[:, linear:, linear:] = column @ squares[:, _PAIRS] @ column.transpose(0, 2, 1)
        normal[:, 0, linear:] = normal[:, linear:, 0] = (column @ squares[:, _QUADRATIC, None])[..., 0]
        normal[:, 0, 0] = squares[:, 0]
        gradient[:, 0] = residual[:, 0]
        gradient[:, linear:] = (column @ residual[:, _QUADRATIC, None])[..., 0]
        if settings.fit_sky:
            profile = moments[:, 2]
            normal[:, 1, linear:] = normal[:, linear:, 1] = (column @ profile[:, _QUADRATIC, None])[..., 0]
            normal[:, 0, 1] = normal[:, 1, 0] = profile[:, 0]
            normal[:, 1, 1] = stamps.pixels
            gradient[:, 1] = stamps.sums[index] - amplitude * profile[:, 0] - theta[:, 1] * stamps.pixels
        quadratic = residual[:, _QUADRATIC]
        pairs = first @ residual[:, _PAIRS] @ first.transpose(0, 2, 1)
        hessians = _second_derivative_sums(theta[:, _shape_slice(settings)], quadratic)
        curvature = np.zeros((n, size, size))
        curvature[:, linear:, linear:] = amplitude[:, None, None] * (0.25 * pairs - 0.5 * hessians)
        curvature[:, 0, linear:] = curvature[:, linear:, 0] = -0.5 * (first @ quadratic[..., None])[..., 0]
        return normal, curvature, gradient

    @staticmethod
    def profile(dx, dy, a, b, c, extra, out) -> np.ndarray:
        """h at offsets dx (m, w), dy (m, h), written into out (m, h, w)."""
        return _exp_(_quadratic_form(dx, dy, a, b, c, -0.5, out))


class _Sersic:
    """h = exp(-b_n (z^(1/n) - 1)), z^2 = q, with extra parameter log n. Gauss-Newton."""

    start_window = None  # evaluated over every pixel
    # dh/dq has a cusp at the centre for n > 1/2; derivatives (not values) are taken no closer
    # than this, so that a pixel falling on the centre cannot swamp the normal equations.
    _log_q_floor = math.log(1e-8)

    @staticmethod
    def profile(dx, dy, a, b, c, extra, out, parts: bool = False):
        """h at offsets dx (m, w), dy (m, h) written into out (m, h, w); with parts, also
        log q and w = z^(1/n) (each (m, h, w)) and n, b_n, db_n/dn (each (m, 1, 1))."""
        n = np.exp(extra[:, 0])
        b_n, db_dn = _sersic_b(n)
        n, b_n, db_dn = (v[:, None, None] for v in (n, b_n, db_dn))
        dtype = out.dtype
        log_q = np.log(np.maximum(_quadratic_form(dx, dy, a, b, c, 1.0, out), 0.0, out=out), out=out)
        w = _exp_(np.multiply(log_q, (0.5 / n).astype(dtype)))       # z^(1/n); 0 on the centre
        if parts:
            log_q = log_q.copy()
        h = np.multiply(w, (-b_n).astype(dtype), out=out)
        h += b_n.astype(dtype)
        h = _exp_(h)
        return (h, log_q, w, n, b_n, db_dn) if parts else h

    @classmethod
    def evaluate(cls, stamps: _Stamps, index, theta, settings: _Settings, dtype,
                 derivatives: bool = True) -> _Evaluation:
        """Images index at theta (n, P), every pixel, in dtype. Plain sums (n, 7): h^2, h y, h,
        E h, E, E y, E^2 with E = A dh/dlog n."""
        shape, extra = theta[:, _shape_slice(settings)], theta[:, _shape_slice(settings).stop:]
        a, b, c = _precision(shape)
        evaluation = _Evaluation.empty(len(theta), theta.shape[1], 4 + settings.fit_sky, 7, derivatives)
        for block in _blocks(np.arange(len(theta)), stamps.pixels):
            rows = np.arange(len(theta))[block]
            ids = index[rows]
            y = stamps.images(ids, dtype)
            dx = (np.arange(stamps.width) - stamps.cx - shape[rows, 0, None]).astype(dtype)
            dy = (np.arange(stamps.height) - stamps.cy - shape[rows, 1, None]).astype(dtype)
            h, log_q, w, n, b_n, db_dn = cls.profile(dx, dy, a[rows], b[rows], c[rows], extra[rows],
                                                      np.empty(y.shape, dtype), parts=True)
            sums = (_sum_products(h, h), _sum_products(h, y),
                    h.reshape(len(h), -1).sum(1, dtype=np.float64) if settings.fit_sky else None)
            if derivatives:
                amplitude = _solve_linear(*sums, stamps.sums[ids] if settings.fit_sky else None, stamps.pixels)[0]
                extra_sums = cls._moments_and_sums(evaluation, rows, h, y, log_q, w, n, b_n, db_dn, amplitude,
                                                   dx, dy, settings)
                evaluation.plain[rows] = np.stack(
                    [sums[0], sums[1], sums[2] if settings.fit_sky else np.zeros(len(rows)), *extra_sums], 1)
            _linear_and_cost(evaluation, rows, stamps, ids, theta[rows], h, y, sums, settings, None)
        return evaluation

    @classmethod
    def _moments_and_sums(cls, evaluation, rows, h, y, log_q, w, n, b_n, db_dn, amplitude, dx, dy, settings):
        """Moments of base^2, base y, base h, base E, (base) into evaluation.moments[rows], with
        base = dh/dq and E = A dh/dlog n; returns the sums of E h, E, E y, E^2, each (m,)."""
        dtype = h.dtype
        np.maximum(log_q, cls._log_q_floor, out=log_q)
        exponent = 0.5 / n
        base = _exp_(np.multiply(log_q, (exponent - 1.0).astype(dtype)))
        base *= h
        base *= (-b_n * exponent).astype(dtype)
        # E = A n dh/dn = A h (b_n w log(q) / 2n - n b_n' (w - 1))
        extra = np.multiply(log_q, (b_n * exponent).astype(dtype), out=log_q)
        extra -= (n * db_dn).astype(dtype)
        extra *= w
        extra += (n * db_dn).astype(dtype)
        extra *= h
        extra *= amplitude.astype(dtype)[:, None, None]
        weights = np.empty((len(h), 4 + settings.fit_sky) + h.shape[1:], dtype)
        np.multiply(base, base, out=weights[:, 0])
        np.multiply(base, y, out=weights[:, 1])
        np.multiply(base, h, out=weights[:, 2])
        np.multiply(base, extra, out=weights[:, 3])
        if settings.fit_sky:
            weights[:, 4] = base
        evaluation.moments[rows] = _moments(weights, dx, dy)
        return (_sum_products(extra, h), extra.reshape(len(h), -1).sum(1, dtype=np.float64),
                _sum_products(extra, y), _sum_products(extra, extra))

    @staticmethod
    def system(evaluation: _Evaluation, stamps: _Stamps, index, settings: _Settings):
        """Gauss-Newton's J^T J (n, P, P), no curvature (None), and J^T r (n, P).

        Columns of J: h (amplitude), 1 (sky), A dh/dq p_k (centre and shape), E = A dh/dlog n.
        Shape sums are moments of base = dh/dq times itself, y, h, E or 1; sums with the
        residual r = y - A h - s are expanded into sums with y, h and 1.
        """
        theta, moments = evaluation.theta, evaluation.moments
        n, size = len(theta), _n_parameters(settings)
        amplitude = theta[:, 0]
        sky = theta[:, 1] if settings.fit_sky else np.zeros(n)
        shh, shy, sh, seh, se, sey, see = evaluation.plain.T
        # Per plain column X (h, 1 for the sky, E): its sums with h, with 1 and with y.
        rows = [(shh, sh, shy)] + ([(sh, np.full(n, float(stamps.pixels)), stamps.sums[index])]
                                   if settings.fit_sky else []) + [(seh, se, sey)]
        plain = np.array(list(range(_n_linear(settings))) + [size - 1])
        shape = np.arange(_SHAPE_PARAMETERS) + _n_linear(settings)
        normal, gradient = np.zeros((n, size, size)), np.empty((n, size))
        for i, (with_h, with_one, with_data) in enumerate(rows):
            normal[:, plain[i], 0] = normal[:, 0, plain[i]] = with_h
            if settings.fit_sky:
                normal[:, plain[i], 1] = normal[:, 1, plain[i]] = with_one
            gradient[:, plain[i]] = with_data - amplitude * with_h - sky * with_one
        normal[:, -1, -1] = see
        column = _polynomials(theta[:, _shape_slice(settings)]) * amplitude[:, None, None]
        squares, data, profile, extra = moments[:, 0], moments[:, 1], moments[:, 2], moments[:, 3]
        base_residual = data - amplitude[:, None] * profile
        plain_columns = [profile[:, _QUADRATIC]]
        if settings.fit_sky:
            base_residual -= sky[:, None] * moments[:, 4]
            plain_columns.append(moments[:, 4, _QUADRATIC])
        plain_columns.append(extra[:, _QUADRATIC])
        normal[:, shape[:, None], shape[None, :]] = column @ squares[:, _PAIRS] @ column.transpose(0, 2, 1)
        shape_plain = column @ np.stack(plain_columns, 2)                                  # (n, 5, plain)
        normal[:, shape[:, None], plain[None, :]] = shape_plain
        normal[:, plain[:, None], shape[None, :]] = shape_plain.transpose(0, 2, 1)
        gradient[:, shape] = (column @ base_residual[:, _QUADRATIC, None])[..., 0]
        return normal, None, gradient


def _sersic_b(n) -> tuple[np.ndarray, np.ndarray]:
    """b_n = gammaincinv(2n, 1/2), as astropy computes it, and db_n/dn by a central difference."""
    step = 1e-6 * n
    b = scipy.special.gammaincinv(2.0 * n, 0.5)
    slope = (scipy.special.gammaincinv(2.0 * (n + step), 0.5)
             - scipy.special.gammaincinv(2.0 * (n - step), 0.5)) / (2.0 * step)
    return b, slope


def sersic_total_flux(amplitude, r_eff, n, ellip):
    """Total flux of astropy's Sersic2D over the plane, in image units x pixels.

    ``2 pi n e^b_n b_n^(-2n) Gamma(2n) r_eff^2 (1 - ellip) amplitude``; arguments broadcast.
    """
    amplitude, r_eff, n, ellip = (np.asarray(v, np.float64) for v in (amplitude, r_eff, n, ellip))
    b = scipy.special.gammaincinv(2.0 * n, 0.5)
    log_scale = b - 2.0 * n * np.log(b) + scipy.special.gammaln(2.0 * n)
    return 2.0 * np.pi * n * np.exp(log_scale) * r_eff ** 2 * (1.0 - ellip) * amplitude


def _final_fits(model, stamps: _Stamps, run: _Run, settings: _Settings, out: np.ndarray):
    """The reported fits of a run: ``_final_pass`` at its parameters, the pending last steps
    taken where they did not raise the squared error (beyond float32's rounding), else undone.
    Returns theta and the squared errors (n,)."""
    theta, cost = _final_pass(model, stamps, np.where(run.pending[:, None], run.proposal, run.theta), settings,
                              out, run.precise)
    noise = np.where(run.precise, 1e-12 * run.cost,
                     _FLOAT32_COST_NOISE * (run.cost + np.sqrt(run.cost * run.signal)))
    undone = np.nonzero(run.pending & ~(cost <= run.cost + noise))[0]
    if len(undone):
        # The step left the quadratic model's reach: iterate those images on from before it.
        again = _levenberg_marquardt(model, stamps, [run.theta[undone]], settings, undone,
                                     np.float64 if run.precise.all() else np.float32, propose=False)
        run.converged[undone], run.iterations[undone] = again.converged, run.iterations[undone] + again.iterations
        theta[undone], cost[undone] = _final_pass(model, stamps, again.theta, settings, out,
                                                  run.precise[undone], undone)
    return theta, cost


def _final_pass(model, stamps: _Stamps, theta, settings: _Settings, out: np.ndarray, precise, index=None):
    """The reported fits: every image evaluated at theta (n, P), amplitude and sky re-solved,
    the models written into out (n, H, W) float32. Returns theta and the squared errors (n,),
    summed in float64.

    Gaussians are evaluated in float64 (``_gaussian_model_pass``); their amplitude and sky are
    solved on the images the iterations saw (the float32 copy, or the source where precise (n,)
    bool is set: the fits finished in float64), and the squared errors reported are those of the
    float32 models returned (of the float64 models where precise: exact fits reach 1e-30).
    Sersic profiles are evaluated in float64 throughout.
    """
    index = np.arange(len(theta)) if index is None else np.asarray(index, np.int64)
    theta, cost = theta.copy(), np.empty(len(theta))
    if model is _Gaussian:
        precise = np.ascontiguousarray(np.broadcast_to(precise, len(theta)), bool)
        shape = theta[:, _shape_slice(settings)]
        amplitude, sky = np.empty(len(theta)), np.empty(len(theta))
        _gaussian_model_pass(stamps.y32, stamps.source, index,
                             *_contiguous(shape[:, 0] + stamps.cx, shape[:, 1] + stamps.cy, *_precision(shape)),
                             np.where(precise, stamps.sums[index], stamps.sums32[index]), settings.fit_sky,
                             precise, out, amplitude, sky, cost)
        theta[:, 0] = amplitude
        if settings.fit_sky:
            theta[:, 1] = sky
    else:
        for block in _blocks(np.arange(len(theta)), stamps.pixels):
            rows = np.arange(len(theta))[block]
            theta[rows], cost[rows] = _final_block(model, stamps, theta[rows], index[rows], settings, out)
    _keep_flat_where_better(stamps, index, theta, cost, settings, out)
    return theta, cost


def _contiguous(*arrays) -> list[np.ndarray]:
    """Each array as a C-contiguous float64 array (the kernels' argument type)."""
    return [np.ascontiguousarray(v, np.float64) for v in arrays]


def _final_block(model, stamps: _Stamps, theta, rows, settings: _Settings, out):
    """_final_pass of a Sersic profile for images rows, in float64: (theta, cost) of those images."""
    shape, extra = theta[:, _shape_slice(settings)], theta[:, _shape_slice(settings).stop:]
    y = stamps.images(rows, np.float64)
    dx = np.arange(stamps.width) - stamps.cx - shape[:, 0, None]
    dy = np.arange(stamps.height) - stamps.cy - shape[:, 1, None]
    h = model.profile(dx, dy, *_precision(shape), extra, np.empty(y.shape))
    amplitude, sky = _solve_linear(_sum_products(h, h), _sum_products(h, y),
                                   h.reshape(len(h), -1).sum(1, dtype=np.float64) if settings.fit_sky else None,
                                   stamps.sums[rows] if settings.fit_sky else None, stamps.pixels)
    theta = theta.copy()
    theta[:, 0] = amplitude
    if settings.fit_sky:
        theta[:, 1] = sky
    h *= amplitude[:, None, None]
    if settings.fit_sky:
        h += sky[:, None, None]
    out[rows] = h
    return theta, _sum_squares(y - h)


def _keep_flat_where_better(stamps: _Stamps, index, theta, cost, settings: _Settings, out):
    """Where the profile does not beat the best flat model (zero, or the mean with a sky term),
    which it can only tie up to rounding, put the flat model in its place (in place); theta and
    cost are those of images index."""
    sums = stamps.sums[index] if settings.fit_sky else 0.0
    flat = stamps.squares[index] - (sums ** 2 / stamps.pixels if settings.fit_sky else 0.0)
    worse = np.nonzero(cost > flat)[0]
    if len(worse):
        level = sums[worse] / stamps.pixels if settings.fit_sky else np.zeros(len(worse))
        theta[worse, 0] = 0.0
        if settings.fit_sky:
            theta[worse, 1] = level
        out[index[worse]] = level[:, None, None]
        cost[worse] = np.maximum(flat[worse], 0.0)


# ---------------------------------------------------------------------------------------------
# Batched Levenberg-Marquardt


@dataclass
class _Run:
    """Solver output for n images: theta (n, P), cost (n,), converged (n,) (met the tolerance),
    limited (n,) (stopped at float32's resolution short of it), iterations (n,), precise (n,)
    (finished in float64), signal (n,) (sum of the model's squares), pending (n,) and proposal
    (n, P): a last Newton step from theta, still to be checked (``_final_fits``)."""

    theta: np.ndarray
    cost: np.ndarray
    converged: np.ndarray
    limited: np.ndarray
    iterations: np.ndarray
    precise: np.ndarray
    signal: np.ndarray
    pending: np.ndarray
    proposal: np.ndarray

    def better_of(self, other: "_Run") -> "_Run":
        """Per image, whichever of the two runs has the lower cost."""
        better = other.cost < self.cost
        fields = ("theta", "cost", "converged", "limited", "iterations", "precise", "signal", "pending",
                  "proposal")
        return _Run(*(np.where(better.reshape(-1, *[1] * (getattr(self, f).ndim - 1)), getattr(other, f),
                               getattr(self, f)) for f in fields))


def _cholesky(matrix):
    """Lower Cholesky factors of a batch (n, P, P) of symmetric matrices, and (n,) bool: where
    the matrix is positive definite (elsewhere the factor is not usable)."""
    n, size, _ = matrix.shape
    factor = np.zeros_like(matrix)
    definite = np.ones(n, bool)
    for j in range(size):
        row = factor[:, j, :j]
        pivot = matrix[:, j, j] - (row * row).sum(1)
        positive = pivot > 0
        definite &= positive
        root = np.sqrt(np.where(positive, pivot, 1.0))
        factor[:, j, j] = root
        if j + 1 < size:
            factor[:, j + 1:, j] = (matrix[:, j + 1:, j] - (factor[:, j + 1:, :j] @ row[:, :, None])[..., 0]) / root[:, None]
    return factor, definite


def _cholesky_solve(factor, vector):
    """x with L L^T x = vector, batched: factor (n, P, P), vector (n, P) -> (n, P)."""
    size = vector.shape[1]
    forward = np.empty_like(vector)
    for j in range(size):
        forward[:, j] = (vector[:, j] - (factor[:, j, :j] * forward[:, :j]).sum(1)) / factor[:, j, j]
    solution = np.empty_like(vector)
    for j in range(size - 1, -1, -1):
        solution[:, j] = (forward[:, j] - (factor[:, j + 1:, j] * solution[:, j + 1:]).sum(1)) / factor[:, j, j]
    return solution


def _plus_diagonal(matrix, diagonal):
    """matrix (n, P, P) + diag(diagonal (n, P)), a new array."""
    out = matrix.copy()
    size = matrix.shape[1]
    out[:, np.arange(size), np.arange(size)] += diagonal
    return out


def _damped_step(normal, curvature, gradient, damping, frozen):
    """Solve (H + lambda D) step = J^T r for every image; D is the floored diagonal of J^T J.

    H is the exact Hessian J^T J - S where curvature S is given and H is positive definite,
    else Gauss-Newton's J^T J. damping: (n,) lambda; frozen entries get a zero step.
    Returns (step (n, P), the H used (n, P, P), solved (n,) bool, exact (n,) bool: H is the
    exact Hessian); where no system can be solved the step is zero and solved is False.
    """
    keep = (~frozen).astype(normal.dtype)
    mask = keep[:, :, None] * keep[:, None, :]
    normal, gradient = normal * mask, gradient * keep
    size = normal.shape[1]
    diagonal = normal[:, np.arange(size), np.arange(size)]
    # Floored so that a parameter without leverage (the shape of a zero-amplitude profile)
    # still gets a finite, small step instead of a singular system.
    scale = np.maximum(diagonal, 1e-12 * diagonal.max(1, keepdims=True) + 1e-300)
    regulariser = damping[:, None] * np.where(frozen, 1.0, scale)
    hessian, exact = normal, np.zeros(len(normal), bool)
    if curvature is not None:
        # Newton only where the exact Hessian is itself positive definite (near a minimum);
        # elsewhere its damped steps head for saddles, and Gauss-Newton's are safer.
        newton = normal - curvature * mask
        exact = _positive_definite(_plus_diagonal(newton, 1e-10 * scale))
        hessian = np.where(exact[:, None, None], newton, normal)
    step, solved = _solve_positive_definite(_plus_diagonal(hessian, regulariser), gradient)
    return np.where(solved[:, None], step, 0.0), hessian, solved, exact


def _positive_definite(matrix) -> np.ndarray:
    """(n,) bool: which matrices of the batch (n, P, P) are positive definite. LAPACK's batched
    Cholesky when all are (the usual case), else the vectorised factorisation's verdicts."""
    try:
        np.linalg.cholesky(matrix)
        return np.ones(len(matrix), bool)
    except np.linalg.LinAlgError:
        return _cholesky(matrix)[1]


def _solve_positive_definite(matrix, vector):
    """(x (n, P), solved (n,) bool) with matrix x = vector for a batch of (nearly always)
    positive definite matrices; where one is not, or the solution is not finite, solved is False."""
    try:
        solution = np.linalg.solve(matrix, vector[..., None])[..., 0]
        solved = np.isfinite(solution).all(1)
    except np.linalg.LinAlgError:
        factor, solved = _cholesky(matrix)
        solution = _cholesky_solve(factor, vector)
        solved &= np.isfinite(solution).all(1)
    return solution, solved


_MAX_LOG_WIDTH_STEP = 1.0
"""A step changes the diagonal Cholesky entries of the precision (the log inverse widths) by at
most this much (a factor e in width): a sub-pixel profile's first Gauss-Newton step can
otherwise leap across the basins of its several local minima."""


def _limit_width_change(step, settings: _Settings):
    """step (n, P) scaled down per image where it would change a log inverse width by more
    than _MAX_LOG_WIDTH_STEP."""
    start = _shape_slice(settings).start
    largest = np.abs(step[:, [start + 2, start + 4]]).max(1)
    return step * np.minimum(1.0, _MAX_LOG_WIDTH_STEP / np.maximum(largest, 1e-300))[:, None]


def _predicted_reduction(step, hessian, gradient):
    """Decrease of the sum of squares that the quadratic model predicts for step: (n,)."""
    return 2 * (step * gradient).sum(1) - (step[:, None, :] @ hessian @ step[:, :, None])[:, 0, 0]


def _nielsen_update(damping, growth, accept, gain_ratio):
    """New (damping, growth), each (n,): after a success the damping shrinks by up to 3 as far as
    the actual gain matched the predicted one (gain_ratio); after a failure it grows by growth,
    which doubles with every failure in a row."""
    shrink = np.maximum(1 - (2 * gain_ratio - 1) ** 3, 1 / 3)
    return (np.where(accept, np.maximum(damping * shrink, 1e-12), damping * growth),
            np.where(accept, 2.0, growth * 2))


def _best_start(model, stamps, starts: list, settings, index, dtype, q_limit: float | None = None) -> _Evaluation:
    """The evaluation, with derivatives, of the lowest-cost start per image; starts after the
    first may leave images out (rows of NaN). q_limit: the Gaussian's window (None: the default)."""
    window = {} if q_limit is None else {"q_limit": q_limit}
    best = model.evaluate(stamps, index, _project(starts[0], settings, stamps), settings, dtype, **window)
    for start in starts[1:]:
        given = np.nonzero(np.isfinite(start).all(1))[0]
        if len(given):
            evaluation = model.evaluate(stamps, index[given], _project(start[given], settings, stamps), settings, dtype,
                                        **window)
            better = evaluation.cost < best.cost[given]
            best_given = best.take(given).where(better, evaluation)
            for field_name in ("theta", "cost", "signal", "moments", "plain"):
                if getattr(best, field_name) is not None:
                    getattr(best, field_name)[given] = getattr(best_given, field_name)
    return best


def _levenberg_marquardt(model, stamps: _Stamps, starts: list, settings: _Settings, index,
                         dtype, propose: bool = True, start_window: float | None = None) -> _Run:
    """Minimise the sum of squared residuals of images index, from the best of starts (each (n, P)).

    Each iteration solves the damped normal equations of all running images at once and
    evaluates the candidates; a lower cost is accepted. The damping follows Nielsen's rule:
    it shrinks as far as the quadratic model predicted the gain well, and grows 2, 4, 8...
    fold on successive failures. An image has converged when the (barely damped) step promises
    less than ``settings.tolerance`` of its cost, when a step changed its cost by less than
    that and promised no more (MINPACK's test), when no damping finds a lower cost, or when
    its residual vanishes. Converged images drop out of later iterations.

    In float32, squared errors carry a rounding error of about _FLOAT32_COST_NOISE: a step that
    the quadratic model says is tiny is accepted unless its cost rose by more than that, and an
    image whose step is below float32's resolution stops as ``limited``.

    start_window: the starts are evaluated over the window q <= start_window (Gaussian, float32;
    None: as every iteration); no image then stops at its start, whose system is approximate.
    """
    evaluation = _best_start(model, stamps, starts, settings, index, dtype, start_window)
    # Where an image still sits at its start, its cost and system are approximate.
    exact_point = np.full(len(index), start_window is None)
    theta, cost, signal = evaluation.theta, evaluation.cost, evaluation.signal
    normal, curvature, gradient = model.system(evaluation, stamps, index, settings)
    n, tolerance, float32 = len(theta), settings.tolerance, dtype == np.float32
    damping, growth = np.full(n, 1e-3), np.full(n, 2.0)
    iterations = np.zeros(n, np.int64)
    limited, pending, proposal = np.zeros(n, bool), np.zeros(n, bool), theta.copy()
    # In float32 the squared error of a window carries the rounding of the whole image's sum of
    # squares: only an all-zero image is known to be fitted exactly from the start.
    converged = (cost <= 1e-28 * stamps.squares[index]) if not float32 else (stamps.squares[index] == 0)
    running = np.nonzero(~converged)[0]
    for _ in range(settings.max_iterations):
        if len(running) == 0:
            break
        trusted = exact_point[running]
        old_cost = cost[running]
        frozen = _frozen(theta[running], gradient[running], settings, stamps)
        step, hessian, solved, exact_hessian = _damped_step(
            normal[running], None if curvature is None else curvature[running], gradient[running],
            damping[running], frozen)
        step = _limit_width_change(step, settings)
        predicted = _predicted_reduction(step, hessian, gradient[running])
        newtonian = solved & (damping[running] <= 1e-2)
        # float32 cannot tell a cost far below the signal's power from its own rounding.
        resolved = (old_cost >= _FLOAT32_RESOLVED * signal[running]) if float32 else solved
        settled = newtonian & resolved & (predicted <= tolerance * old_cost) & trusted
        floor = newtonian & ~settled & (predicted <= np.maximum(_FLOAT32_FLOOR * signal[running],
                                                                tolerance * old_cost))
        floor &= float32 & trusted
        converged[running[settled]] = True
        limited[running[floor]] = True
        keep = ~(settled | floor)
        running, step, predicted, solved, old_cost, newtonian, resolved, exact_hessian, trusted = (
            v[keep] for v in (running, step, predicted, solved, old_cost, newtonian, resolved, exact_hessian,
                              trusted))
        if len(running) == 0:
            break
        # A Newton step (exact Hessian) this small lands within tolerance of the minimum, the
        # error squaring: it is proposed, and checked by the final pass (``_final_fits``).
        last = newtonian & resolved & exact_hessian & (predicted <= _LAST_STEP * old_cost) & propose & trusted
        proposal[running[last]] = _project(theta[running[last]] + step[last], settings, stamps)
        pending[running[last]] = converged[running[last]] = True
        iterations[running[last]] += 1
        running, step, predicted, solved, old_cost, trusted = (
            v[~last] for v in (running, step, predicted, solved, old_cost, trusted))
        if len(running) == 0:
            break
        trial = model.evaluate(stamps, index[running], _project(theta[running] + step, settings, stamps),
                               settings, dtype)
        noise = 0.0
        if float32:
            noise = _FLOAT32_COST_NOISE * (old_cost + np.sqrt(old_cost * signal[running]))
            noise = np.where(predicted <= 1e-4 * old_cost, noise, 0.0)
        accept = solved & np.isfinite(trial.cost) & (trial.cost < old_cost + noise)
        negligible = solved & (np.abs(old_cost - trial.cost) <= np.maximum(tolerance * old_cost, noise)) \
            & (predicted <= tolerance * old_cost) & trusted
        damping[running], growth[running] = _nielsen_update(
            damping[running], growth[running], accept, (old_cost - trial.cost) / np.maximum(predicted, 1e-300))
        iterations[running] += 1
        exact = accept & (trial.cost <= 1e-28 * stamps.squares[index[running]]) & (not float32)
        finished = negligible | (damping[running] > 1e12) | exact
        taken = running[accept]
        exact_point[taken] = True
        theta[taken], cost[taken], signal[taken] = trial.theta[accept], trial.cost[accept], trial.signal[accept]
        # The normal equations are only needed where the solver goes on from the new point.
        going_on = accept & ~finished
        if going_on.any():
            new = model.system(trial.take(going_on), stamps, index[running[going_on]], settings)
            normal[running[going_on]], gradient[running[going_on]] = new[0], new[2]
            if curvature is not None:
                curvature[running[going_on]] = new[1]
        stalled = finished & ~negligible & ~exact
        if float32:
            limited[running[stalled]] = True
        converged[running[finished & ~(stalled & float32)]] = True
        running = running[~finished]
    return _Run(theta, cost, converged, limited, iterations, np.full(n, dtype == np.float64), signal,
                pending, proposal)


def _solve(model, stamps: _Stamps, starts: list, settings: _Settings) -> _Run:
    """Float32 iterations from the best of starts, finished in float64 where float32 could not
    resolve the last steps (noiseless or nearly noiseless images)."""
    index = np.arange(len(stamps.y32))
    run = _levenberg_marquardt(model, stamps, starts, settings, index, np.float32, start_window=model.start_window)
    limited = np.nonzero(run.limited)[0]
    if len(limited):
        polish = _levenberg_marquardt(model, stamps, [run.theta[limited]], settings, limited, np.float64)
        for name in ("theta", "cost", "converged", "signal", "pending", "proposal"):
            getattr(run, name)[limited] = getattr(polish, name)
        run.iterations[limited] += polish.iterations
        run.precise[limited] = True
    return run


# ---------------------------------------------------------------------------------------------
# Starting points


def _median(rows) -> np.ndarray:
    """Median of each row of (n, m): a full np.sort (vectorised), ten times faster here than
    np.partition with the two middle ranks, itself ten times faster than np.median."""
    m = rows.shape[1]
    ordered = np.sort(rows, axis=1)
    return 0.5 * (ordered[:, (m - 1) // 2] + ordered[:, m // 2])


def _border(y) -> np.ndarray:
    """(n, k) pixels of each image's outer frame, a tenth of the side wide (at least 1 pixel)."""
    width = max(1, min(y.shape[1:]) // 10)
    mask = np.ones(y.shape[1:], bool)
    mask[width:-width, width:-width] = False
    return y[:, mask]


def _second_moments(weight, gx, gy, x0, y0):
    """(total, mean x, mean y, cxx, cxy, cyy), each (n,), of weights (n, h, w) on pixel centres
    gx (w,), gy (h,), the means relative to (x0, y0); where the total is not positive the means
    are zero and the covariance meaningless. Rows first, in the weights' dtype (one small matrix
    product per image, whose rounding therefore does not depend on the other images of the batch),
    then columns in float64."""
    rows = np.matmul(weight, _grid_powers(gx.astype(weight.dtype).tobytes(), weight.dtype.str))  # (n, h, 3)
    raw = _grid_powers(gy.tobytes(), "<f8").T @ rows.astype(np.float64)                         # (n, 3, 3)
    return _moments_from_raw(raw, x0, y0)


def _moments_from_raw(raw, x0, y0):
    """_second_moments' result from raw (n, 3, 3), the sums of w y^b x^a at [:, b, a]."""
    total = raw[:, 0, 0]
    safe = np.where(total > 0, total, 1.0)
    ex, ey = raw[:, 0, 1] / safe, raw[:, 1, 0] / safe
    mx, my = np.where(total > 0, ex - x0, 0.0), np.where(total > 0, ey - y0, 0.0)
    return (total, mx, my, raw[:, 0, 2] / safe - ex * ex, raw[:, 1, 1] / safe - ex * ey,
            raw[:, 2, 0] / safe - ey * ey)


@functools.lru_cache(maxsize=8)
def _grid_powers(g_bytes: bytes, dtype: str) -> np.ndarray:
    """(len, 3) powers 1, g, g^2 of the pixel centres g, in dtype."""
    g = np.frombuffer(g_bytes, dtype)
    return np.stack([np.ones_like(g), g, g * g], 1)


def _thresholded_moments(image, gx, gy):
    """Centre and covariance (x0, y0, sxx, sxy, syy), each (n,), of the pixels more than three
    robust standard deviations (1.4826 x the median absolute value of the frame) above zero,
    weighted by their values: the moment guess an astronomer would write, which sees a galaxy as
    a whole where adaptive moments may lock onto a brighter compact neighbour."""
    # The frame's median is about zero: the images are sky-subtracted, or their sky was taken off.
    noise = 1.4826 * _median(np.abs(_border(image)))
    weight = np.where(image > 3 * noise[:, None, None], image, 0.0)
    empty = weight.reshape(len(image), -1).sum(1) <= 0
    weight[empty] = np.maximum(image[empty], 0.0)
    zero = np.zeros(len(image))
    return _second_moments(weight, gx, gy, zero, zero)[1:]


@functools.lru_cache(maxsize=4)
def _box_counts(height: int, width: int) -> np.ndarray:
    """Pixels inside the image in each pixel's 3 x 3 neighbourhood: (height, width)."""
    def along(size):
        count = np.full(size, 3.0)
        count[[0, -1]] = 2.0
        return count if size > 1 else np.ones(1)
    return along(height)[:, None] * along(width)[None, :]


def _box_smoothed(image):
    """3 x 3 running mean of (n, h, w) images, over the pixels inside the image only."""
    n, height, width = image.shape
    padded = np.zeros((n, height + 2, width + 2), image.dtype)
    padded[:, 1:-1, 1:-1] = image
    rows = padded[:, :-2] + padded[:, 1:-1]
    rows += padded[:, 2:]
    total = rows[:, :, :-2] + rows[:, :, 1:-1]
    total += rows[:, :, 2:]
    return total / _box_counts(height, width)


def _brightest_point(image, gx, gy):
    """(x0, y0), each (n,): the brightest pixel of the 3x3-smoothed images (n, h, w) on pixel
    centres gx (w,), gy (h,); the middle where nothing is above zero."""
    smoothed = _box_smoothed(image).reshape(len(image), -1)
    peak = smoothed.argmax(1)
    brightest = smoothed[np.arange(len(image)), peak]
    width = image.shape[2]
    return (np.where(brightest > 0, gx[peak % width], 0.0), np.where(brightest > 0, gy[peak // width], 0.0))


def _adaptive_moments(images, pick, gx, gy, binning: int, x0, y0, sxx, sxy, syy, iterations: int = 4):
    """Centre (x0, y0) and covariance (sxx, sxy, syy), each (m,), from Gaussian-weighted moments
    of images pick (m,) of images (n, h, w) on pixel centres gx (w,), gy (h,).

    The weight starts at the given centre and covariance and is iterated towards its fixed
    point, weight covariance = 2 x weighted covariance, which for a Gaussian profile is its own
    covariance; the window keeps distant noise out of the moments. (The solver refines the
    result: a few iterations suffice.)
    """
    low, high = 0.25, float(max(-gx[0], -gy[0], 1.0)) ** 2
    sxx, sxy, syy = _clip_eigenvalues(sxx, sxy, syy, low, high)
    for _ in range(iterations):
        raw, _ = _coarse_sums(images, pick, gx, gy, x0, y0, *_inverse_2x2(sxx, sxy, syy))
        total, mx, my, cxx, cxy, cyy = _moments_from_raw(raw, x0, y0)
        usable = total > 0
        new = _clip_eigenvalues(2 * cxx, 2 * cxy, 2 * cyy, low, high)
        x0 = np.where(usable, _clip(x0 + mx, gx[0], -gx[0]), x0)
        y0 = np.where(usable, _clip(y0 + my, gy[0], -gy[0]), y0)
        sxx, sxy, syy = (np.where(usable, fresh, old) for fresh, old in zip(new, (sxx, sxy, syy)))
    # Block averaging widened the profile by the variance of a uniform block less one pixel's.
    blur = (binning ** 2 - 1) / 12.0
    return (x0, y0) + _clip_eigenvalues(sxx - blur, sxy, syy - blur, low, high)


def _coarse_sums(images, pick, gx, gy, x0, y0, a, b, c):
    """``_coarse_gaussian_sums``: raw (m, 3, 3), the sums of h y gy^b gx^a at [:, b, a], and
    plain (m, 2), the sums of h^2 and h, for h = exp(-q / 2) about (x0, y0) with precision
    (a, b, c) on images pick (m,) of images (n, h, w)."""
    raw, plain = np.empty((len(pick), 3, 3)), np.empty((len(pick), 2))
    _coarse_gaussian_sums(images, np.asarray(pick, np.int64), *_contiguous(gx, gy, x0, y0, a, b, c), raw, plain)
    return raw, plain


def _coarse_cost(images, pick, gx, gy, x0, y0, a, b, c, sky_fitted: bool):
    """Squared error on images pick (m,) of the coarse images (n, h, w) of the Gaussian with
    precision (a, b, c) at (x0, y0), amplitude (and sky) solved: (m,), enough to choose
    between starts."""
    raw, plain = _coarse_sums(images, pick, gx, gy, x0, y0, a, b, c)
    shy, shh, sh = raw[:, 0, 0], plain[:, 0], plain[:, 1]
    sums, squares = (v[pick] for v in _sums_and_squares(images))
    m = images.shape[1] * images.shape[2]
    amplitude, sky = _solve_linear(shh, shy, sh if sky_fitted else None, sums if sky_fitted else None, m)
    cost = squares - 2 * amplitude * shy + amplitude ** 2 * shh
    if sky_fitted:
        cost += sky * (m * sky - 2 * sums + 2 * amplitude * sh)
    return cost


def _gaussian_starts(stamps: _Stamps, settings: _Settings) -> list[np.ndarray]:
    """Two starting thetas (n, P) for the Gaussian, the solver keeping the better per image
    (see ``_block_starts``), measured _START_BLOCK images at a time."""
    parts = [_block_starts(stamps, np.arange(start, min(start + _START_BLOCK, len(stamps.y32))), settings)
             for start in range(0, len(stamps.y32), _START_BLOCK)]
    return [np.concatenate(column) for column in zip(*parts)]


_START_BLOCK = 256
"""Images whose starting points are measured together: a few hundred kilobytes per array,
which the allocator recycles (larger ones come from the system afresh, page by page)."""


def _block_starts(stamps: _Stamps, index, settings: _Settings) -> list[np.ndarray]:
    """Two starting thetas (len(index), P) for the Gaussian fits of images index.

    The first is the better of two adaptive-moments ellipses on the coarse (3x3 block-averaged)
    images, at a ninth of the cost: one from the brightest point, one from the moments of the
    pixels above three standard deviations (which sees a galaxy beside a brighter compact
    neighbour, and often starts closer to the least-squares Gaussian); the one with the lowest
    squared error, less the widening by the block averaging. The second, for compact starts only, is the brightest pixel's own Gaussian
    (``_peak_start``), which a steep cusp prefers and the coarse images cannot show.
    """
    binning = stamps.binning
    coarse = stamps.coarse[index[0]:index[-1] + 1]
    gx = np.arange(coarse.shape[2]) * binning + (binning - 1) / 2.0 - stamps.cx
    gy = np.arange(coarse.shape[1]) * binning + (binning - 1) / 2.0 - stamps.cy
    sky = _median(_border(coarse)).astype(np.float64) if settings.fit_sky else np.zeros(len(coarse))
    image = coarse - sky[:, None, None].astype(coarse.dtype)
    n = len(image)
    round_window = (np.full(n, 9.0), np.zeros(n), np.full(n, 9.0))
    from_brightest = _brightest_point(image, gx, gy) + round_window
    from_moments = _thresholded_moments(image, gx, gy)
    # Both adaptive-moment runs in one batch of 2n profiles.
    pick = np.concatenate([np.arange(n), np.arange(n)])
    both = _adaptive_moments(image, pick, gx, gy, binning,
                             *(np.concatenate(pair) for pair in zip(from_brightest, from_moments)))
    blur = (binning ** 2 - 1) / 12.0
    low, high = settings.width_bounds
    both = both[:2] + (both[2] + blur, both[3], both[4] + blur)
    costs = _coarse_cost(coarse if settings.fit_sky else image, pick, gx, gy, *both[:2], *_inverse_2x2(*both[2:]),
                         settings.fit_sky).reshape(2, n)
    pick = np.arange(n) + n * costs.argmin(0)
    x0, y0, sxx, sxy, syy = (value[pick] for value in both)
    covariance = _clip_eigenvalues(sxx - blur, sxy, syy - blur, low ** 2, high ** 2)
    peak = _peak_start(stamps, index, x0, y0, sky, settings)
    # Only a compact profile can prefer its brightest pixel's own Gaussian.
    peak[_eigen(*covariance)[0] > _PEAK_START_MAX_WIDTH ** 2] = np.nan
    return [_gaussian_theta(x0, y0, *_inverse_2x2(*covariance), sky, settings), peak]


def _gaussian_theta(x0, y0, a, b, c, sky, settings: _Settings) -> np.ndarray:
    """theta (n, P) of the Gaussian centred at (x0, y0) with precision (a, b, c), amplitude 0."""
    theta = np.zeros((len(x0), _n_parameters(settings)))
    shape = _shape_slice(settings)
    if settings.fit_sky:
        theta[:, 1] = sky
    theta[:, shape.start] = x0
    theta[:, shape.start + 1] = y0
    theta[:, shape.start + 2:shape.stop] = np.stack(_cholesky_parameters(a, b, c), 1)
    return theta


_PEAK_START_MAX_WIDTH = 3.0
"""The brightest pixel's Gaussian is tried only where the coarse start's major axis is at most
this many pixels (sigma)."""


def _peak_design() -> np.ndarray:
    """(6, 9) least-squares fit of c0 + cx x + cy y + cxx x^2 + cxy x y + cyy y^2 to a 3 x 3 patch."""
    dy, dx = np.mgrid[-1:2, -1:2].reshape(2, 9).astype(np.float64)
    return np.linalg.pinv(np.stack([np.ones(9), dx, dy, dx * dx, dx * dy, dy * dy], 1))


_PEAK_FIT = _peak_design()


def _peak_start(stamps: _Stamps, index, x0, y0, sky, settings: _Settings) -> np.ndarray:
    """theta (n, P): the Gaussian through the brightest pixel near (x0, y0) and its 8 neighbours,
    for images index (n consecutive ones).

    The brightest pixel within 4 pixels of (x0, y0) (the coarse start's centre, so that the two
    starts describe the same object); a quadratic fitted to the logarithm of its 3 x 3 patch
    (less the sky) gives the peak's sub-pixel centre and curvature; widths are kept between
    0.15 and 3 pixels, the centre within a pixel of the brightest one.
    """
    n, (height, width) = len(index), stamps.y32.shape[1:]
    side = min(9, height, width)
    top = _clip(np.rint(y0 + stamps.cy).astype(np.int64) - side // 2, 0, height - side)
    left = _clip(np.rint(x0 + stamps.cx).astype(np.int64) - side // 2, 0, width - side)
    peak = stamps.windows(index, top, left, side, side).reshape(n, -1).argmax(1)
    row = _clip(top + peak // side, 1, height - 2)
    column = _clip(left + peak % side, 1, width - 2)
    patch = stamps.windows(index, row - 1, column - 1, 3, 3).astype(np.float64) - sky[:, None, None]
    brightest = np.maximum(patch[:, 1, 1], 1e-300)
    coefficients = np.log(np.maximum(patch.reshape(n, 9), 1e-3 * brightest[:, None])) @ _PEAK_FIT.T
    low, high = settings.width_bounds
    a, b, c = _clip_eigenvalues(-2 * coefficients[:, 3], -coefficients[:, 4], -2 * coefficients[:, 5],
                                max(1.0 / 9.0, 1.0 / high ** 2), min(1.0 / 0.15 ** 2, 1.0 / low ** 2))
    sxx, sxy, syy = _inverse_2x2(a, b, c)
    shift_x = _clip(sxx * coefficients[:, 1] + sxy * coefficients[:, 2], -1.0, 1.0)
    shift_y = _clip(sxy * coefficients[:, 1] + syy * coefficients[:, 2], -1.0, 1.0)
    return _gaussian_theta(column + shift_x - stamps.cx, row + shift_y - stamps.cy, a, b, c, sky, settings)


def _sersic_start(gaussian_theta, n: float, settings: _Settings) -> np.ndarray:
    """Sersic theta with the Gaussian fit's centre and half-light ellipse, and index n."""
    shape = _shape_slice(settings)
    theta = np.concatenate([gaussian_theta, np.full((len(gaussian_theta), 1), math.log(n))], 1)
    # The Gaussian's half-light isophote is q = 2 ln 2, the Sersic profile's is q = 1.
    theta[:, shape.start + 2] -= math.log(_HALF_LIGHT_PER_SIGMA)
    theta[:, shape.start + 3] /= _HALF_LIGHT_PER_SIGMA
    theta[:, shape.start + 4] -= math.log(_HALF_LIGHT_PER_SIGMA)
    return theta


# ---------------------------------------------------------------------------------------------
# One chunk


@dataclass
class _ChunkFit:
    """theta (n, P), squared errors (n,), converged (n,), iterations (n,), models (n, H, W) float32."""

    theta: np.ndarray
    cost: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    model_images: np.ndarray


def _fit_gaussian_chunk(stamps: _Stamps, settings: _Settings) -> _ChunkFit:
    run = _solve(_Gaussian, stamps, _gaussian_starts(stamps, settings), settings)
    model_images = np.empty(stamps.source.shape, np.float32)
    theta, cost = _final_fits(_Gaussian, stamps, run, settings, model_images)
    return _ChunkFit(theta, cost, run.converged, run.iterations, model_images)


def _fit_sersic_chunk(stamps: _Stamps, starts, settings: _Settings, gaussian_settings: _Settings) -> _ChunkFit:
    """The best Sersic fit over the starting indices, each started from the chunk's Gaussian fit;
    where it ends worse than the Gaussian (which is the Sersic profile of index 1/2), the Gaussian."""
    gaussian = _solve(_Gaussian, stamps, _gaussian_starts(stamps, gaussian_settings), gaussian_settings)
    gaussian_theta = np.where(gaussian.pending[:, None], gaussian.proposal, gaussian.theta)
    best = None
    for n in starts:
        run = _solve(_Sersic, stamps, [_sersic_start(gaussian_theta, n, settings)], settings)
        best = run if best is None else best.better_of(run)
    model_images = np.empty(stamps.source.shape, np.float32)
    theta, cost = _final_fits(_Sersic, stamps, best, settings, model_images)
    low, high = settings.log_n_bounds
    if low <= math.log(0.5) <= high:
        gaussian_images = np.empty_like(model_images)
        gaussian_theta, gaussian_cost = _final_fits(_Gaussian, stamps, gaussian, gaussian_settings,
                                                    gaussian_images)
        worse = cost > gaussian_cost
        as_sersic = _sersic_start(gaussian_theta[worse], 0.5, settings)
        as_sersic[:, 0] /= 2.0  # the index-1/2 profile is 2 exp(-q_gaussian / 2) at unit amplitude
        theta[worse], cost[worse], model_images[worse] = as_sersic, gaussian_cost[worse], gaussian_images[worse]
    return _ChunkFit(theta, cost, best.converged, best.iterations, model_images)


# ---------------------------------------------------------------------------------------------
# Results


def _package(name: str, parts: list[_ChunkFit], settings: _Settings, shape: tuple) -> BaselineFit:
    """The BaselineFit of the per-chunk fits: float32 models, MSE and named parameters."""
    theta = np.concatenate([p.theta for p in parts])
    return BaselineFit(
        name=name,
        model_images=parts[0].model_images if len(parts) == 1 else np.concatenate([p.model_images for p in parts]),
        params=_named_parameters(name, theta, settings, shape),
        mse=np.concatenate([p.cost for p in parts]) / (shape[1] * shape[2]),
        converged=np.concatenate([p.converged for p in parts]),
        iterations=np.concatenate([p.iterations for p in parts]),
    )


def _named_parameters(name: str, theta, settings: _Settings, shape: tuple) -> dict[str, np.ndarray]:
    """astropy-style parameters, (N,) float64 each, from theta (N, P)."""
    cx, cy = (shape[2] - 1) / 2.0, (shape[1] - 1) / 2.0
    profile = theta[:, _shape_slice(settings)]
    larger, smaller, angle = _eigen(*_precision(profile))
    # The major axis lies along the eigenvector of Q's smaller eigenvalue.
    orientation = np.remainder(angle + math.pi / 2, math.pi)
    major, minor = 1.0 / np.sqrt(smaller), 1.0 / np.sqrt(larger)
    amplitude = theta[:, 0]
    centre = {"x0": profile[:, 0] + cx, "y0": profile[:, 1] + cy}
    if name == "gaussian":
        params = {"flux": amplitude * 2 * math.pi * major * minor, "amplitude": amplitude, **centre,
                  "sigma_major": major, "sigma_minor": minor, "theta": orientation}
    else:
        params = {"amplitude": amplitude, "r_eff": major, "n": np.exp(theta[:, -1]), **centre,
                  "ellip": 1.0 - minor / major, "theta": orientation}
    if settings.fit_sky:
        params["sky"] = theta[:, 1]
    params = {key: np.asarray(value, np.float64) for key, value in params.items()}
    if name == "sersic":
        params["flux"] = sersic_total_flux(params["amplitude"], params["r_eff"], params["n"], params["ellip"])
    return params


# ---------------------------------------------------------------------------------------------
# Reference: the same least-squares problems solved one image at a time by astropy (slow)


def initial_gaussian_parameters(images, fit_sky: bool = False) -> dict[str, np.ndarray]:
    """The Gaussian fitter's starting point, as astropy-style parameters (N,) float64 each.

    Per image the better (lower squared error) of the two starts: adaptive moments of the 3x3
    block-averaged images (or a round profile at their centre), and the brightest pixel's own
    Gaussian; amplitude (and sky) the linear least-squares optimum for that shape. Keys as
    ``fit_gaussian``'s.
    """
    y = _as_batch(images)
    settings = _Settings(fit_sky=bool(fit_sky), max_iterations=1, tolerance=0.0, chunk_size=len(y),
                         width_bounds=(0.1, 10.0 * max(y.shape[1:])), centre_margin=0.5 * max(y.shape[1:]))
    stamps = _Stamps(y)
    with _blas_threads():
        start = _best_start(_Gaussian, stamps, _gaussian_starts(stamps, settings), settings,
                            np.arange(len(y)), np.float64)
    return _named_parameters("gaussian", start.theta, settings, y.shape)


def fit_gaussian_astropy(images, fit_sky: bool = False, *, initial: dict | None = None,
                         fitter: str = "levmar", max_iterations: int = 1000) -> BaselineFit:
    """Reference Gaussian fits: astropy ``Gaussian2D`` (+ ``Const2D``), one image at a time.

    images: (N, H, W). initial: starting parameters as returned by ``initial_gaussian_parameters``
    (the default). fitter: "levmar" (``LevMarLSQFitter``) or "trf" (``TRFLSQFitter``).
    Returns a BaselineFit named "gaussian-astropy" with ``fit_gaussian``'s parameter names;
    converged is False where astropy warned that the fit may have failed.
    """
    from astropy.modeling import models

    images = _to_numpy64(images, "images")
    initial = initial if initial is not None else initial_gaussian_parameters(images, fit_sky)

    def model(i):
        gaussian = models.Gaussian2D(initial["amplitude"][i], initial["x0"][i], initial["y0"][i],
                                     initial["sigma_major"][i], initial["sigma_minor"][i], initial["theta"][i])
        return gaussian + models.Const2D(initial["sky"][i] if "sky" in initial else 0.0) if fit_sky else gaussian

    def named(fitted):
        g = fitted[0] if fit_sky else fitted
        major, minor, theta = _astropy_axes(g.x_stddev.value, g.y_stddev.value, g.theta.value)
        params = {"flux": g.amplitude.value * 2 * np.pi * major * minor, "amplitude": g.amplitude.value,
                  "x0": g.x_mean.value, "y0": g.y_mean.value, "sigma_major": major, "sigma_minor": minor,
                  "theta": theta}
        if fit_sky:
            params["sky"] = fitted[1].amplitude.value
        return params

    return _astropy_loop("gaussian-astropy", images, model, named, fitter, max_iterations)


def fit_sersic_astropy(images, fit_sky: bool = False, *, n_starts: tuple[float, ...] = SERSIC_STARTS,
                       n_bounds: tuple[float, float] = (0.3, 8.0), fitter: str = "levmar",
                       max_iterations: int = 1000) -> BaselineFit:
    """Reference Sersic fits: astropy ``Sersic2D`` (+ ``Const2D``), one image and start at a time.

    The same recipe as ``fit_sersic``: an astropy Gaussian fit (``fit_gaussian_astropy``), then
    one Sersic fit from its half-light ellipse for every index in ``n_starts`` (n bounded by
    ``n_bounds``), keeping the lowest squared error. Returns a BaselineFit named "sersic-astropy".
    """
    from astropy.modeling import models

    images = _to_numpy64(images, "images")
    gaussian = fit_gaussian_astropy(images, fit_sky, fitter=fitter, max_iterations=max_iterations)
    best = None
    for n in n_starts:
        start = _sersic_start_parameters(images, gaussian.params, n, fit_sky)

        def model(i, start=start):
            sersic = models.Sersic2D(start["amplitude"][i], start["r_eff"][i], start["n"][i], start["x0"][i],
                                     start["y0"][i], start["ellip"][i], start["theta"][i],
                                     bounds={"n": n_bounds, "r_eff": (1e-3, None)})
            return sersic + models.Const2D(start["sky"][i]) if fit_sky else sersic

        def named(fitted):
            s = fitted[0] if fit_sky else fitted
            r_eff, ellip, theta = _astropy_sersic_axes(s.r_eff.value, s.ellip.value, s.theta.value)
            params = {"amplitude": s.amplitude.value, "r_eff": r_eff, "n": s.n.value, "x0": s.x_0.value,
                      "y0": s.y_0.value, "ellip": ellip, "theta": theta}
            if fit_sky:
                params["sky"] = fitted[1].amplitude.value
            return params

        fit = _astropy_loop("sersic-astropy", images, model, named, fitter, max_iterations)
        best = fit if best is None else _lower_mse(best, fit)
    best.params["flux"] = sersic_total_flux(best.params["amplitude"], best.params["r_eff"],
                                            best.params["n"], best.params["ellip"])
    return best


def _astropy_loop(name, images, model, named, fitter: str, max_iterations: int) -> BaselineFit:
    from astropy.modeling import fitting
    from astropy.utils.exceptions import AstropyUserWarning

    fitters = {"levmar": fitting.LevMarLSQFitter, "trf": fitting.TRFLSQFitter}
    if fitter not in fitters:
        raise InputError(f"fitter must be one of {sorted(fitters)}, got {fitter!r}.")
    solver = fitters[fitter]()
    y, x = np.mgrid[:images.shape[1], :images.shape[2]]
    model_images = np.empty(images.shape, np.float32)
    rows, mse, converged = [], np.empty(len(images)), np.ones(len(images), bool)
    for i, image in enumerate(images):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyUserWarning)
            fitted = solver(model(i), x, y, image, maxiter=max_iterations)
        converged[i] = not any(issubclass(w.category, AstropyUserWarning) for w in caught)
        values = fitted(x, y)
        model_images[i] = values
        mse[i] = np.mean((image - values) ** 2)
        rows.append(named(fitted))
    params = {key: np.array([row[key] for row in rows], np.float64) for key in rows[0]}
    return BaselineFit(name, model_images, params, mse, converged, np.zeros(len(images), np.int64))


def _astropy_axes(x_stddev, y_stddev, theta):
    """(sigma_major, sigma_minor, theta of the major axis in [0, pi)) from Gaussian2D's widths."""
    x_stddev, y_stddev = abs(x_stddev), abs(y_stddev)
    if y_stddev > x_stddev:
        return y_stddev, x_stddev, float(np.remainder(theta + np.pi / 2, np.pi))
    return x_stddev, y_stddev, float(np.remainder(theta, np.pi))


def _astropy_sersic_axes(r_eff, ellip, theta):
    """(r_eff of the major axis, ellip in [0, 1), theta in [0, pi)) from Sersic2D's parameters."""
    a, b = abs(r_eff), abs((1 - ellip) * r_eff)
    if b > a:
        return b, 1 - a / b, float(np.remainder(theta + np.pi / 2, np.pi))
    return a, 1 - b / a, float(np.remainder(theta, np.pi))


def _sersic_start_parameters(images, gaussian: dict, n: float, fit_sky: bool) -> dict[str, np.ndarray]:
    """Sersic2D start from a Gaussian fit: same centre and half-light ellipse, index n,
    amplitude (and sky) the linear least-squares optimum for that shape."""
    from astropy.modeling import models

    start = {"r_eff": _HALF_LIGHT_PER_SIGMA * gaussian["sigma_major"], "n": np.full(len(images), n),
             "x0": gaussian["x0"], "y0": gaussian["y0"],
             "ellip": 1 - gaussian["sigma_minor"] / gaussian["sigma_major"], "theta": gaussian["theta"]}
    y, x = np.mgrid[:images.shape[1], :images.shape[2]]
    amplitude, sky = np.empty(len(images)), np.zeros(len(images))
    for i, image in enumerate(images):
        h = models.Sersic2D(1.0, start["r_eff"][i], n, start["x0"][i], start["y0"][i],
                            start["ellip"][i], start["theta"][i])(x, y).ravel()
        design = np.stack([h, np.ones_like(h)], 1) if fit_sky else h[:, None]
        solution = np.linalg.lstsq(design, image.ravel(), rcond=None)[0]
        amplitude[i] = solution[0]
        if fit_sky:
            sky[i] = solution[1]
    return {**start, "amplitude": amplitude, "sky": sky}


def _lower_mse(first: BaselineFit, second: BaselineFit) -> BaselineFit:
    better = second.mse < first.mse
    params = {key: np.where(better, second.params[key], first.params[key]) for key in first.params}
    return BaselineFit(first.name, np.where(better[:, None, None], second.model_images, first.model_images),
                       params, np.minimum(first.mse, second.mse),
                       np.where(better, second.converged, first.converged), first.iterations)
