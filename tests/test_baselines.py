"""The batched parametric baselines against astropy's own models and fitters, and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from astropy.modeling import models

from galaxyvae.baselines import (BaselineFit, fit_gaussian, fit_gaussian_astropy, fit_sersic,
                                 fit_sersic_astropy, initial_gaussian_parameters,
                                 max_gaussian_log_likelihood, sersic_total_flux)
from galaxyvae.errors import InputError
from tests.helpers import gaussian_blobs

SIZE = 69
Y, X = np.mgrid[:SIZE, :SIZE]


def gaussian_image(amplitude, x0, y0, sigma_x, sigma_y, theta, sky=0.0):
    return models.Gaussian2D(amplitude, x0, y0, sigma_x, sigma_y, theta)(X, Y) + sky


def sersic_image(amplitude, r_eff, n, x0, y0, ellip, theta, sky=0.0):
    return models.Sersic2D(amplitude, r_eff, n, x0, y0, ellip, theta)(X, Y) + sky


def angle_difference(a, b):
    """Smallest difference between two axis orientations (period pi)."""
    d = np.remainder(np.asarray(a) - np.asarray(b), np.pi)
    return np.minimum(d, np.pi - d)


def sersic_like_sample(n, seed):
    """Noisy Sersic profiles of assorted index and shape: harder than Gaussian blobs."""
    rng = np.random.default_rng(seed)
    images = np.stack([sersic_image(rng.uniform(0.1, 0.5), rng.uniform(2, 9), rng.uniform(0.6, 4.5),
                                    rng.uniform(31, 37), rng.uniform(31, 37), rng.uniform(0, 0.6),
                                    rng.uniform(0, np.pi)) for _ in range(n)])
    return images + rng.normal(0, 0.02, images.shape)


GAUSSIANS = [  # amplitude, x0, y0, sigma_major, sigma_minor, theta
    (1.3, 30.2, 40.7, 6.0, 2.5, 0.7),
    (0.4, 20.0, 48.5, 3.0, 1.2, 2.6),
    (2.0, 34.0, 34.0, 4.0, 4.0, 0.0),
    (0.8, 44.3, 27.9, 9.0, 1.5, 1.9),
]


def test_recovers_noiseless_rotated_elongated_off_centre_gaussians():
    images = np.stack([gaussian_image(*p) for p in GAUSSIANS])
    fit = fit_gaussian(images)
    truth = np.array(GAUSSIANS)
    assert isinstance(fit, BaselineFit) and fit.name == "gaussian"
    assert fit.converged.all()
    np.testing.assert_allclose(fit.params["amplitude"], truth[:, 0], rtol=1e-7)
    np.testing.assert_allclose(fit.params["x0"], truth[:, 1], atol=1e-7)
    np.testing.assert_allclose(fit.params["y0"], truth[:, 2], atol=1e-7)
    np.testing.assert_allclose(fit.params["sigma_major"], truth[:, 3], rtol=1e-7)
    np.testing.assert_allclose(fit.params["sigma_minor"], truth[:, 4], rtol=1e-7)
    elongated = truth[:, 3] != truth[:, 4]
    assert angle_difference(fit.params["theta"], truth[:, 5])[elongated].max() < 1e-7
    assert fit.mse.max() < 1e-20


def test_flux_is_the_integral_of_the_scaled_density():
    images = np.stack([gaussian_image(*p) for p in GAUSSIANS[:3]])
    fit = fit_gaussian(images)
    np.testing.assert_allclose(fit.params["flux"],
                               fit.params["amplitude"] * 2 * np.pi * fit.params["sigma_major"] * fit.params["sigma_minor"])
    # These three lie well inside the stamp, so the pixel sum is the integral.
    np.testing.assert_allclose(fit.params["flux"], images.sum((1, 2)), rtol=1e-6)


def test_recovers_noisy_gaussians_within_their_statistical_errors():
    rng = np.random.default_rng(3)
    truth = [(1.0, rng.uniform(25, 44), rng.uniform(25, 44), rng.uniform(3, 7), rng.uniform(1.5, 3),
              rng.uniform(0, np.pi)) for _ in range(12)]
    images = np.stack([gaussian_image(*p) for p in truth]) + rng.normal(0, 0.02, (12, SIZE, SIZE))
    fit = fit_gaussian(images)
    truth = np.array(truth)
    assert fit.converged.all()
    np.testing.assert_allclose(fit.params["x0"], truth[:, 1], atol=0.05)
    np.testing.assert_allclose(fit.params["y0"], truth[:, 2], atol=0.05)
    np.testing.assert_allclose(fit.params["sigma_major"], truth[:, 3], rtol=0.02)
    np.testing.assert_allclose(fit.params["sigma_minor"], truth[:, 4], rtol=0.02)
    np.testing.assert_allclose(fit.params["amplitude"], truth[:, 0], rtol=0.03)
    assert angle_difference(fit.params["theta"], truth[:, 5]).max() < 0.05
    # The residual of a correct model is the noise itself.
    np.testing.assert_allclose(fit.mse, 0.02 ** 2, rtol=0.1)


def test_model_images_are_astropy_gaussian2d_at_the_fitted_parameters():
    images = gaussian_blobs(6, seed=1) + 0.3
    for fit_sky in (False, True):
        fit = fit_gaussian(images, fit_sky=fit_sky)
        p = fit.params
        for i in range(len(images)):
            expected = models.Gaussian2D(p["amplitude"][i], p["x0"][i], p["y0"][i], p["sigma_major"][i],
                                         p["sigma_minor"][i], p["theta"][i])(X, Y)
            expected = expected + (p["sky"][i] if fit_sky else 0.0)
            np.testing.assert_allclose(fit.model_images[i], expected, rtol=1e-5, atol=1e-6)
        assert fit.model_images.dtype == np.float32 and fit.model_images.shape == images.shape
        np.testing.assert_allclose(fit.mse, np.mean((images - fit.model_images.astype(np.float64)) ** 2, (1, 2)),
                                   rtol=1e-5)


def test_gaussian_mse_equal_or_lower_than_astropy_levmar():
    images = np.concatenate([gaussian_blobs(20, seed=5), sersic_like_sample(20, seed=6)])
    ours = fit_gaussian(images)
    theirs = fit_gaussian_astropy(images)
    assert np.mean(ours.mse <= theirs.mse * (1 + 1e-6)) >= 0.99
    # Astropy from a cruder, user-style start (peak amplitude, round, image centre) too.
    start = {"amplitude": images.max((1, 2)), "x0": np.full(40, 34.0), "y0": np.full(40, 34.0),
             "sigma_major": np.full(40, 3.0), "sigma_minor": np.full(40, 3.0), "theta": np.zeros(40)}
    crude = fit_gaussian_astropy(images, initial=start)
    assert np.mean(ours.mse <= crude.mse * (1 + 1e-6)) >= 0.95


def test_starting_point_is_close_for_gaussian_blobs():
    images = np.stack([gaussian_image(*p) for p in GAUSSIANS])
    start = initial_gaussian_parameters(images)
    truth = np.array(GAUSSIANS)
    np.testing.assert_allclose(start["x0"], truth[:, 1], atol=0.5)
    np.testing.assert_allclose(start["sigma_major"], truth[:, 3], rtol=0.25)


def test_sky_level_is_recovered_when_fitted():
    truth = [(1.0, 33.0, 36.0, 5.0, 3.0, 0.4, 0.75), (0.5, 29.5, 31.0, 2.5, 2.0, 2.0, -0.2)]
    rng = np.random.default_rng(0)
    images = np.stack([gaussian_image(*p) for p in truth]) + rng.normal(0, 0.01, (2, SIZE, SIZE))
    fit = fit_gaussian(images, fit_sky=True)
    np.testing.assert_allclose(fit.params["sky"], [0.75, -0.2], atol=2e-3)
    np.testing.assert_allclose(fit.params["sigma_major"], [5.0, 2.5], rtol=0.02)
    # Without the sky term the same images fit worse, and no sky is reported.
    no_sky = fit_gaussian(images)
    assert "sky" not in no_sky.params
    assert (no_sky.mse > fit.mse).all()


def test_sky_fits_equal_or_beat_astropy_gaussian_plus_const():
    images = gaussian_blobs(15, seed=9) + 1.5
    ours = fit_gaussian(images, fit_sky=True)
    theirs = fit_gaussian_astropy(images, fit_sky=True)
    assert np.all(ours.mse <= theirs.mse * (1 + 1e-6))
    np.testing.assert_allclose(ours.params["sky"], theirs.params["sky"], atol=1e-4)


@pytest.mark.parametrize("n", [0.8, 2.5, 4.0])
def test_recovers_noiseless_sersic_profiles(n):
    truth = dict(amplitude=0.6, r_eff=6.5, n=n, x0=33.4, y0=36.2, ellip=0.35, theta=2.1)
    image = sersic_image(truth["amplitude"], truth["r_eff"], n, truth["x0"], truth["y0"], truth["ellip"], truth["theta"])
    fit = fit_sersic(image[None])
    assert fit.name == "sersic" and fit.converged.all()
    for key in ("amplitude", "r_eff", "n", "x0", "y0", "ellip"):
        np.testing.assert_allclose(fit.params[key], truth[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert angle_difference(fit.params["theta"], truth["theta"]).max() < 1e-6
    assert fit.mse[0] < 1e-18


def test_recovers_noisy_sersic_profiles():
    rng = np.random.default_rng(11)
    truth = np.array([(0.3, rng.uniform(4, 8), n, rng.uniform(32, 36), rng.uniform(32, 36),
                       rng.uniform(0.1, 0.5), rng.uniform(0, np.pi)) for n in (0.7, 1.0, 2.0, 3.5)])
    images = np.stack([sersic_image(*t) for t in truth]) + rng.normal(0, 0.005, (4, SIZE, SIZE))
    fit = fit_sersic(images)
    np.testing.assert_allclose(fit.params["n"], truth[:, 2], rtol=0.05)
    np.testing.assert_allclose(fit.params["r_eff"], truth[:, 1], rtol=0.05)
    np.testing.assert_allclose(fit.params["x0"], truth[:, 3], atol=0.05)
    np.testing.assert_allclose(fit.params["ellip"], truth[:, 5], atol=0.02)


def test_sersic_model_images_are_astropy_sersic2d_at_the_fitted_parameters():
    images = sersic_like_sample(5, seed=2) + 0.1
    fit = fit_sersic(images, fit_sky=True)
    p = fit.params
    for i in range(len(images)):
        expected = sersic_image(p["amplitude"][i], p["r_eff"][i], p["n"][i], p["x0"][i], p["y0"][i],
                                p["ellip"][i], p["theta"][i], p["sky"][i])
        np.testing.assert_allclose(fit.model_images[i], expected, rtol=1e-5, atol=1e-6)


def test_sersic_mse_equal_or_lower_than_astropy_and_never_above_the_gaussian():
    images = np.concatenate([sersic_like_sample(10, seed=4), gaussian_blobs(6, seed=4)])
    ours = fit_sersic(images)
    theirs = fit_sersic_astropy(images)
    assert np.mean(ours.mse <= theirs.mse * (1 + 1e-6)) >= 0.95
    gaussian = fit_gaussian(images)
    assert np.all(ours.mse <= gaussian.mse * (1 + 1e-9))


def test_sersic_total_flux_is_the_integral_of_the_profile():
    # The elliptical profile's integral is (1 - ellip) times the circular one, 2 pi r I(r) dr.
    for n, ellip in ((0.5, 0.3), (1.0, 0.0), (4.0, 0.6)):
        b = scipy.special.gammaincinv(2 * n, 0.5)
        radial = scipy.integrate.quad(lambda r: 2 * np.pi * r * 0.2 * np.exp(-b * ((r / 4.0) ** (1 / n) - 1)),
                                      0, np.inf, limit=200)[0]
        np.testing.assert_allclose(sersic_total_flux(0.2, 4.0, n, ellip), (1 - ellip) * radial, rtol=1e-8)


def degenerate_images():
    rng = np.random.default_rng(0)
    spike = np.zeros((SIZE, SIZE))
    spike[20, 50] = 5.0
    return np.stack([np.zeros((SIZE, SIZE)), rng.normal(0, 1, (SIZE, SIZE)), spike,
                     np.full((SIZE, SIZE), 2.0), -gaussian_image(1.0, 34, 34, 4, 3, 0.2)])


@pytest.mark.parametrize("fitter", [fit_gaussian, fit_sersic])
@pytest.mark.parametrize("fit_sky", [False, True])
def test_degenerate_images_give_finite_results(fitter, fit_sky):
    images = degenerate_images()
    fit = fitter(images, fit_sky=fit_sky)
    assert np.isfinite(fit.model_images).all() and np.isfinite(fit.mse).all()
    assert all(np.isfinite(v).all() for v in fit.params.values())
    assert fit.converged.dtype == bool and fit.converged.shape == (5,)
    assert fit.mse[0] == 0.0 and fit.converged[0]             # all-zero: the zero model, exactly
    assert fit.mse[2] < 1e-10                                   # a single bright pixel is a tiny profile
    # Never worse than the best constant (or zero) model.
    baseline = images.var((1, 2)) if fit_sky else (images ** 2).mean((1, 2))
    assert np.all(fit.mse <= baseline * (1 + 1e-9))


def test_chunks_give_the_same_fits_as_one_batch():
    images = np.concatenate([gaussian_blobs(7, seed=8), sersic_like_sample(3, seed=8)])
    for fitter in (fit_gaussian, fit_sersic):
        whole = fitter(images)
        chunked = fitter(images, chunk_size=3)
        np.testing.assert_allclose(chunked.mse, whole.mse, rtol=1e-9)
        for key in whole.params:
            np.testing.assert_allclose(chunked.params[key], whole.params[key], rtol=1e-6, atol=1e-8)


def test_torch_input_matches_numpy_input():
    images = gaussian_blobs(4, seed=2)
    from_numpy = fit_gaussian(images)
    from_torch = fit_gaussian(torch.from_numpy(images))
    np.testing.assert_array_equal(from_torch.mse, from_numpy.mse)
    assert isinstance(from_torch.model_images, np.ndarray)


def test_a_thousand_stamps_fit_in_two_chunks():
    images = gaussian_blobs(1100, seed=12, noise=0.02)
    fit = fit_gaussian(images)
    assert fit.model_images.shape == images.shape and fit.converged.mean() == 1.0
    assert np.median(fit.mse) < 1.2 * 0.02 ** 2


def test_bad_input_raises_input_error():
    with pytest.raises(InputError, match="images"):
        fit_gaussian(np.zeros((69, 69)))
    with pytest.raises(InputError, match="NaN"):
        bad = np.zeros((2, 69, 69))
        bad[1, 3, 3] = np.nan
        fit_gaussian(bad)
    with pytest.raises(InputError, match="n_starts"):
        fit_sersic(np.zeros((1, 69, 69)), n_starts=(10.0,))
    with pytest.raises(InputError, match="same shape"):
        max_gaussian_log_likelihood(np.zeros((2, 5, 5)), np.zeros((2, 5, 4)))


def test_max_gaussian_log_likelihood_is_the_maximum_over_sigma():
    rng = np.random.default_rng(1)
    images = rng.normal(0, 1, (3, 9, 7))
    model_images = images + rng.normal(0, [[[0.3]], [[1.0]], [[2.5]]], images.shape)
    closed_form = max_gaussian_log_likelihood(images, model_images)
    for i in range(3):
        residual = (images[i] - model_images[i]).ravel()

        def negative(log_sigma):
            return -scipy.stats.norm.logpdf(residual, 0.0, np.exp(log_sigma)).sum()

        best = scipy.optimize.minimize_scalar(negative, bounds=(-10, 10), method="bounded",
                                              options={"xatol": 1e-10})
        np.testing.assert_allclose(closed_form[i], -best.fun, rtol=1e-9)
        sigma = np.sqrt(np.mean(residual ** 2))
        np.testing.assert_allclose(closed_form[i], scipy.stats.norm.logpdf(images[i], model_images[i], sigma).sum(),
                                   rtol=1e-12)


def test_max_gaussian_log_likelihood_of_an_exact_model_is_infinite():
    images = np.ones((2, 4, 4))
    model_images = images.copy()
    model_images[1, 0, 0] = 0.5
    values = max_gaussian_log_likelihood(images, torch.from_numpy(model_images))
    assert values[0] == np.inf and np.isfinite(values[1])


def test_fitting_leaves_the_blas_thread_setting_as_it_was():
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(2, user_api="blas"):
        fit_gaussian(gaussian_blobs(2, seed=0))
        assert all(pool["num_threads"] == 2 for pool in threadpool_info() if pool["user_api"] == "blas")


def test_galaxy_beside_a_brighter_compact_source_is_fitted_as_well_as_from_a_moment_guess():
    # Adaptive moments from the brightest point lock onto the compact source in the corner; the
    # start from the moments of all bright pixels finds the galaxy, the better least-squares
    # Gaussian here (a case met in the simulated survey).
    rng = np.random.default_rng(5)
    images = np.stack([sersic_image(amplitude, 4.0, 2.0, 33.7, 34.0, 0.2, 1.1) + gaussian_image(3.5, 66.0, 0.0, 1.3, 1.3, 0.0)
                       for amplitude in (0.4, 0.5, 0.6)]) + rng.normal(0, 0.03, (3, SIZE, SIZE))
    ours = fit_gaussian(images)
    weight = np.where(images > 0.1, images, 0.0)
    total = weight.sum((1, 2))
    guess = {"amplitude": images[:, 30:38, 30:38].max((1, 2)), "x0": (weight * X).sum((1, 2)) / total,
             "y0": (weight * Y).sum((1, 2)) / total, "sigma_major": np.full(3, 5.0), "sigma_minor": np.full(3, 5.0),
             "theta": np.zeros(3)}
    theirs = fit_gaussian_astropy(images, initial=guess)
    assert np.all(ours.mse <= theirs.mse * (1 + 1e-6))
    assert np.all(np.abs(ours.params["x0"] - 33.7) < 1.0)


def test_pixel_moments_match_a_direct_sum():
    # The solver reduces each weight image against powers of the row offsets, then of the column
    # offsets (two small matrix products); compare with the direct sum of w * dy^b * dx^a.
    from galaxyvae.baselines import _moments

    rng = np.random.default_rng(4)
    weights = rng.uniform(0, 1, (3, 2, SIZE, SIZE))
    x0, y0 = np.array([0.3, -30.5, 60.0]), np.array([-0.7, 25.25, -50.0])
    dx = np.arange(SIZE)[None, :] - x0[:, None]
    dy = np.arange(SIZE)[None, :] - y0[:, None]
    moments = _moments(weights, dx, dy).reshape(3, 2, 5, 5)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(3):
        for b in range(5):
            for a in range(5):
                direct = (weights[i] * (yy - y0[i]) ** b * (xx - x0[i]) ** a).sum((1, 2))
                np.testing.assert_allclose(moments[i, :, b, a], direct, rtol=1e-12)


def test_squared_gaussian_moments_are_the_pixel_sums_where_the_solver_uses_them():
    # Where both widths are at least 1.5 pixels and the profile is well inside the stamp, the
    # solver takes the moments of h^2 from their integrals over the plane instead of pixel sums.
    from galaxyvae.baselines import _Stamps, _integrable, _moments, _quadratic_form, _squared_gaussian_moments

    stamps = _Stamps(np.zeros((1, SIZE, SIZE), np.float32))
    used = [b * 5 + a for b in range(5) for a in range(5) if a + b <= 4]
    cases = [(2.0, 3.0, 0.3, 0.2, -0.4, True), (6.0, 4.0, -0.6, 1.0, 2.0, True),
             (1.2, 3.0, 0.0, 0.0, 0.0, False), (4.0, 4.0, 0.0, 25.0, 0.0, False)]
    for sx, sy, rho, x0, y0, expected in cases:
        covariance = np.array([[sx * sx, rho * sx * sy], [rho * sx * sy, sy * sy]])
        q = np.linalg.inv(covariance)
        a, b, c = np.array([q[0, 0]]), np.array([q[0, 1]]), np.array([q[1, 1]])
        assert bool(_integrable(stamps, np.array([[x0, y0]]), a, b, c)[0]) == expected
        if expected:
            dx = np.arange(SIZE)[None] - (SIZE - 1) / 2 - x0
            dy = np.arange(SIZE)[None] - (SIZE - 1) / 2 - y0
            h = np.exp(_quadratic_form(dx, dy, a, b, c, -0.5, np.empty((1, SIZE, SIZE))))
            pixels = _moments((h * h)[:, None], dx, dy)[0, 0, used]
            integrals = _squared_gaussian_moments(a, b, c)[0, used]
            np.testing.assert_allclose(integrals, pixels, rtol=1e-9, atol=1e-9 * pixels[0])


def test_compiled_exp_is_accurate_to_an_ulp_inside_a_vectorised_sum():
    # The kernels' exp rounds by bit arithmetic that reassociation would break; inside a summing
    # (reassociating) loop it must still be exp, and exp(-700) below -700.
    from galaxyvae.baselines import _gaussian_profile, _padded

    dx = np.concatenate([np.linspace(-40.0, 40.0, 997), [0.0, 1e3, -1e4]])
    expected = np.exp(np.maximum(-0.5 * dx * dx, -700.0))
    columns = np.zeros(_padded(len(dx)))
    columns[:len(dx)] = dx
    y = np.ones(len(dx), np.float32)
    for accurate, tolerance in ((True, 4e-16), (False, 3e-10)):
        h = np.empty_like(columns)
        sums = _gaussian_profile(h, columns, np.zeros_like(columns), y, 0.0, 0.0, 1.0, 0.0, 0.0, accurate)
        np.testing.assert_allclose(h[:len(dx)], expected, rtol=tolerance, atol=0)
        np.testing.assert_allclose(sums[:3], [np.sum(expected ** 2), np.sum(expected), np.sum(expected)],
                                   rtol=max(tolerance, 1e-14))


def test_window_pass_matches_direct_sums_and_does_not_depend_on_the_batch():
    # One compiled pass per image: amplitude, squared error and the moments of h^2 and r h must
    # equal direct numpy sums over the window (the pixels outside counting with h = 0), and an
    # image's results must not depend on the other images of the batch.
    from galaxyvae.baselines import _gaussian_window_pass

    rng = np.random.default_rng(5)
    images = rng.normal(0, 1, (4, SIZE, SIZE)).astype(np.float32)
    ids = np.array([2, 0, 3, 1])
    top, left = np.array([10, 0, 30, 0]), np.array([5, 0, 20, 0])
    heights, widths = np.array([19, SIZE, 31, SIZE]), np.array([19, SIZE, 31, SIZE])
    x0, y0 = np.array([14.2, 33.0, 36.5, 40.0]), np.array([19.7, 35.1, 44.0, 20.0])
    a, b, c = np.array([0.3, 0.05, 0.1, 0.2]), np.array([0.05, -0.01, 0.02, 0.0]), np.array([0.2, 0.08, 0.1, 0.2])
    sums = images.sum((1, 2), dtype=np.float64)[ids]
    squares = (images.astype(np.float64) ** 2).sum((1, 2))[ids]

    def run(rows):
        out = [np.empty(len(rows)) for _ in range(4)]
        moments = np.empty((len(rows), 3, 25))
        _gaussian_window_pass(images, ids[rows], top[rows], left[rows], heights[rows], widths[rows], x0[rows],
                              y0[rows], a[rows], b[rows], c[rows], np.zeros(len(rows)), sums[rows], squares[rows],
                              True, True, True, *out, moments)
        return out, moments

    (amplitude, sky, cost, shh), moments = run(np.arange(4))
    for k, i in enumerate(ids):
        yy, xx = np.mgrid[top[k]:top[k] + heights[k], left[k]:left[k] + widths[k]]
        dx, dy = xx - x0[k], yy - y0[k]
        h = np.exp(-0.5 * (a[k] * dx * dx + 2 * b[k] * dx * dy + c[k] * dy * dy))
        window = images[i, top[k]:top[k] + heights[k], left[k]:left[k] + widths[k]].astype(np.float64)
        design = np.zeros((SIZE * SIZE, 2))
        design[:, 1] = 1.0
        design.reshape(SIZE, SIZE, 2)[top[k]:top[k] + heights[k], left[k]:left[k] + widths[k], 0] = h
        solution, residuals = np.linalg.lstsq(design, images[i].astype(np.float64).ravel(), rcond=None)[:2]
        np.testing.assert_allclose([amplitude[k], sky[k]], solution, rtol=1e-10)
        np.testing.assert_allclose(cost[k], residuals[0], rtol=1e-10)
        r = window - amplitude[k] * h - sky[k]
        for bpow in range(5):
            for apow in range(5 - bpow):
                power = dx ** apow * dy ** bpow
                for w, weight in enumerate((h * h, r * h, h)):
                    np.testing.assert_allclose(moments[k, w, 5 * bpow + apow], (weight * power).sum(),
                                               rtol=1e-10, atol=1e-13 * np.abs(weight * power).sum())
    (part, _, part_cost, _), part_moments = run(np.array([2, 1]))
    np.testing.assert_array_equal(part, amplitude[[2, 1]])
    np.testing.assert_array_equal(part_cost, cost[[2, 1]])
    np.testing.assert_array_equal(part_moments, moments[[2, 1]])


def test_starts_evaluated_over_a_smaller_window_give_the_same_fits(monkeypatch):
    # The starts' evaluations see only q <= 12; the fits must not depend on it.
    from galaxyvae import baselines

    images = np.concatenate([gaussian_blobs(12, seed=11), sersic_like_sample(12, seed=11)])
    windowed = fit_gaussian(images)
    monkeypatch.setattr(baselines._Gaussian, "start_window", None)
    full = fit_gaussian(images)
    assert windowed.converged.all() and full.converged.all()
    np.testing.assert_allclose(windowed.mse, full.mse, rtol=1e-6)
