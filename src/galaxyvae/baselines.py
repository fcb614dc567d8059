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

The solver is a batched Levenberg-Marquardt in float64 (see ``docs/baselines.md``): a start
chosen among moment-based candidates on block-averaged images, then damped Newton (Gaussian)
or Gauss-Newton (Sersic) steps whose small normal equations are solved for all images at once
with ``torch.linalg``. Amplitude and sky are re-solved exactly (linear least squares) at every
trial point; the shape is the Cholesky factor of the inverse covariance, so it stays positive
definite; widths, centre and Sersic index are kept inside bounds by projection. Pixel sums
over the Jacobian are moments of weighted images, so no (N, P, H*W) Jacobian is ever formed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.special
import torch

from galaxyvae.errors import InputError

DEFAULT_CHUNK_SIZE = 512
"""Images fitted together. Peak memory grows with it: about 60 MB (Gaussian) and 120 MB (Sersic)
per 512 stamps of 69 x 69 pixels."""

SERSIC_STARTS = (0.5, 2.5)
"""Starting Sersic indices: 0.5, where the profile is the fitted Gaussian (so the Sersic fit is
never worse than it), and 2.5, between exponential discs (1) and de Vaucouleurs bulges (4)."""

CPU_THREADS = 1
"""Intra-op threads torch uses on CPU while fitting. The batched work is many short passes over
arrays of a few megabytes; on a shared machine a second thread that has lost its core stalls
every pass (20-40x slower measured), while on an idle one it gains at most ~1.5x."""

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
                 tolerance: float = 1e-10, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 sigma_bounds: tuple[float, float | None] = (0.1, None)) -> BaselineFit:
    """Fit ``amplitude * exp(-d^T Sigma^-1 d / 2) (+ sky)`` to every image by least squares.

    images:  (N, H, W) numpy array or torch tensor, any real dtype; a tensor is fitted on its
             own device (CPU or GPU; on CPU with CPU_THREADS threads). Solved in float64.
             Units are kept: parameters and model are in image units.
    fit_sky: also fit a constant sky level (for data that are not sky-subtracted).
    max_iterations: Levenberg-Marquardt iterations per image at most.
    tolerance: an image has converged when a step can lower its sum of squares by less
        than this fraction.
    chunk_size: images solved together (see DEFAULT_CHUNK_SIZE for the memory it takes).
    sigma_bounds: (min, max) of both widths in pixels; max defaults to 10 * max(H, W).

    Returns a ``BaselineFit`` named "gaussian" whose params are, each (N,) float64:
    ``flux`` (total, = amplitude * 2 pi sigma_major sigma_minor), ``amplitude`` (peak),
    ``x0``, ``y0`` (pixels, x along columns), ``sigma_major``, ``sigma_minor`` (pixels),
    ``theta`` (radians in [0, pi), major axis from +x towards +y) and ``sky`` when fitted.
    These are astropy's ``Gaussian2D(amplitude, x0, y0, sigma_major, sigma_minor, theta)``.
    """
    with _cpu_threads(images):
        y = _as_batch(images)
        settings = _Settings(
            fit_sky=bool(fit_sky), max_iterations=_positive_int(max_iterations, "max_iterations"),
            tolerance=float(tolerance), chunk_size=_positive_int(chunk_size, "chunk_size"),
            width_bounds=_width_bounds(sigma_bounds, 10.0 * max(y.shape[1:]), "sigma_bounds"),
            centre_margin=0.5 * max(y.shape[1:]))
        parts = [_fit_gaussian_chunk(chunk, settings).with_float32_model()
                 for chunk in _chunks(y, settings.chunk_size)]
        return _package("gaussian", y, parts, settings)


def fit_sersic(images, fit_sky: bool = False, *, n_starts: tuple[float, ...] = SERSIC_STARTS,
               n_bounds: tuple[float, float] = (0.3, 8.0),
               r_eff_bounds: tuple[float, float | None] = (0.1, None), max_iterations: int = 200,
               tolerance: float = 1e-10, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BaselineFit:
    """Fit one elliptical Sersic profile (+ sky) to every image by least squares.

    The model is astropy's ``Sersic2D`` (boxiness c = 0):
    ``amplitude * exp(-b_n (z^(1/n) - 1))``, ``z^2 = (x_maj / r_eff)^2 + (x_min / ((1 - ellip) r_eff))^2``,
    ``b_n = gammaincinv(2 n, 0.5)``. Each image is first fitted with a Gaussian; the Sersic
    fit starts from its centre and half-light ellipse at every index in ``n_starts`` and the
    start with the lowest squared error is kept. A start at n = 0.5, where the Sersic profile
    is that Gaussian, makes the Sersic fit never worse than the Gaussian one.

    images:  (N, H, W) numpy array or torch tensor (fitted on its device); units kept.
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
    with _cpu_threads(images):
        return _fit_sersic(_as_batch(images), fit_sky, n_starts, n_bounds, r_eff_bounds, max_iterations,
                           tolerance, chunk_size)


def _fit_sersic(y, fit_sky, n_starts, n_bounds, r_eff_bounds, max_iterations, tolerance, chunk_size):
    """fit_sersic on the (N, H, W) tensor y, within the fitting thread setting."""
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
    parts = [_fit_sersic_chunk(chunk, starts, settings, gaussian_settings).with_float32_model()
             for chunk in _chunks(y, settings.chunk_size)]
    return _package("sersic", y, parts, settings)


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


def _as_batch(images) -> torch.Tensor:
    """(N, H, W) real tensor on the input's device, not yet converted to float64 (chunks are,
    one at a time, so that a large data set never exists twice in float64); raises InputError."""
    if isinstance(images, torch.Tensor):
        y = images.detach()
    else:
        try:
            array = np.asarray(images)
            y = torch.from_numpy(array if array.dtype.isnative and array.dtype.kind == "f"
                                 else array.astype(np.float64))
        except (TypeError, ValueError) as error:
            raise InputError(f"images must be a numeric (N, H, W) array: {error}.") from None
    if y.ndim != 3 or min(y.shape) == 0:
        raise InputError(f"images must be a non-empty (N, H, W) array, got shape {tuple(y.shape)}.")
    if y.is_complex() or not bool(torch.isfinite(y.sum(dtype=torch.float64))):
        raise InputError("images contain NaN or infinite pixels (or are complex); fix them before fitting.")
    return y


def _to_numpy64(array, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
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


@contextlib.contextmanager
def _cpu_threads(images):
    """Within the block, torch runs CPU kernels on CPU_THREADS threads (restored afterwards),
    unless ``images`` is a tensor on another device. It covers input checks and packaging too:
    with a stalled second thread, those alone took a third of a fit's time."""
    previous = torch.get_num_threads()
    on_cpu = not isinstance(images, torch.Tensor) or images.device.type == "cpu"
    if not on_cpu or previous == CPU_THREADS:
        yield
        return
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _chunks(y: torch.Tensor, size: int):
    """Consecutive (size, H, W) float64 contiguous chunks of y (the last may be shorter)."""
    for start in range(0, len(y), size):
        yield y[start:start + size].to(torch.float64).contiguous()


# ---------------------------------------------------------------------------------------------
# Profiles h(q), q = d^T Q d the squared elliptical radius; the model is amplitude * h + sky.
# ``evaluate`` turns q into h in place (q's buffer is reused) and returns h, dh/dq (a tensor, or
# a number c meaning c * h) and the derivatives of h with respect to the extra parameters.

_EXP_FLOOR = -230.0
"""exp arguments at or below this give exactly zero: such values are invisible in any image,
and zeros keep later products away from subnormal numbers, on which CPUs are ~30x slower."""


def _exp_(x):
    """x <- exp(x) in place, exactly zero where x <= _EXP_FLOOR."""
    torch.nn.functional.threshold_(x, _EXP_FLOOR, -math.inf)
    return _numpy_inplace(np.exp, x) if _numpy_shares(x) else x.exp_()


def _log_(x):
    """x <- log(x) in place (-inf where x = 0)."""
    return _numpy_inplace(np.log, x) if _numpy_shares(x) else x.log_()


def _numpy_shares(x) -> bool:
    # numpy's float64 exp and log are vectorised (AVX-512 where present) and run 2-3x faster
    # than torch's on CPU; they work in place on the tensor's own memory.
    return x.device.type == "cpu" and x.is_contiguous()


def _numpy_inplace(function, x):
    array = x.numpy()
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        function(array, out=array)
    return x


class _GaussianProfile:
    """h = exp(-q / 2), Q the precision (inverse covariance) matrix."""

    n_extra = 0
    n_buffers = 0

    def evaluate(self, shape, dx, dy, extra, derivatives: bool, out, buffers):
        """h written into out (n, H, W); dh/dq = -h / 2."""
        return _exp_(_squared_radius(shape, dx, dy, out, factor=-0.5)), -0.5, []


class _SersicProfile:
    """h = exp(-b_n (z^(1/n) - 1)), z^2 = q, with extra parameter log n."""

    n_extra = 1
    n_buffers = 4
    # dh/dq has a cusp at the centre for n > 1/2; derivatives (not values) are taken no closer
    # than this, so that a pixel falling on the centre cannot swamp the normal equations.
    _log_q_floor = math.log(1e-8)

    def evaluate(self, shape, dx, dy, extra, derivatives: bool, out, buffers):
        """h written into out (n, H, W); also dh/dq and dh/dlog n when derivatives is True."""
        log_q, w, dh_dq, dh_dlog_n = buffers
        n = torch.exp(extra[:, 0])
        b_n, db_dn = _sersic_b(n)
        n, b_n, db_dn = (v[:, None, None] for v in (n, b_n, db_dn))
        exponent = 0.5 / n
        _log_(_squared_radius(shape, dx, dy, log_q))             # -inf on the centre: w = 0 there
        _exp_(torch.mul(log_q, exponent, out=w))                  # w = z^(1/n)
        h = _exp_(torch.mul(w, -b_n, out=out).add_(b_n))
        if not derivatives:
            return h, None, []
        log_q.clamp_min_(self._log_q_floor)
        _exp_(torch.mul(log_q, exponent - 1.0, out=dh_dq)).mul_(h).mul_(-b_n * exponent)
        # dh/dlog n = n dh/dn = h (b_n w log(q) / 2n - n b_n' (w - 1))
        torch.mul(log_q, b_n * exponent, out=dh_dlog_n).sub_(n * db_dn).mul_(w).add_(n * db_dn).mul_(h)
        return h, dh_dq, [dh_dlog_n]


def _sersic_b(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """b_n = gammaincinv(2n, 1/2), as astropy computes it, and db_n/dn by a central difference."""
    values = n.detach().cpu().numpy()
    step = 1e-6 * values
    b = scipy.special.gammaincinv(2.0 * values, 0.5)
    slope = (scipy.special.gammaincinv(2.0 * (values + step), 0.5)
             - scipy.special.gammaincinv(2.0 * (values - step), 0.5)) / (2.0 * step)
    return torch.from_numpy(b).to(n), torch.from_numpy(slope).to(n)


def sersic_total_flux(amplitude, r_eff, n, ellip):
    """Total flux of astropy's Sersic2D over the plane, in image units x pixels.

    ``2 pi n e^b_n b_n^(-2n) Gamma(2n) r_eff^2 (1 - ellip) amplitude``; arguments broadcast.
    """
    amplitude, r_eff, n, ellip = (np.asarray(v, np.float64) for v in (amplitude, r_eff, n, ellip))
    b = scipy.special.gammaincinv(2.0 * n, 0.5)
    log_scale = b - 2.0 * n * np.log(b) + scipy.special.gammaln(2.0 * n)
    return 2.0 * np.pi * n * np.exp(log_scale) * r_eff ** 2 * (1.0 - ellip) * amplitude


# ---------------------------------------------------------------------------------------------
# Parameter vector theta, per image: [amplitude, (sky), x0, y0, l1, l2, l3, (log n)].
# x0, y0 are relative to the image centre; the shape is the Cholesky factor of Q,
# L = [[exp(l1), 0], [l2, exp(l3)]], Q = L L^T, so q = (exp(l1) dx + l2 dy)^2 + (exp(l3) dy)^2
# is positive definite for every theta.


def _n_linear(settings: _Settings) -> int:
    return 2 if settings.fit_sky else 1


def _shape_slice(settings: _Settings) -> slice:
    start = _n_linear(settings)
    return slice(start, start + _SHAPE_PARAMETERS)


def _n_parameters(settings: _Settings) -> int:
    return _n_linear(settings) + _SHAPE_PARAMETERS + settings.n_extra


class _Grid:
    """Pixel-centre coordinates (x along columns, y along rows) relative to the image centre."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cx: float, cy: float):
        self.x, self.y, self.cx, self.cy = x, y, cx, cy

    @classmethod
    def for_images(cls, height: int, width: int, device, binning: int = 1) -> "_Grid":
        """The grid of (H, W) images, or of their ``binning`` x ``binning`` block averages."""
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        offset = (binning - 1) / 2.0
        x = torch.arange(width // binning, dtype=torch.float64, device=device) * binning + offset - cx
        y = torch.arange(height // binning, dtype=torch.float64, device=device) * binning + offset - cy
        return cls(x, y, cx, cy)


def _offsets(grid: _Grid, x0, y0):
    """dx (n, 1, W) and dy (n, H, 1) of every pixel centre from each image's profile centre."""
    return grid.x[None, None, :] - x0[:, None, None], grid.y[None, :, None] - y0[:, None, None]


def _squared_radius(shape, dx, dy, out, factor: float = 1.0):
    """factor * q, q = (exp(l1) dx + l2 dy)^2 + (exp(l3) dy)^2, written into out (n, H, W)."""
    root = math.sqrt(abs(factor))
    e1, l2, e3 = (root * v[:, None, None] for v in (torch.exp(shape[:, 2]), shape[:, 3], torch.exp(shape[:, 4])))
    torch.add(e1 * dx, l2 * dy, out=out)
    sign = 1.0 if factor >= 0 else -1.0
    return torch.addcmul(sign * (e3 * dy) ** 2, out, out, value=sign, out=out)


def _placement(entries: list[list[tuple]], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(entries), prod(shape)) 0/1 matrix putting value i at each index tuple of entries[i]."""
    matrix = torch.zeros(len(entries), math.prod(shape), dtype=torch.float64)
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


def _polynomials(shape):
    """Coefficients c[n, k, 9] of dq/d(shape_k) = sum c[b * 3 + a] dy^b dx^a, shape_k over
    x0, y0, l1, l2, l3: (n, 5, 9)."""
    e1, l2, e3 = torch.exp(shape[:, 2]), shape[:, 3], torch.exp(shape[:, 4])
    values = torch.stack([-2 * e1 * e1, -2 * e1 * l2, -2 * (l2 * l2 + e3 * e3), 2 * e1 * e1, 2 * e1 * l2,
                          2 * e1, 2 * l2, 2 * e3 * e3], 1)
    return (values @ _FIRST.to(values)).reshape(len(shape), _SHAPE_PARAMETERS, 9)


def _second_polynomials(shape):
    """Coefficients c[n, k, l, 9] of d2q/d(shape_k)d(shape_l): (n, 5, 5, 9)."""
    e1, l2, e3 = torch.exp(shape[:, 2]), shape[:, 3], torch.exp(shape[:, 4])
    values = torch.stack([2 * e1 * e1, 2 * e1 * l2, -4 * e1 * e1, -2 * e1 * l2, -2 * e1,
                          2 * (l2 * l2 + e3 * e3), -4 * l2, -4 * e3 * e3, 4 * e1 * e1,
                          torch.full_like(e1, 2.0), 4 * e3 * e3, 2 * e1], 1)
    return (values @ _SECOND.to(values)).reshape(len(shape), _SHAPE_PARAMETERS, _SHAPE_PARAMETERS, 9)


def _powers(d, order: int):
    """(n, L) -> (n, L, order + 1): d^0 ... d^order."""
    out = [torch.ones_like(d), d]
    for _ in range(order - 1):
        out.append(out[-1] * d)
    return torch.stack(out, -1)


def _moments(weights, dx, dy, order: int):
    """Sum over pixels of w * dy^b * dx^a, a, b <= order: weights (n, k, H, W) -> (n, k, o+1, o+1).

    dx (n, 1, W) and dy (n, H, 1) are one shared pixel grid shifted per image. The moments are
    taken about the grid's own centre, with the same powers for every image (one matrix product
    over all pixels, not a batch of small ones), then moved to each image's centre binomially.
    """
    shift_x, shift_y = dx[:, 0, :].mean(1), dy[:, :, 0].mean(1)
    grid_x = _powers((dx[0, 0, :] - shift_x[0])[None], order)[0]              # (W, o+1)
    grid_y = _powers((dy[0, :, 0] - shift_y[0])[None], order)[0]              # (H, o+1)
    per_row = torch.nn.functional.linear(weights, grid_x.T.contiguous())      # (n, k, H, o+1)
    about_grid = grid_y.T @ per_row                                           # (n, k, o+1, o+1)
    to_x, to_y = _binomial_shift(shift_x, order), _binomial_shift(shift_y, order)
    return to_y[:, None] @ about_grid @ to_x.transpose(1, 2)[:, None]


def _binomial_shift(shift, order: int):
    """T (n, o+1, o+1) with (d + shift)^a = sum_j T[a, j] d^j: T[a, j] = C(a, j) shift^(a - j)."""
    binomial, exponent = _binomial_table(order, shift.dtype, shift.device)
    return binomial * shift[:, None, None] ** exponent


@functools.lru_cache(maxsize=16)
def _binomial_table(order: int, dtype, device):
    """C(a, j) and the exponents a - j (clamped at 0), each (o+1, o+1), made once per order."""
    a = torch.arange(order + 1, device=device)
    binomial = torch.tensor([[math.comb(i, j) for j in range(order + 1)] for i in range(order + 1)],
                            dtype=dtype, device=device)
    return binomial, (a[:, None] - a[None, :]).clamp_min(0)


def _product_sum(first, second, temp):
    """Sum over pixels of first * second per image, using temp (n, H, W) as scratch: (n,)."""
    return torch.mul(first, second, out=temp).sum((1, 2))


def _squares_sum(x):
    return torch.linalg.vector_norm(x, dim=(1, 2)) ** 2


_PAIR_INDEX = torch.tensor([[(bi + bj) * 5 + (ai + aj) for bj in range(3) for aj in range(3)]
                            for bi in range(3) for ai in range(3)])
"""Where, among the flattened 5x5 fourth-order moments, the product of two quadratic terms falls."""


# ---------------------------------------------------------------------------------------------
# Cost with exact linear parameters, and the Gauss-Newton normal equations


@dataclass
class _Data:
    """The images being fitted and the sums the solver reuses."""

    y: torch.Tensor          # (n, H, W) float64
    y_sum: torch.Tensor      # (n,)
    y_squares: torch.Tensor  # (n,)

    @classmethod
    def of(cls, y):
        return cls(y, y.sum((1, 2)), _squares_sum(y))

    def subset(self, index):
        return _Data(self.y[index], self.y_sum[index], self.y_squares[index])


class _Workspace:
    """Image-sized scratch buffers, allocated once per solve: fresh large tensors cost page faults.

    ``weights`` holds the images whose moments make the normal equations: base^2, base y and
    then base h (non-Gaussian), base (sky), base dh/dextra, where dh/dq = scale * base.
    """

    def __init__(self, like: torch.Tensor, profile, settings: _Settings):
        self.h, self.temp = torch.empty_like(like), torch.empty_like(like)
        self.profile = [torch.empty_like(like) for _ in range(profile.n_buffers)]
        n_weights = 2 + (profile.n_extra > 0) + settings.fit_sky + profile.n_extra
        self.weights = like.new_empty(len(like), n_weights, *like.shape[1:])

    def views(self, m: int):
        return self.h[:m], self.temp[:m], [b[:m] for b in self.profile], self.weights[:m]


@dataclass
class _Evaluation:
    """One evaluation of n images at theta: what the cost and normal equations are made of.

    h (amplitude column) and its sums with itself, the data and 1; amplitude and sky (zero
    unless fitted); dh/dq (a tensor, or a number c meaning c * h); dh/dextra (list); the
    scratch buffers; the shape part of theta and the pixel offsets dx, dy.
    """

    h: torch.Tensor
    h_squared_sum: torch.Tensor
    h_data_sum: torch.Tensor
    h_sum: torch.Tensor | None
    amplitude: torch.Tensor
    sky: torch.Tensor
    dh_dq: torch.Tensor | float
    dh_dextra: list
    temp: torch.Tensor
    weights: torch.Tensor
    shape: torch.Tensor
    dx: torch.Tensor
    dy: torch.Tensor


def _solve_linear(shh, shy, sh, y_sum, m: int):
    """Amplitude and sky minimising sum (y - A h - s)^2 from the sums of h^2, h y, h and y.

    sh is None when no sky is fitted (sky = 0). Returns amplitude, sky: (n,) each.
    """
    if sh is None:
        return torch.where(shh > 0, shy / shh.clamp_min(1e-300), torch.zeros_like(shh)), torch.zeros_like(shh)
    det = shh * m - sh * sh
    # A profile that is numerically flat cannot be told apart from the sky: fit the sky alone.
    solvable = det > 1e-12 * shh * m
    safe = torch.where(solvable, det, torch.ones_like(det))
    amplitude = torch.where(solvable, (shy * m - sh * y_sum) / safe, torch.zeros_like(det))
    sky = torch.where(solvable, (shh * y_sum - sh * shy) / safe, y_sum / m)
    return amplitude, sky


def _evaluate(theta, data, grid, profile, settings, work, derivatives: bool = True):
    """Cost at theta with amplitude (and sky) re-solved exactly.

    theta: (n, P); data: the same n images. Returns theta with its linear entries replaced,
    cost (n,) = sum of squared residuals, and an _Evaluation from which ``_normal_equations``
    forms J^T J and J^T r (valid until ``work`` is used again).

    The cost is expanded in sums of h^2, h y, h, y and y^2, so no residual image is formed;
    where it is not small against sum y^2 the expansion loses nothing, and where it is (exact
    or noiseless fits) the residual is formed to keep the cost exact.
    """
    h, temp, buffers, weights = work.views(len(theta))
    shape = theta[:, _shape_slice(settings)]
    extra = theta[:, _shape_slice(settings).stop:]
    dx, dy = _offsets(grid, shape[:, 0], shape[:, 1])
    h, dh_dq, dh_dextra = profile.evaluate(shape, dx, dy, extra, derivatives, h, buffers)
    # For the Gaussian, h^2 and h y are the weights of the moments of the normal equations.
    gaussian = isinstance(dh_dq, float)
    shh = torch.mul(h, h, out=weights[:, 0] if gaussian else temp).sum((1, 2))
    shy = torch.mul(h, data.y, out=weights[:, 1] if gaussian else temp).sum((1, 2))
    sh = h.sum((1, 2)) if settings.fit_sky else None
    m = h.shape[1] * h.shape[2]
    amplitude, sky = _solve_linear(shh, shy, sh, data.y_sum, m)
    cost = data.y_squares - 2 * amplitude * shy + amplitude ** 2 * shh
    if settings.fit_sky:
        cost += sky * (m * sky - 2 * data.y_sum + 2 * amplitude * sh)
    near_exact = cost < 1e-5 * data.y_squares
    if bool(near_exact.any()):
        residual = torch.addcmul(data.y, h, -amplitude[:, None, None], out=temp)
        cost = torch.where(near_exact, _squares_sum(residual.sub_(sky[:, None, None])), cost)
    theta = theta.clone()
    theta[:, 0] = amplitude
    if settings.fit_sky:
        theta[:, 1] = sky
    evaluation = _Evaluation(h, shh, shy, sh, amplitude, sky, dh_dq, dh_dextra, temp, weights, shape, dx, dy)
    return theta, cost.clamp_min(0.0), evaluation


def _normal_equations(e: _Evaluation, data: _Data, settings: _Settings):
    """J^T J (n, P, P) and J^T r (n, P), without forming the (n, P, H*W) Jacobian J.

    Columns of J: h (amplitude), 1 (sky), A dh/dq p_k (centre and shape; p_k = dq/dtheta_k is
    a quadratic polynomial in dx, dy) and A dh/dextra. Every pixel sum that involves p_k is a
    moment of a dh/dq-weighted image, taken separably along columns then rows, so an iteration
    costs a few passes over the images whatever the number of parameters. Sums with the
    residual r = y - A h - s are expanded into sums with y, h and 1.
    """
    n, h, weights = len(e.h), e.h, e.weights
    a, s = e.amplitude, e.sky
    extra = [column.mul_(a[:, None, None]) for column in e.dh_dextra]
    gaussian = isinstance(e.dh_dq, float)
    base, scale = (h, e.dh_dq) if gaussian else (e.dh_dq, 1.0)
    slots = {"h": 0} if gaussian else {"h": 2}
    if not gaussian:
        torch.mul(base, base, out=weights[:, 0])
        torch.mul(base, data.y, out=weights[:, 1])
        torch.mul(base, h, out=weights[:, 2])
    if settings.fit_sky:
        slots["sky"] = 2 if gaussian else 3
        weights[:, slots["sky"]].copy_(base)
    for i, column in enumerate(extra):
        slots[i] = weights.shape[1] - len(extra) + i
        torch.mul(base, column, out=weights[:, slots[i]])
    moments = _moments(weights, e.dx, e.dy, 4)
    second = {key: moments[:, slot, :3, :3].reshape(n, 9) * scale for key, slot in slots.items()}
    curvature = _residual_curvature(moments, e, slots, settings) if gaussian else None
    keys = ["h"] + (["sky"] if settings.fit_sky else []) + list(range(len(extra)))
    base_residual = moments[:, 1, :3, :3].reshape(n, 9) * scale - a[:, None] * second["h"]
    if settings.fit_sky:
        base_residual -= s[:, None] * second["sky"]

    c = _polynomials(e.shape) * a[:, None, None]
    fourth = moments[:, 0].reshape(n, 25)[:, _PAIR_INDEX.to(c.device)] * scale ** 2
    shape_normal = c @ fourth @ c.transpose(1, 2)
    shape_plain = c @ torch.stack([second[key] for key in keys], 2)                      # (n, 5, b)
    shape_gradient = (c @ base_residual[..., None])[..., 0]                               # (n, 5)
    plain_normal, plain_gradient = _plain_sums(e, data, extra, settings)

    p = torch.tensor(_plain_positions(settings), device=c.device)
    q = torch.arange(_SHAPE_PARAMETERS, device=c.device) + _n_linear(settings)
    size = _n_parameters(settings)
    normal = c.new_zeros(n, size, size)
    gradient = c.new_zeros(n, size)
    normal[:, p[:, None], p[None, :]] = plain_normal
    normal[:, q[:, None], q[None, :]] = shape_normal
    normal[:, q[:, None], p[None, :]] = shape_plain
    normal[:, p[:, None], q[None, :]] = shape_plain.transpose(1, 2)
    gradient[:, p] = plain_gradient
    gradient[:, q] = shape_gradient
    return normal, curvature, gradient


def _residual_curvature(moments, e: _Evaluation, slots: dict, settings: _Settings):
    """S = sum over pixels of r * (second derivatives of the model), (n, P, P), for a profile
    with dh/dq = c h (the Gaussian), so that J^T J - S is the exact Hessian of the cost / 2.

    Without S, Gauss-Newton converges only linearly when the residuals are large, as they are
    for a Gaussian fitted to a real galaxy; with it, Newton steps converge quadratically.
    d2 model/dk dl = A (c^2 h q_k q_l + c h q_kl) for shape parameters, c h q_k for (A, k).
    """
    n, scale, a = len(e.h), e.dh_dq, e.amplitude
    # Moments of r h = h y - A h^2 - s h, up to fourth order.
    rh = moments[:, 1] - a[:, None, None] * moments[:, 0]
    if settings.fit_sky:
        rh = rh - e.sky[:, None, None] * moments[:, slots["sky"]]
    first = _polynomials(e.shape)
    rh_second = rh[:, :3, :3].reshape(n, 9)
    pairs = first @ rh.reshape(n, 25)[:, _PAIR_INDEX.to(rh.device)] @ first.transpose(1, 2)
    hessians = (_second_polynomials(e.shape) @ rh_second[:, None, :, None])[..., 0]
    curvature = e.h.new_zeros(n, _n_parameters(settings), _n_parameters(settings))
    q = torch.arange(_SHAPE_PARAMETERS, device=rh.device) + _n_linear(settings)
    curvature[:, q[:, None], q[None, :]] = a[:, None, None] * (scale ** 2 * pairs + scale * hessians)
    amplitude_shape = scale * (first @ rh_second[..., None])[..., 0]
    curvature[:, 0, q] = curvature[:, q, 0] = amplitude_shape
    return curvature


def _plain_positions(settings: _Settings) -> list[int]:
    """Where the non-polynomial columns (amplitude, sky, extra) sit in theta."""
    return list(range(_n_linear(settings))) + [_shape_slice(settings).stop + i for i in range(settings.n_extra)]


def _plain_sums(e: _Evaluation, data: _Data, extra: list, settings: _Settings):
    """Pixel sums of products of the non-polynomial columns h, 1 (sky), extra; and with r."""
    n, m = len(e.h), e.h.shape[1] * e.h.shape[2]
    a, s = e.amplitude, e.sky
    # Each column's sums with h, with 1 and with the data y.
    rows = [(e.h_squared_sum, e.h_sum, e.h_data_sum)]
    if settings.fit_sky:
        rows.append((e.h_sum, e.h.new_full((n,), float(m)), data.y_sum))
    for column in extra:
        rows.append((_product_sum(column, e.h, e.temp), column.sum((1, 2)), _product_sum(column, data.y, e.temp)))
    size = len(rows)
    normal = e.h.new_empty(n, size, size)
    normal[:, 0, 0] = e.h_squared_sum
    if settings.fit_sky:
        normal[:, 0, 1] = normal[:, 1, 0] = e.h_sum
        normal[:, 1, 1] = m
    for i, column in enumerate(extra):
        k = size - len(extra) + i
        normal[:, k, 0] = normal[:, 0, k] = rows[k][0]
        if settings.fit_sky:
            normal[:, k, 1] = normal[:, 1, k] = rows[k][1]
        for j, other in enumerate(extra[:i + 1]):
            l = size - len(extra) + j
            product = _squares_sum(column) if other is column else _product_sum(column, other, e.temp)
            normal[:, k, l] = normal[:, l, k] = product
    # sum column * r = sum column y - A sum column h - s sum column
    gradient = torch.stack([row[2] - a * row[0] - (s * row[1] if settings.fit_sky else 0.0) for row in rows], 1)
    return normal, gradient


# ---------------------------------------------------------------------------------------------
# Bounds: shapes projected onto the allowed widths; centre and Sersic index kept in boxes


def _precision(shape):
    """Entries (a, b, c) of Q = L L^T = [[a, b], [b, c]] for the shape part of theta."""
    e1, l2, e3 = torch.exp(shape[:, 2]), shape[:, 3], torch.exp(shape[:, 4])
    return e1 * e1, e1 * l2, l2 * l2 + e3 * e3


def _cholesky_parameters(a, b, c):
    """(l1, l2, l3) of the Cholesky factor of a positive definite [[a, b], [b, c]]."""
    e1 = torch.sqrt(a)
    det = (a * c - b * b).clamp_min(1e-300)
    return torch.log(e1), b / e1, 0.5 * torch.log(det / a)


def _eigen(a, b, c):
    """Eigenvalues (larger, smaller) of [[a, b], [b, c]] and the angle of the larger one's axis."""
    mean = 0.5 * (a + c)
    radius = torch.sqrt((0.5 * (a - c)) ** 2 + b * b)
    return mean + radius, mean - radius, 0.5 * torch.atan2(2 * b, a - c)


def _clip_eigenvalues(a, b, c, low: float, high: float):
    """[[a, b], [b, c]] with its eigenvalues clipped into [low, high], same eigenvectors."""
    larger, smaller, angle = _eigen(a, b, c)
    larger, smaller = larger.clamp(low, high), smaller.clamp(low, high)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return (larger * cos * cos + smaller * sin * sin, (larger - smaller) * sin * cos,
            larger * sin * sin + smaller * cos * cos)


def _box_bounds(settings: _Settings, grid: _Grid, like: torch.Tensor):
    """(lower, upper), each (P,): the box of the centre and Sersic index, infinite elsewhere."""
    size = _n_parameters(settings)
    lower, upper = like.new_full((size,), -math.inf), like.new_full((size,), math.inf)
    start = _n_linear(settings)
    lower[start], upper[start] = -grid.cx - settings.centre_margin, grid.cx + settings.centre_margin
    lower[start + 1], upper[start + 1] = -grid.cy - settings.centre_margin, grid.cy + settings.centre_margin
    if settings.n_extra:
        lower[-1], upper[-1] = settings.log_n_bounds
    return lower, upper


def _project(theta, settings, grid):
    """theta with its widths inside settings.width_bounds and boxed entries inside their box."""
    lower, upper = _box_bounds(settings, grid, theta)
    theta = torch.maximum(torch.minimum(theta, upper), lower)
    shape = _shape_slice(settings)
    low, high = settings.width_bounds
    # The profile's semi-axes (sigmas, or r_eff and the minor axis) are 1 / sqrt(eigenvalues of Q).
    a, b, c = _clip_eigenvalues(*_precision(theta[:, shape]), 1.0 / high ** 2, 1.0 / low ** 2)
    theta[:, shape.start + 2:shape.stop] = torch.stack(_cholesky_parameters(a, b, c), 1)
    return theta


def _frozen(theta, gradient, settings, grid):
    """Boxed entries at a bound whose descent direction points out of the box: (n, P) bool."""
    lower, upper = _box_bounds(settings, grid, theta)
    tiny = 1e-12 * (1.0 + theta.abs())
    return ((theta <= lower + tiny) & (gradient < 0)) | ((theta >= upper - tiny) & (gradient > 0))


# ---------------------------------------------------------------------------------------------
# Batched Levenberg-Marquardt


@dataclass
class _Solution:
    """Solver output for n images: theta (n, P), cost (n,), converged (n,), iterations (n,),
    model (n, H, W) float64 at theta."""

    theta: torch.Tensor
    cost: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    model: torch.Tensor

    def better_of(self, other: "_Solution") -> "_Solution":
        """Per image, whichever of the two solutions has the lower cost."""
        better = other.cost < self.cost

        def pick(mine, theirs):
            return torch.where(better.reshape(-1, *[1] * (mine.ndim - 1)), theirs, mine)

        return _Solution(*(pick(getattr(self, f), getattr(other, f))
                           for f in ("theta", "cost", "converged", "iterations", "model")))

    def with_float32_model(self) -> "_Solution":
        return replace(self, model=self.model.to(torch.float32))

    @staticmethod
    def concatenate(parts: list["_Solution"]) -> "_Solution":
        return _Solution(*(torch.cat([getattr(p, f) for p in parts])
                           for f in ("theta", "cost", "converged", "iterations", "model")))


def _damped_step(normal, curvature, gradient, damping, frozen):
    """Solve (H + lambda D) step = J^T r for every image; D is the floored diagonal of J^T J.

    H is the exact Hessian J^T J - S where curvature S is given and H + lambda D is positive
    definite, else Gauss-Newton's J^T J. damping: (n,) lambda; frozen entries get a zero step.
    Returns (step (n, P), the H used (n, P, P), solved (n,) bool); where no system can be
    solved the step is zero and solved is False.
    """
    keep = (~frozen).to(normal.dtype)
    mask = keep[:, :, None] * keep[:, None, :]
    normal, gradient = normal * mask, gradient * keep
    diagonal = torch.diagonal(normal, dim1=1, dim2=2)
    # Floored so that a parameter without leverage (the shape of a zero-amplitude profile)
    # still gets a finite, small step instead of a singular system.
    scale = torch.maximum(diagonal, 1e-12 * diagonal.amax(1, keepdim=True) + 1e-300)
    regulariser = torch.diag_embed(damping[:, None] * torch.where(frozen, torch.ones_like(scale), scale))
    hessian = normal
    if curvature is not None:
        # Newton only where the exact Hessian is itself positive definite (near a minimum);
        # elsewhere its damped steps head for saddles, and Gauss-Newton's are safer.
        newton = normal - curvature * mask
        factor, info = torch.linalg.cholesky_ex(newton + 1e-10 * torch.diag_embed(scale))
        hessian = torch.where((info == 0)[:, None, None], newton, normal)
    factor, info = torch.linalg.cholesky_ex(hessian + regulariser)
    step = torch.cholesky_solve(gradient[..., None], factor)[..., 0]
    solved = (info == 0) & torch.isfinite(step).all(1)
    return torch.where(solved[:, None], step, torch.zeros_like(step)), hessian, solved


def _predicted_reduction(step, hessian, gradient):
    """Decrease of the sum of squares that the quadratic model predicts for step: (n,)."""
    return 2 * (step * gradient).sum(1) - (step[:, None, :] @ hessian @ step[:, :, None])[:, 0, 0]


def _levenberg_marquardt(theta, y, grid, profile, settings) -> _Solution:
    """Minimise every image's sum of squared residuals, starting from theta (n, P).

    Each iteration solves the damped normal equations of all running images at once and
    evaluates the candidates; a lower cost is accepted. The damping follows Nielsen's rule:
    it shrinks as far as the quadratic model predicted the gain well, and grows 2, 4, 8...
    fold on successive failures. An image has converged when the undamped step promises
    less than ``settings.tolerance`` of its cost, when a step changed its cost by less than
    that and promised no more (MINPACK's test), when no damping finds a lower cost, or when
    its residual vanishes. Converged images drop out of later iterations.
    """
    data = _Data.of(y)
    work = _Workspace(y, profile, settings)
    theta, cost, evaluation = _evaluate(_project(theta, settings, grid), data, grid, profile, settings, work)
    normal, curvature, gradient = _normal_equations(evaluation, data, settings)
    n = len(theta)
    damping, growth = theta.new_full((n,), 1e-3), theta.new_full((n,), 2.0)
    iterations = torch.zeros(n, dtype=torch.int64, device=theta.device)
    converged = cost <= 1e-28 * data.y_squares
    running = torch.nonzero(~converged)[:, 0]
    running_data = data.subset(running)
    tol = settings.tolerance
    for _ in range(settings.max_iterations):
        old_theta, old_cost, old_gradient = theta[running], cost[running], gradient[running]
        old_normal = normal[running]
        old_curvature = curvature[running] if curvature is not None else None
        frozen = _frozen(old_theta, old_gradient, settings, grid)
        newton, hessian, newton_solved = _damped_step(old_normal, old_curvature, old_gradient,
                                                      torch.full_like(old_cost, 1e-12), frozen)
        settled = newton_solved & (_predicted_reduction(newton, hessian, old_gradient) <= tol * old_cost)
        if bool(settled.any()):
            converged[running[settled]] = True
            keep = ~settled
            running, running_data = running[keep], running_data.subset(keep)
            old_theta, old_cost, old_normal, old_gradient, frozen = (
                v[keep] for v in (old_theta, old_cost, old_normal, old_gradient, frozen))
            old_curvature = old_curvature[keep] if old_curvature is not None else None
        if len(running) == 0:
            break
        step, hessian, solved = _damped_step(old_normal, old_curvature, old_gradient, damping[running], frozen)
        new_theta, new_cost, evaluation = _evaluate(
            _project(old_theta + step, settings, grid), running_data, grid, profile, settings, work)
        accept = solved & torch.isfinite(new_cost) & (new_cost < old_cost)
        predicted = _predicted_reduction(step, hessian, old_gradient)
        negligible = solved & ((old_cost - new_cost).abs() <= tol * old_cost) & (predicted <= tol * old_cost)
        damping[running], growth[running] = _nielsen_update(
            damping[running], growth[running], accept, (old_cost - new_cost) / predicted.clamp_min(1e-300))
        iterations[running] += 1
        finished = negligible | (damping[running] > 1e12) | (accept & (new_cost <= 1e-28 * running_data.y_squares))
        taken = running[accept]
        theta[taken], cost[taken] = new_theta[accept], new_cost[accept]
        # The normal equations are only needed where the solver goes on from the new point.
        if bool((accept & ~finished).any()):
            new_normal, new_curvature, new_gradient = _normal_equations(evaluation, running_data, settings)
            normal[taken], gradient[taken] = new_normal[accept], new_gradient[accept]
            if curvature is not None:
                curvature[taken] = new_curvature[accept]
        if bool(finished.any()):
            converged[running[finished]] = True
            running, running_data = running[~finished], running_data.subset(~finished)
    return _Solution(theta, cost, converged, iterations, _model_images(theta, grid, profile, settings, work))


def _nielsen_update(damping, growth, accept, gain_ratio):
    """New (damping, growth), each (n,): after a success the damping shrinks by up to 3 as far as
    the actual gain matched the predicted one (gain_ratio); after a failure it grows by growth,
    which doubles with every failure in a row."""
    shrink = torch.clamp(1 - (2 * gain_ratio - 1) ** 3, min=1 / 3)
    return (torch.where(accept, (damping * shrink).clamp_min(1e-12), damping * growth),
            torch.where(accept, torch.full_like(growth, 2.0), growth * 2))


def _model_images(theta, grid, profile, settings, work):
    """amplitude * h + sky at every pixel centre: (n, H, W) float64, a new tensor."""
    shape = theta[:, _shape_slice(settings)]
    dx, dy = _offsets(grid, shape[:, 0], shape[:, 1])
    model = theta.new_empty(len(theta), len(grid.y), len(grid.x))
    buffers = work.views(len(theta))[2]
    profile.evaluate(shape, dx, dy, theta[:, _shape_slice(settings).stop:], False, model, buffers)
    model.mul_(theta[:, 0, None, None])
    return model.add_(theta[:, 1, None, None]) if settings.fit_sky else model


# ---------------------------------------------------------------------------------------------
# Starting points


def _binning(y) -> int:
    """Block size of the coarse images the starting point is measured on (3 for 69 x 69)."""
    return 3 if min(y.shape[1:]) >= 24 else 1


def _block_average(y, binning: int):
    """(n, H // b, W // b) means of b x b blocks (the last rows and columns if H, W % b are dropped)."""
    if binning == 1:
        return y
    return torch.nn.functional.avg_pool2d(y[:, None], binning)[:, 0]


def _border_median(y):
    """Median of each image's outer frame, a tenth of the side wide (at least 1 pixel): (n,)."""
    width = max(1, min(y.shape[1:]) // 10)
    mask = torch.ones(y.shape[1:], dtype=torch.bool, device=y.device)
    mask[width:-width, width:-width] = False
    return y[:, mask].median(1).values


def _adaptive_moments(image, grid, binning: int, iterations: int = 6):
    """Centre (x0, y0) and covariance (sxx, sxy, syy), each (n,), from Gaussian-weighted moments.

    The weight starts 3 pixels wide at the brightest point of the 3x3-smoothed image and is
    iterated towards its fixed point, weight covariance = 2 x weighted covariance, which for a
    Gaussian profile is its own covariance; the window keeps distant noise out of the moments.
    """
    smoothed = torch.nn.functional.avg_pool2d(image[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    brightest, peak = smoothed.reshape(len(image), -1).max(1)
    width = image.shape[2]
    # An image with nothing above zero has no brightest point: start from its centre.
    x0 = torch.where(brightest > 0, grid.x[peak % width], torch.zeros_like(brightest))
    y0 = torch.where(brightest > 0, grid.y[torch.div(peak, width, rounding_mode="floor")], torch.zeros_like(brightest))
    low, high = 0.25, float(max(grid.cx, grid.cy, 1.0)) ** 2
    sxx = image.new_full((len(image),), 9.0)
    sxy, syy = torch.zeros_like(sxx), sxx.clone()
    for _ in range(iterations):
        a, b, c = _inverse_2x2(sxx, sxy, syy)
        dx, dy = _offsets(grid, x0, y0)
        weight = _exp_(-0.5 * (a[:, None, None] * dx * dx + 2 * b[:, None, None] * dx * dy
                               + c[:, None, None] * dy * dy))
        m = _moments(weight.mul_(image)[:, None], dx, dy, 2)[:, 0]
        total = m[:, 0, 0]
        usable = total > 0
        safe = torch.where(usable, total, torch.ones_like(total))
        mx, my = m[:, 0, 1] / safe, m[:, 1, 0] / safe
        new = _clip_eigenvalues(2 * (m[:, 0, 2] / safe - mx * mx), 2 * (m[:, 1, 1] / safe - mx * my),
                                2 * (m[:, 2, 0] / safe - my * my), low, high)
        x0 = torch.where(usable, (x0 + mx).clamp(-grid.cx, grid.cx), x0)
        y0 = torch.where(usable, (y0 + my).clamp(-grid.cy, grid.cy), y0)
        sxx, sxy, syy = (torch.where(usable, fresh, old) for fresh, old in zip(new, (sxx, sxy, syy)))
    # Block averaging widened the profile by the variance of a uniform block less one pixel's.
    blur = (binning ** 2 - 1) / 12.0
    return (x0, y0) + _clip_eigenvalues(sxx - blur, sxy, syy - blur, low, high)


def _inverse_2x2(a, b, c):
    det = a * c - b * b
    return c / det, -b / det, a / det


_START_WIDTHS = (1.0, 2.0, 4.0, 8.0, 16.0)
"""Widths (pixels) of the round Gaussians tried, besides adaptive moments, as starting points."""


def _gaussian_start(y, settings):
    """theta (n, P) for the Gaussian: the best of several candidates on block-averaged images.

    Candidates, on the coarse (3x3 block-averaged) images at a ninth of the cost: the
    adaptive-moments ellipse and round profiles of several widths centred where it is;
    the one with the lowest squared error, less the widening by the block averaging, starts
    the full-resolution fit. Moments alone mislead on cuspy profiles, which they shrink
    towards a point.
    """
    binning = _binning(y)
    coarse = _block_average(y, binning)
    grid = _Grid.for_images(y.shape[1], y.shape[2], y.device, binning)
    sky = _border_median(coarse) if settings.fit_sky else coarse.new_zeros(len(y))
    x0, y0, sxx, sxy, syy = _adaptive_moments(coarse - sky[:, None, None], grid, binning)
    blur = (binning ** 2 - 1) / 12.0
    linear = [torch.zeros_like(x0)] + ([sky] if settings.fit_sky else [])
    candidates = [torch.stack(linear + [x0, y0, *_cholesky_parameters(*_inverse_2x2(sxx + blur, sxy, syy + blur))], 1)]
    for width in _START_WIDTHS:
        log_precision = torch.full_like(x0, -0.5 * math.log(width ** 2 + blur))
        candidates.append(torch.stack(linear + [x0, y0, log_precision, torch.zeros_like(x0), log_precision], 1))
    theta = _lowest_cost(candidates, coarse, grid, settings)
    shape = _shape_slice(settings)
    a, b, c = _inverse_2x2(*_precision(theta[:, shape]))
    low, high = settings.width_bounds
    sxx, sxy, syy = _clip_eigenvalues(a - blur, b, c - blur, low ** 2, high ** 2)
    theta[:, shape.start + 2:shape.stop] = torch.stack(_cholesky_parameters(*_inverse_2x2(sxx, sxy, syy)), 1)
    return theta


def _lowest_cost(candidates: list, y, grid, settings):
    """Per image, the Gaussian candidate theta (with linear parameters solved) of lowest cost."""
    profile = _GaussianProfile()
    data, work = _Data.of(y), _Workspace(y, profile, settings)
    best, best_cost = None, None
    for candidate in candidates:
        candidate, cost, _ = _evaluate(_project(candidate, settings, grid), data, grid, profile, settings, work)
        if best is None:
            best, best_cost = candidate, cost
        else:
            better = cost < best_cost
            best, best_cost = torch.where(better[:, None], candidate, best), torch.where(better, cost, best_cost)
    return best


def _fit_gaussian_chunk(y, settings) -> _Solution:
    grid = _Grid.for_images(y.shape[1], y.shape[2], y.device)
    return _levenberg_marquardt(_gaussian_start(y, settings), y, grid, _GaussianProfile(), settings)


def _fit_sersic_chunk(y, starts, settings, gaussian_settings) -> _Solution:
    """The best Sersic fit over the starting indices, each started from the chunk's Gaussian fit."""
    grid = _Grid.for_images(y.shape[1], y.shape[2], y.device)
    gaussian = _fit_gaussian_chunk(y, gaussian_settings).theta
    best = None
    for n in starts:
        solution = _levenberg_marquardt(_sersic_start(gaussian, n, settings), y, grid, _SersicProfile(), settings)
        best = solution if best is None else best.better_of(solution)
    return best


def _sersic_start(gaussian_theta, n: float, settings):
    """Sersic theta with the Gaussian fit's centre and half-light ellipse, and index n."""
    shape = _shape_slice(settings)
    theta = torch.cat([gaussian_theta, gaussian_theta.new_full((len(gaussian_theta), 1), math.log(n))], 1)
    # The Gaussian's half-light isophote is q = 2 ln 2, the Sersic profile's is q = 1.
    theta[:, shape.start + 2] -= math.log(_HALF_LIGHT_PER_SIGMA)
    theta[:, shape.start + 3] /= _HALF_LIGHT_PER_SIGMA
    theta[:, shape.start + 4] -= math.log(_HALF_LIGHT_PER_SIGMA)
    return theta


# ---------------------------------------------------------------------------------------------
# Results


def _package(name, y, parts: list[_Solution], settings) -> BaselineFit:
    """The BaselineFit of the per-chunk solutions: float32 models, MSE and named parameters."""
    solution = _Solution.concatenate(parts)
    grid = _Grid.for_images(y.shape[1], y.shape[2], y.device)
    return BaselineFit(
        name=name,
        model_images=solution.model.cpu().numpy(),
        params=_named_parameters(name, solution.theta, grid, settings),
        mse=(solution.cost / (y.shape[1] * y.shape[2])).cpu().numpy(),
        converged=solution.converged.cpu().numpy(),
        iterations=solution.iterations.cpu().numpy(),
    )


def _named_parameters(name, theta, grid, settings) -> dict[str, np.ndarray]:
    """astropy-style parameters, (N,) float64 each, from theta (N, P)."""
    shape = theta[:, _shape_slice(settings)]
    larger, smaller, angle = _eigen(*_precision(shape))
    # The major axis lies along the eigenvector of Q's smaller eigenvalue.
    orientation = torch.remainder(angle + math.pi / 2, math.pi)
    major, minor = torch.rsqrt(smaller), torch.rsqrt(larger)
    amplitude = theta[:, 0]
    centre = {"x0": shape[:, 0] + grid.cx, "y0": shape[:, 1] + grid.cy}
    if name == "gaussian":
        params = {"flux": amplitude * 2 * math.pi * major * minor, "amplitude": amplitude, **centre,
                  "sigma_major": major, "sigma_minor": minor, "theta": orientation}
    else:
        params = {"amplitude": amplitude, "r_eff": major, "n": torch.exp(theta[:, -1]), **centre,
                  "ellip": 1.0 - minor / major, "theta": orientation}
    if settings.fit_sky:
        params["sky"] = theta[:, 1]
    params = {key: value.cpu().numpy().astype(np.float64) for key, value in params.items()}
    if name == "sersic":
        params["flux"] = sersic_total_flux(params["amplitude"], params["r_eff"], params["n"], params["ellip"])
    return params


# ---------------------------------------------------------------------------------------------
# Reference: the same least-squares problems solved one image at a time by astropy (slow)


def initial_gaussian_parameters(images, fit_sky: bool = False) -> dict[str, np.ndarray]:
    """The Gaussian fitter's starting point, as astropy-style parameters (N,) float64 each.

    Centre and covariance from adaptive moments of the 3x3 block-averaged images, amplitude
    (and sky) the linear least-squares optimum for that shape. Keys as ``fit_gaussian``'s.
    """
    y = next(_chunks(_as_batch(images), len(images)))
    settings = _Settings(fit_sky=bool(fit_sky), max_iterations=1, tolerance=0.0, chunk_size=len(y),
                         width_bounds=(0.1, 10.0 * max(y.shape[1:])), centre_margin=0.5 * max(y.shape[1:]))
    grid = _Grid.for_images(y.shape[1], y.shape[2], y.device)
    profile = _GaussianProfile()
    theta = _project(_gaussian_start(y, settings), settings, grid)
    theta, _, _ = _evaluate(theta, _Data.of(y), grid, profile, settings, _Workspace(y, profile, settings), False)
    return _named_parameters("gaussian", theta, grid, settings)


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
