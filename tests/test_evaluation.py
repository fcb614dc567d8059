"""Held-out evaluation: each metric against an independent computation, then `evaluate` end to end."""

import json
import math

import h5py
import numpy as np
import pytest
from scipy import optimize, stats

from galaxyvae import evaluation
from galaxyvae.cli import main
from galaxyvae.errors import InputError, OutputExistsError
from galaxyvae.evaluation import (
    bits_per_pixel,
    bootstrap_mean_interval,
    calibrated_fraction,
    calibration_fractions,
    gaussian_log_likelihood,
    likelihood_wins,
    mean_squared_error,
    mse_wins,
)
from tests.helpers import read_csv_columns, write_blob_dataset

PER_IMAGE_COLUMNS = ["index", "object_id", "family", "mse_vae", "elbo", "log_px_iw", "loglik_vae"] + [
    f"{column}_{b}" for b in ("gaussian", "sersic") for column in ("mse", "loglik", "mse_win", "likelihood_win")
]
VAE_KEYS = ["mean_mse", "median_mse", "elbo_nats", "elbo_bits_per_pixel", "log_px_iw_nats",
            "log_px_iw_bits_per_pixel", "calibration_within_1sigma", "calibration_within_2sigma"]
BASELINE_KEYS = ["mse_win_fraction", "mse_win_ci95", "likelihood_win_fraction", "likelihood_win_ci95",
                 "mean_mse", "median_mse", "fit_converged_fraction"]


# --- metrics on arrays -----------------------------------------------------------------------

def test_mean_squared_error_is_the_per_image_mean_over_pixels():
    rng = np.random.default_rng(0)
    images, predictions = rng.normal(size=(2, 5, 69, 69)).astype(np.float32)
    expected = [np.mean((a.astype(float) - b) ** 2) for a, b in zip(images, predictions)]
    np.testing.assert_allclose(mean_squared_error(images, predictions), expected, rtol=1e-12)


def test_gaussian_log_likelihood_is_the_scipy_sum_over_pixels():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(4, 69, 69))
    variance = rng.lognormal(-3, 1, size=mean.shape)
    images = mean + np.sqrt(variance) * rng.standard_t(4, size=mean.shape)
    expected = stats.norm.logpdf(images, mean, np.sqrt(variance)).sum(axis=(1, 2))
    np.testing.assert_allclose(gaussian_log_likelihood(images, mean, variance), expected, rtol=1e-10)


def numerically_best_sigma_log_likelihood(image, model_image):
    """max over sigma of sum log N(x; x-hat, sigma^2), by a bounded search over log sigma."""
    def negative(log_sigma):
        return -stats.norm.logpdf(image, model_image, np.exp(log_sigma)).sum()

    rms = np.sqrt(np.mean((image - model_image) ** 2))
    best = optimize.minimize_scalar(negative, bounds=(np.log(rms) - 5, np.log(rms) + 5), method="bounded",
                                    options={"xatol": 1e-9})
    return -best.fun


def test_best_sigma_log_likelihood_matches_a_numerical_maximisation():
    from galaxyvae.baselines import max_gaussian_log_likelihood

    rng = np.random.default_rng(2)
    model_images = rng.normal(size=(4, 69, 69)).astype(np.float32)
    scales = np.array([1e-3, 0.05, 1.0, 30.0])[:, None, None]
    images = (model_images + scales * rng.standard_t(3, size=model_images.shape)).astype(np.float32)
    closed_form = max_gaussian_log_likelihood(images, model_images)
    numerical = [numerically_best_sigma_log_likelihood(x.astype(float), m.astype(float))
                 for x, m in zip(images, model_images)]
    np.testing.assert_allclose(closed_form, numerical, rtol=1e-6)


def heteroscedastic_cases(rng):
    """(images, vae_mean, vae_variance, baseline_images, expected_win) with answers known in advance."""
    truth = rng.normal(size=(69, 69))
    sd = np.where(np.arange(69 * 69).reshape(69, 69) % 2 == 0, 0.01, 1.0)
    image = truth + sd * rng.normal(size=truth.shape)
    residual_var = np.mean((image - truth) ** 2)
    cases = [
        # right mean and the true per-pixel variances beat the same mean with any single sigma
        (truth, sd ** 2, truth, True),
        # the same mean as the fit with a constant variance never beats the fit's best sigma
        (truth, np.full_like(truth, 1.1 * residual_var), truth, False),
        (truth, np.full_like(truth, 0.9 * residual_var), truth, False),
        # a worse mean with a variance far too large loses
        (truth + 3.0, np.full_like(truth, 100.0), truth, False),
        # the right mean with a fair constant variance beats a fit offset by 2
        (truth, np.full_like(truth, residual_var), truth + 2.0, True),
    ]
    images = np.stack([image] * len(cases))
    return (images, *(np.stack(column) for column in zip(*[c[:3] for c in cases])),
            np.array([c[3] for c in cases]))


def test_likelihood_win_is_decided_against_the_best_sigma_of_the_fit():
    from galaxyvae.baselines import max_gaussian_log_likelihood

    images, vae_mean, vae_variance, baseline, expected = heteroscedastic_cases(np.random.default_rng(3))
    vae = gaussian_log_likelihood(images, vae_mean, vae_variance)
    wins = likelihood_wins(vae, max_gaussian_log_likelihood(images, baseline))
    numerical = np.array([numerically_best_sigma_log_likelihood(x, m) for x, m in zip(images, baseline)])
    np.testing.assert_array_equal(wins, expected)
    np.testing.assert_array_equal(wins, vae > numerical)


def test_wins_are_strict_and_a_failed_fit_is_not_a_win():
    np.testing.assert_array_equal(mse_wins([1.0, 2.0, 3.0, 1.0], [2.0, 2.0, 1.0, np.nan]),
                                  [True, False, False, False])
    np.testing.assert_array_equal(likelihood_wins([5.0, 5.0, 4.0, 5.0], [4.0, 5.0, 5.0, np.nan]),
                                  [True, False, False, False])


def numpy_loop_bootstrap(values, n_resamples, seed, level=0.95):
    rng = np.random.default_rng(seed)
    means = [np.mean(values[rng.integers(0, len(values), len(values))]) for _ in range(n_resamples)]
    return tuple(np.percentile(means, [50 * (1 - level), 50 * (1 + level)]))


def test_bootstrap_equals_a_numpy_loop_over_resamples(monkeypatch):
    wins = np.random.default_rng(4).random(37) < 0.8
    expected = numpy_loop_bootstrap(wins.astype(float), 500, seed=11)
    assert bootstrap_mean_interval(wins, n_resamples=500, seed=11) == pytest.approx(expected, abs=1e-15)
    monkeypatch.setattr(evaluation, "_BOOTSTRAP_BLOCK", 37 * 7)  # several blocks: the same resamples
    assert bootstrap_mean_interval(wins, n_resamples=500, seed=11) == pytest.approx(expected, abs=1e-15)


def test_bootstrap_agrees_with_scipy_percentile_bootstrap():
    wins = (np.random.default_rng(5).random(200) < 0.9).astype(float)
    ours = bootstrap_mean_interval(wins, n_resamples=20_000, seed=0)
    reference = stats.bootstrap((wins,), np.mean, n_resamples=20_000, method="percentile",
                                confidence_level=0.95, random_state=np.random.default_rng(1))
    ci = reference.confidence_interval
    assert ours == pytest.approx((ci.low, ci.high), abs=0.011)
    assert ours[0] < wins.mean() < ours[1]


def test_bootstrap_of_all_wins_is_a_point_and_seeded():
    assert bootstrap_mean_interval(np.ones(50, bool), seed=3) == (1.0, 1.0)
    values = np.random.default_rng(6).random(40)
    assert bootstrap_mean_interval(values, seed=9) == bootstrap_mean_interval(values, seed=9)
    assert bootstrap_mean_interval(values, seed=9) != bootstrap_mean_interval(values, seed=10)


def test_calibration_of_pixels_drawn_from_the_predicted_gaussian():
    rng = np.random.default_rng(7)
    mean = rng.normal(size=(30, 69, 69))
    variance = rng.lognormal(-2, 1.5, size=mean.shape)
    images = mean + np.sqrt(variance) * rng.normal(size=mean.shape)
    within = calibration_fractions(images, mean, variance).mean(axis=0)
    assert within == pytest.approx([0.6827, 0.9545], abs=0.005)
    # predicting twice the true standard deviation: 1 predicted s.d. holds 2 true ones
    too_wide = calibration_fractions(images, mean, 4 * variance).mean(axis=0)
    assert too_wide[0] == pytest.approx(0.9545, abs=0.005)


def test_calibrated_fraction_is_the_normal_mass_within_k_sd():
    for k in (1, 2, 3):
        assert calibrated_fraction(k) == pytest.approx(stats.norm.cdf(k) - stats.norm.cdf(-k), rel=1e-12)


def test_bits_per_pixel_keeps_the_sign_of_the_nats():
    n_pixels = 69 * 69
    assert bits_per_pixel(-3 * n_pixels * math.log(2), n_pixels) == pytest.approx(-3.0)
    assert bits_per_pixel(1000.0, n_pixels) == pytest.approx(1000.0 / n_pixels / math.log(2))


def test_table_states_both_claims_for_each_baseline_beside_the_paper():
    from galaxyvae.report import markdown_to_html

    baseline = {"mse_win_fraction": 0.983, "mse_win_ci95": [0.975, 0.99], "likelihood_win_fraction": 0.5,
                "likelihood_win_ci95": [0.47, 0.53], "mean_mse": 1e-3, "median_mse": 8e-4,
                "fit_converged_fraction": 0.999}
    vae = {"mean_mse": 2e-4, "median_mse": 1e-4, "mean_loglik_nats": 9000.0, "elbo_nats": 8000.0,
           "elbo_bits_per_pixel": 2.42, "log_px_iw_nats": 8100.0, "log_px_iw_bits_per_pixel": 2.45,
           "negative_log_px_iw_bits_per_pixel": -2.45, "calibration_within_1sigma": 0.7,
           "calibration_within_2sigma": 0.96}
    summary = {"n_images": 1000, "n_pixels": 4761, "data": "/d/survey.h5", "pixel_units": "nanomaggies",
               "importance_samples": 64, "vae": vae, "paper": evaluation.PAPER,
               "baselines": {"gaussian": baseline, "sersic": dict(baseline, mse_win_fraction=0.61)}}
    table = evaluation.render_table(summary)
    assert "| f_μ(g_μ(x)) has lower MSE than x̂ | 97.1% | 98.3% [97.5%, 99.0%] | 61.0% [97.5%, 99.0%] |" in table
    assert "| 97.2% | 50.0% [47.0%, 53.0%] |" in table
    assert "On 98.3% of held-out images" in table and "On 61.0% of held-out images" in table
    assert "68.3%" in table and "95.4%" in table and "| -2.45 |" in table
    assert markdown_to_html(table).count("<table>") == 3


# --- evaluate end to end on a tiny trained run -----------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from galaxyvae.config import ModelConfig, TrainConfig
    from galaxyvae.training import train

    folder = tmp_path_factory.mktemp("evaluation")
    data = write_blob_dataset(folder / "blobs.h5", n=64, n_held_out=12, seed=0)
    config = TrainConfig(epochs=3, batch_size=16, seed=0, device="cpu",
                         model=ModelConfig(latent_dim=4, hidden=32))
    train(data, folder / "run", config)
    return folder / "run", data


@pytest.fixture(scope="module")
def evaluated(trained_run):
    run_dir, _ = trained_run
    return evaluation.evaluate(run_dir, importance_samples=8, seed=0, progress=False)


def test_evaluate_writes_the_documented_files_keys_and_columns(trained_run, evaluated):
    run_dir, data = trained_run
    summary = json.loads((run_dir / "evaluation.json").read_text())
    assert summary["n_images"] == 12
    assert summary["data"] == str(data.resolve())
    assert summary["run_dir"] == str(run_dir.resolve())
    assert summary["importance_samples"] == 8 and summary["seed"] == 0
    assert summary["data_provenance"]["provenance"] == {"made_by": "tests.helpers"}
    assert summary["fit_sky"] is False  # the blobs are sky-subtracted
    assert summary["paper"] == {"mse_win_fraction": 0.971, "likelihood_win_fraction": 0.972}
    assert set(VAE_KEYS) <= set(summary["vae"])
    for name in ("gaussian", "sersic"):
        assert set(BASELINE_KEYS) <= set(summary["baselines"][name])
    columns = read_csv_columns(run_dir / "per_image.csv")
    assert set(PER_IMAGE_COLUMNS) <= set(columns)
    assert len(columns["index"]) == 12
    table = (run_dir / "table.md").read_text()
    assert table == evaluated.table_markdown()
    assert "97.1%" in table and "97.2%" in table and "Sérsic" in table


def test_evaluation_json_is_recomputed_from_per_image_csv(trained_run, evaluated):
    run_dir, data = trained_run
    summary = json.loads((run_dir / "evaluation.json").read_text())
    columns = {k: np.array(v) for k, v in read_csv_columns(run_dir / "per_image.csv").items()}
    flags = ("mse_win_", "likelihood_win_", "converged_")
    number = {k: v.astype(float) for k, v in columns.items()
              if k not in ("object_id", "family") and not k.startswith(flags)}
    n_pixels = 69 * 69
    vae = summary["vae"]
    assert vae["mean_mse"] == pytest.approx(number["mse_vae"].mean(), rel=1e-12)
    assert vae["median_mse"] == pytest.approx(np.median(number["mse_vae"]), rel=1e-12)
    assert vae["elbo_nats"] == pytest.approx(number["elbo"].mean(), rel=1e-12)
    assert vae["log_px_iw_nats"] == pytest.approx(number["log_px_iw"].mean(), rel=1e-12)
    assert vae["log_px_iw_bits_per_pixel"] == pytest.approx(number["log_px_iw"].mean() / n_pixels / math.log(2))
    assert vae["negative_log_px_iw_bits_per_pixel"] == pytest.approx(-vae["log_px_iw_bits_per_pixel"])
    assert vae["calibration_within_1sigma"] == pytest.approx(number["within_1sigma"].mean(), rel=1e-12)
    assert vae["calibration_within_2sigma"] == pytest.approx(number["within_2sigma"].mean(), rel=1e-12)
    for name, s in summary["baselines"].items():
        mse_win = columns[f"mse_win_{name}"] == "True"
        ll_win = columns[f"likelihood_win_{name}"] == "True"
        np.testing.assert_array_equal(mse_win, number["mse_vae"] < number[f"mse_{name}"])
        np.testing.assert_array_equal(ll_win, number["loglik_vae"] > number[f"loglik_{name}"])
        assert s["mse_win_fraction"] == pytest.approx(mse_win.mean())
        assert s["likelihood_win_fraction"] == pytest.approx(ll_win.mean())
        assert s["mse_win_ci95"] == pytest.approx(numpy_loop_bootstrap(mse_win.astype(float), 2000, seed=0))
        assert s["likelihood_win_ci95"] == pytest.approx(numpy_loop_bootstrap(ll_win.astype(float), 2000, 0))
        assert s["mean_mse"] == pytest.approx(number[f"mse_{name}"].mean(), rel=1e-12)
        assert s["median_mse"] == pytest.approx(np.median(number[f"mse_{name}"]), rel=1e-12)
        assert s["fit_converged_fraction"] == pytest.approx((columns[f"converged_{name}"] == "True").mean())


def test_per_image_numbers_agree_with_the_trained_model_and_the_data(trained_run, evaluated):
    from galaxyvae.dataset import read_dataset
    from galaxyvae.runs import load_run

    run_dir, data = trained_run
    dataset = read_dataset(data)
    index = evaluated.per_image["index"]
    np.testing.assert_array_equal(index, np.flatnonzero(dataset.held_out))
    images = dataset.images[index]
    model = load_run(run_dir)
    np.testing.assert_allclose(evaluated.per_image["loglik_vae"], model.log_likelihood(images), rtol=1e-4)
    np.testing.assert_allclose(evaluated.per_image["mse_vae"],
                               mean_squared_error(images, model.reconstruct(images)), rtol=1e-5)
    # importance weighting tightens the bound on average
    assert evaluated.per_image["log_px_iw"].mean() >= evaluated.per_image["elbo"].mean() - 1e-3


def test_evaluate_refuses_to_replace_an_evaluation_unless_asked(trained_run, evaluated, capsys):
    run_dir, _ = trained_run
    with pytest.raises(OutputExistsError, match="evaluation.json"):
        evaluation.evaluate(run_dir, importance_samples=2, progress=False)
    assert main(["evaluate", str(run_dir), "--importance-samples", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_evaluates_another_data_set_beside_the_runs_own(trained_run, evaluated, tmp_path, capsys):
    run_dir, _ = trained_run
    own = (run_dir / "evaluation.json").read_text()
    other = write_blob_dataset(tmp_path / "other.h5", n=20, n_held_out=5, seed=3)
    assert main(["evaluate", str(run_dir), str(other), "--importance-samples", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "lower MSE than x̂" in printed and "97.1%" in printed
    folder = run_dir / "evaluations" / "other"
    summary = json.loads((folder / "evaluation.json").read_text())
    assert summary["n_images"] == 5 and summary["data"] == str(other.resolve())
    assert not summary["data_provenance"]["is_the_runs_own_data"]
    assert {p.name for p in folder.iterdir()} >= {"evaluation.json", "per_image.csv", "table.md"}
    assert (run_dir / "evaluation.json").read_text() == own


def test_baselines_fit_a_sky_level_when_the_data_are_not_sky_subtracted(trained_run, evaluated, tmp_path):
    from galaxyvae.dataset import choose_held_out, write_dataset
    from tests.helpers import gaussian_blobs

    run_dir, _ = trained_run
    noise = 0.05
    path = write_dataset(tmp_path / "with-sky.h5", gaussian_blobs(12, seed=4, noise=noise) + 0.5,
                         choose_held_out(12, 6, 0),
                         attrs={"source": "test", "pixel_units": "arbitrary", "pixel_scale_arcsec": 0.396,
                                "sky_subtracted": False})
    result = evaluation.evaluate(run_dir, path, importance_samples=2, progress=False)
    assert result.summary["fit_sky"] is True
    # with the sky fitted, a Gaussian leaves only the noise: MSE close to noise^2
    assert result.summary["baselines"]["gaussian"]["median_mse"] == pytest.approx(noise ** 2, rel=0.1)
    assert result.output_dir == run_dir / "evaluations" / "with-sky"


def test_a_missing_run_directory_is_named(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path / "nowhere")):
        evaluation.evaluate(tmp_path / "nowhere")


def test_a_data_set_without_held_out_images_is_named(trained_run, tmp_path):
    run_dir, _ = trained_run
    data = write_blob_dataset(tmp_path / "all-train.h5", n=10, n_held_out=0)
    with pytest.raises(InputError, match=f"{data}.*held_out split is empty"):
        evaluation.evaluate(run_dir, data, progress=False)


def test_images_of_the_wrong_size_are_named(trained_run, tmp_path):
    run_dir, blobs = trained_run
    path = tmp_path / "small.h5"
    with h5py.File(blobs, "r") as source, h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((4, 32, 32), np.float32))
        f.create_dataset("held_out", data=np.array([False, True, False, True]))
        f.create_group("metadata")
        f.attrs.update(dict(source.attrs))
    with pytest.raises(InputError, match=f"{path}.*69, 69"):
        evaluation.evaluate(run_dir, path, progress=False)
