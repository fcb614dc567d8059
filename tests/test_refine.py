"""Per-image latent refinement (``TrainedModel.refine_latents``) and ``evaluate --refine-steps``.

The optimiser is checked on a decoder that is linear in z with a constant variance, where the
MAP latent has a closed form and scipy can find it independently; the guarantees a user relies
on (never worse than g_mu(x), deterministic, per image) on a nonlinear model; and the refined
columns of the evaluation against a recomputation from the trained model.
"""

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize

from galaxyvae import evaluation, runs
from galaxyvae.cli import main
from galaxyvae.config import ModelConfig, TrainConfig
from galaxyvae.errors import InputError
from galaxyvae.model import GalaxyVAE, PixelScaling
from galaxyvae.runs import REFINE_LEARNING_RATE, TrainedModel, load_run
from tests.helpers import gaussian_blobs, read_csv_columns, write_blob_dataset

SIDE = 69
PIXELS = SIDE * SIDE


# --- a decoder linear in z: the MAP latent in closed form ------------------------------------

LATENT = 3
PIXEL_SD = 0.1
OFFSET = 8.0
"""The decoder's hidden units carry z + OFFSET, so the ReLU never bends for |z| < OFFSET; small, because
float32 loses the low bits of z in z + OFFSET and the decoder's head then cancels OFFSET * A."""


def linear_decoder_model(seed: int = 0) -> tuple[TrainedModel, np.ndarray, np.ndarray]:
    """A TrainedModel whose decoder is f_mu(z) = A z + c, f_sigma = PIXEL_SD^2 (data units = scaled
    units), with a random encoder; returns it with A (PIXELS, LATENT) and c (PIXELS,)."""
    rng = np.random.default_rng(seed)
    config = ModelConfig(latent_dim=LATENT, hidden=8, hidden_layers=1)
    torch.manual_seed(seed)
    model = GalaxyVAE(config, PixelScaling(0.0, 1.0))
    blob = gaussian_blobs(LATENT, seed=seed, noise=0.0).reshape(LATENT, PIXELS).T   # smooth, galaxy-like columns
    a = (blob * rng.uniform(0.5, 2.0, LATENT)).astype(np.float64)
    c = rng.normal(0, 0.05, PIXELS)
    layer, head = model.decoder[0], model.decoder_head
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:LATENT] = torch.eye(LATENT)
        layer.bias.fill_(OFFSET)
        head.weight.zero_()
        head.weight[:PIXELS, :LATENT] = torch.from_numpy(a)
        head.bias[:PIXELS] = torch.from_numpy(c - OFFSET * a.sum(axis=1))
        head.bias[PIXELS:] = 2 * math.log(PIXEL_SD)
    trained = TrainedModel(model.eval(), TrainConfig(model=config), ".", None, 0)
    return trained, a, c


def closed_form_map(images: np.ndarray, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmax_z log N(x; A z + c, s^2 I) + log N(z; 0, I) = (A'A / s^2 + I)^-1 A'(x - c) / s^2."""
    precision = a.T @ a / PIXEL_SD ** 2 + np.eye(LATENT)
    residual = images.reshape(len(images), PIXELS).astype(np.float64) - c
    return np.linalg.solve(precision, a.T @ residual.T / PIXEL_SD ** 2).T


def scipy_map(image: np.ndarray, a: np.ndarray, c: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The same maximum found numerically by scipy's BFGS, in float64, from the encoder's start."""
    x = image.reshape(PIXELS).astype(np.float64)

    def negative_log_posterior(z):
        residual = x - a @ z - c
        value = 0.5 * residual @ residual / PIXEL_SD ** 2 + 0.5 * z @ z
        return value, -a.T @ residual / PIXEL_SD ** 2 + z

    return optimize.minimize(negative_log_posterior, start.astype(np.float64), jac=True, method="BFGS",
                             options={"gtol": 1e-9}).x


@pytest.fixture(scope="module")
def linear():
    model, a, c = linear_decoder_model()
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(6, LATENT))
    images = (truth @ a.T + c + rng.normal(0, PIXEL_SD, (6, PIXELS))).reshape(6, SIDE, SIDE).astype(np.float32)
    return model, a, c, images


def test_the_linear_model_decodes_as_intended(linear):
    model, a, c, _ = linear
    z = np.random.default_rng(2).normal(size=(4, LATENT)).astype(np.float32)
    mean, variance = model.decode(z)
    np.testing.assert_allclose(mean.reshape(4, PIXELS), z @ a.T + c, atol=2e-4)
    np.testing.assert_allclose(variance, PIXEL_SD ** 2, rtol=1e-5)


def test_refined_latents_reach_the_closed_form_and_scipy_optimum(linear):
    model, a, c, images = linear
    start = model.encode(images)[0]
    refined = model.refine_latents(images, steps=800)  # the posterior is correlated: Adam needs more steps
    expected = closed_form_map(images, a, c)
    numerical = np.array([scipy_map(x, a, c, z) for x, z in zip(images, start)])
    np.testing.assert_allclose(numerical, expected, atol=1e-6)
    posterior_sd = np.sqrt(np.diag(np.linalg.inv(a.T @ a / PIXEL_SD ** 2 + np.eye(LATENT))))
    assert (np.abs(start - expected) / posterior_sd).max() > 10  # the encoder starts many sd away
    assert (np.abs(refined - numerical) < 0.01 * posterior_sd).all()


def test_log_posterior_is_the_gaussian_density_plus_the_prior(linear):
    from scipy import stats

    model, a, c, images = linear
    z = np.random.default_rng(3).normal(size=(len(images), LATENT)).astype(np.float32)
    expected = [stats.norm.logpdf(x.reshape(-1), a @ zi + c, PIXEL_SD).sum() + stats.norm.logpdf(zi).sum()
                for x, zi in zip(images.astype(np.float64), z.astype(np.float64))]
    np.testing.assert_allclose(model.log_posterior(images, z), expected, rtol=1e-5)


# --- guarantees on a nonlinear model ---------------------------------------------------------

@pytest.fixture(scope="module")
def nonlinear():
    torch.manual_seed(0)
    config = ModelConfig(latent_dim=4, hidden=32)
    model = TrainedModel(GalaxyVAE(config, PixelScaling(0.0, 0.05)).eval(), TrainConfig(model=config), ".", None, 0)
    return model, gaussian_blobs(10, seed=5)


def test_refinement_never_lowers_an_images_objective(nonlinear):
    model, images = nonlinear
    start = model.encode(images)[0]
    before = model.log_posterior(images, start)
    for rate in (REFINE_LEARNING_RATE, 30.0):  # 30: steps that overshoot wildly must not be kept
        refined = model.refine_latents(images, steps=40, learning_rate=rate)
        after = model.log_posterior(images, refined)
        assert (after >= before - 1e-6 * np.abs(before)).all()
    assert (model.log_posterior(images, model.refine_latents(images, steps=40)) > before + 1).all()


def test_zero_steps_return_the_encoder_mean_exactly(nonlinear):
    model, images = nonlinear
    np.testing.assert_array_equal(model.refine_latents(images, steps=0), model.encode(images)[0])
    assert model.refine_latents(images[:0], steps=5).shape == (0, 4)


def test_refinement_is_deterministic_and_per_image(nonlinear, monkeypatch):
    model, images = nonlinear
    together = model.refine_latents(images, steps=25)
    np.testing.assert_array_equal(together, model.refine_latents(images, steps=25))
    monkeypatch.setattr(runs, "REFINE_BATCH", 3)  # other chunk-mates must not change an image's z
    np.testing.assert_allclose(model.refine_latents(images, steps=25), together, atol=1e-4)


def test_bad_refinement_settings_are_input_errors(nonlinear):
    model, images = nonlinear
    for steps, rate, name in ((-1, 0.1, "steps"), (2.5, 0.1, "steps"), (5, 0.0, "learning_rate"),
                              (5, -1.0, "learning_rate"), (5, float("nan"), "learning_rate")):
        with pytest.raises(InputError, match=name):
            model.refine_latents(images, steps, rate)
    with pytest.raises(InputError, match="3 latents"):
        model.log_posterior(images, np.zeros((3, 4), np.float32))


# --- evaluate --refine-steps -----------------------------------------------------------------

REFINE_STEPS = 30


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from galaxyvae.training import train

    folder = tmp_path_factory.mktemp("refine")
    data = write_blob_dataset(folder / "blobs.h5", n=64, n_held_out=12, seed=0)
    config = TrainConfig(epochs=3, batch_size=16, seed=0, device="cpu", compile="off", threads=1,
                         model=ModelConfig(latent_dim=4, hidden=32))
    train(data, folder / "run", config, progress=False)
    return folder / "run", data


@pytest.fixture(scope="module")
def refined_evaluation(trained_run):
    from galaxyvae import baselines

    calls = {"gaussian": 0, "sersic": 0}
    fitters = {name: getattr(baselines, f"fit_{name}") for name in calls}

    def counting(name):
        def fit(*args, **kwargs):
            calls[name] += 1
            return fitters[name](*args, **kwargs)
        return fit

    with pytest.MonkeyPatch.context() as patch:
        for name in calls:
            patch.setattr(baselines, f"fit_{name}", counting(name))
        result = evaluation.evaluate(trained_run[0], importance_samples=2, progress=False,
                                     refine_steps=REFINE_STEPS, refine_learning_rate=0.1)
    return result, calls


def test_refined_evaluation_writes_the_documented_columns_and_keys(trained_run, refined_evaluation):
    run_dir, _ = trained_run
    result, calls = refined_evaluation
    assert calls == {"gaussian": 1, "sersic": 1}  # the fits are shared by both reconstructions
    columns = read_csv_columns(run_dir / "per_image.csv")
    expected = {"mse_vae_refined", "loglik_vae_refined"} | {
        f"{kind}_win_{b}_refined" for b in ("gaussian", "sersic") for kind in ("mse", "likelihood")}
    assert expected <= set(columns) and len(columns["index"]) == 12
    summary = json.loads((run_dir / "evaluation.json").read_text())
    refined = summary["refined"]
    assert refined["steps"] == REFINE_STEPS and refined["learning_rate"] == 0.1
    assert {"mean_mse", "median_mse", "mean_loglik_nats"} <= set(refined["vae"])
    number = {k: np.array(v, float) for k, v in columns.items() if k.startswith(("mse_vae", "loglik"))}
    assert refined["vae"]["mean_mse"] == pytest.approx(number["mse_vae_refined"].mean(), rel=1e-12)
    assert refined["vae"]["mean_loglik_nats"] == pytest.approx(number["loglik_vae_refined"].mean(), rel=1e-12)
    for name in ("gaussian", "sersic"):
        wins = {kind: np.array(columns[f"{kind}_win_{name}_refined"]) == "True" for kind in ("mse", "likelihood")}
        np.testing.assert_array_equal(wins["mse"], number["mse_vae_refined"] < np.array(columns[f"mse_{name}"], float))
        np.testing.assert_array_equal(wins["likelihood"],
                                      number["loglik_vae_refined"] > np.array(columns[f"loglik_{name}"], float))
        block = refined["baselines"][name]
        assert block["mse_win_fraction"] == pytest.approx(wins["mse"].mean())
        assert block["likelihood_win_fraction"] == pytest.approx(wins["likelihood"].mean())
        assert len(block["mse_win_ci95"]) == len(block["likelihood_win_ci95"]) == 2
    # the amortised headline is untouched by refinement
    assert summary["baselines"]["gaussian"]["mse_win_fraction"] == pytest.approx(
        np.mean(np.array(columns["mse_win_gaussian"]) == "True"))
    assert "refinement" in summary["seconds"]


def test_refined_numbers_are_those_of_f_mu_at_the_refined_latents(trained_run, refined_evaluation):
    from galaxyvae.dataset import read_dataset

    run_dir, data = trained_run
    result, _ = refined_evaluation
    model = load_run(run_dir)
    images = read_dataset(data, split="held_out").images
    z = model.refine_latents(images, REFINE_STEPS, learning_rate=0.1)
    mean, variance = model.decode(z)
    residual = images.astype(np.float64) - mean
    mse = (residual ** 2).reshape(len(images), -1).mean(axis=1)
    loglik = -0.5 * (np.log(2 * np.pi * variance.astype(np.float64)) + residual ** 2 / variance).sum(axis=(1, 2))
    np.testing.assert_allclose(result.per_image["mse_vae_refined"], mse, rtol=1e-5)
    np.testing.assert_allclose(result.per_image["loglik_vae_refined"], loglik, rtol=1e-5)
    np.testing.assert_array_equal(result.per_image["mse_win_gaussian_refined"], mse < result.per_image["mse_gaussian"])
    # refinement maximises the log posterior, so the likelihood term rises on (nearly) every image
    assert np.mean(result.per_image["loglik_vae_refined"] >= result.per_image["loglik_vae"]) >= 0.9


def test_table_puts_amortised_and_refined_side_by_side(trained_run, refined_evaluation):
    from galaxyvae.report import markdown_to_html

    run_dir, _ = trained_run
    table = (run_dir / "table.md").read_text()
    assert "Gaussian x̂: amortised f_μ(g_μ(x)) | Gaussian x̂: refined f_μ(z*)" in table
    assert "the paper's definition" in table
    assert f"{REFINE_STEPS} steps of Adam (learning rate 0.1)" in table
    assert "97.1%" in table and "97.2%" in table
    assert markdown_to_html(table).count("<table>") == 4


def test_report_shows_the_refined_numbers_beside_the_amortised(trained_run, refined_evaluation, tmp_path):
    from galaxyvae.report import render_report

    run_dir, _ = trained_run
    summary = refined_evaluation[0].summary
    html_from_table = render_report(run_dir)
    assert "refined f_μ(z*)" in html_from_table and "amortised f_μ(g_μ(x))" in html_from_table
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "evaluation.json").write_text(json.dumps(evaluation._finite_or_none(summary)))
    page = render_report(bare)  # no table.md: the tables come from evaluation.json
    refined_mse = summary["refined"]["baselines"]["sersic"]["mse_win_fraction"]
    assert "refined f_mu(z*)" in page and "amortised f_mu(g_mu(x))" in page
    assert f"{100 * refined_mse:.1f}%" in page
    assert f"z refined for its posterior ({REFINE_STEPS} optimiser steps)" in page


def test_without_refinement_nothing_refined_is_written(trained_run, tmp_path):
    run_dir, _ = trained_run
    other = write_blob_dataset(tmp_path / "plain.h5", n=10, n_held_out=4, seed=7)
    result = evaluation.evaluate(run_dir, other, importance_samples=2, progress=False)
    assert "refined" not in result.summary and "refinement" not in result.summary["seconds"]
    assert not [name for name in result.per_image if "refined" in name]
    assert "z*" not in result.table_markdown()


@pytest.mark.parametrize("options, named", [
    (["--refine-steps", "-1"], "--refine-steps"),
    (["--refine-steps", "10", "--refine-lr", "0"], "--refine-lr"),
    (["--refine-steps", "10", "--refine-lr", "-0.5"], "--refine-lr"),
    (["--refine-steps", "10", "--refine-lr", "nan"], "--refine-lr"),
    (["--refine-lr", "0.1"], "--refine-steps"),
])
def test_cli_rejects_bad_refinement_options(trained_run, capsys, options, named):
    run_dir, _ = trained_run
    assert main(["evaluate", str(run_dir), "--overwrite", "--no-progress"] + options) == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1


def test_library_names_the_bad_argument(trained_run):
    with pytest.raises(InputError, match="refine_steps"):
        evaluation.evaluate(trained_run[0], refine_steps=-3)
    with pytest.raises(InputError, match="refine_learning_rate"):
        evaluation.evaluate(trained_run[0], refine_steps=3, refine_learning_rate=0)


def test_cli_help_states_the_tuned_default_rate(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert f"default {REFINE_LEARNING_RATE:g}" in capsys.readouterr().out
