import math

import numpy as np
import pytest
import torch
from scipy import stats

import galaxyvae
from galaxyvae import runs
from galaxyvae.config import ModelConfig, TrainConfig
from galaxyvae.dataset import choose_held_out, read_dataset, write_dataset
from galaxyvae.errors import InputError
from galaxyvae.runs import CheckpointError, load_run
from galaxyvae.training import train
from tests.helpers import gaussian_blobs, write_blob_dataset

CONFIG = TrainConfig(epochs=3, batch_size=8, compile="off", threads=1, device="cpu", model=ModelConfig(hidden=16))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    data = write_blob_dataset(folder / "blobs.h5", n=48, n_held_out=8)
    return train(data, folder / "run", CONFIG, progress=False), data


@pytest.fixture(scope="module")
def model(trained):
    return load_run(trained[0])


@pytest.fixture(scope="module")
def images(trained):
    return read_dataset(trained[1], split="held_out").images


def test_load_run_gives_the_config_paths_and_history(trained, model):
    run_dir, data = trained
    assert galaxyvae.load_run is load_run
    assert model.config == CONFIG and model.run_dir == run_dir and model.data_path == data.resolve()
    history = model.history()
    assert set(history) == set(runs.LOG_COLUMNS) and list(history["epoch"]) == [1, 2, 3]
    assert model.epoch == 1 + int(np.argmax(history["validation_elbo"]))
    assert load_run(run_dir, checkpoint="last").epoch == 3


def test_shapes_dtypes_and_positivity(model, images):
    mean, variance = model.encode(images)
    assert mean.shape == variance.shape == (8, 8) and mean.dtype == np.float32 and (variance > 0).all()
    image_mean, image_variance = model.decode(mean)
    assert image_mean.shape == image_variance.shape == (8, 69, 69) and (image_variance > 0).all()
    np.testing.assert_array_equal(model.reconstruct(images), image_mean)
    assert model.sample(5, seed=1).shape == (5, 69, 69)
    for values in (model.log_likelihood(images), model.elbo(images), model.importance_log_likelihood(images, k=4)):
        assert values.shape == (8,) and np.isfinite(values).all()


def test_log_likelihood_is_the_gaussian_density_in_data_units(model, images):
    """scipy on the data-unit outputs of encode/decode must give what log_likelihood reports."""
    image_mean, image_variance = model.decode(model.encode(images)[0])
    expected = stats.norm.logpdf(images.astype(np.float64), image_mean.astype(np.float64),
                                 np.sqrt(image_variance.astype(np.float64))).sum(axis=(1, 2))
    np.testing.assert_allclose(model.log_likelihood(images), expected, rtol=2e-5)


def test_likelihoods_move_by_the_jacobian_when_the_data_units_change(tmp_path):
    """The same images in units 10x smaller (plus an offset) train identically in scaled units, so
    every log-density in data units shifts by exactly n_pixels * log(10)."""
    images, held_out = gaussian_blobs(48, seed=4), choose_held_out(48, 8, 0)
    attrs = {"source": "t", "pixel_units": "x", "pixel_scale_arcsec": 0.4, "sky_subtracted": True}
    base = write_dataset(tmp_path / "a.h5", images, held_out, attrs)
    rescaled = write_dataset(tmp_path / "b.h5", images * 10.0 + 5.0, held_out, attrs)
    config = TrainConfig(epochs=1, batch_size=8, compile="off", threads=1, device="cpu", model=ModelConfig(hidden=16))
    a = load_run(train(base, tmp_path / "ra", config, progress=False))
    b = load_run(train(rescaled, tmp_path / "rb", config, progress=False))
    test = images[held_out]
    shift = 69 * 69 * math.log(10.0)
    np.testing.assert_allclose(b.log_likelihood(test * 10 + 5), a.log_likelihood(test) - shift, rtol=1e-4)
    np.testing.assert_allclose(b.elbo(test * 10 + 5), a.elbo(test) - shift, rtol=1e-4)
    np.testing.assert_allclose(b.reconstruct(test * 10 + 5), a.reconstruct(test) * 10 + 5, rtol=1e-3, atol=1e-3)


def test_sampling_and_monte_carlo_estimates_are_reproducible_by_seed(model, images):
    assert np.array_equal(model.sample(3, seed=7), model.sample(3, seed=7))
    assert not np.array_equal(model.sample(3, seed=7), model.sample(3, seed=8))
    assert np.array_equal(model.elbo(images, seed=2), model.elbo(images, seed=2))
    assert np.array_equal(model.importance_log_likelihood(images, k=3, seed=2),
                          model.importance_log_likelihood(images, k=3, seed=2))


def test_elbo_and_importance_estimates_agree_with_their_definitions(model, images):
    """Mean of many one-sample importance weights = ELBO in expectation; more samples tighten the bound."""
    elbo = model.elbo(images, mc_samples=256, seed=0)
    one_sample = np.mean([model.importance_log_likelihood(images, k=1, seed=s) for s in range(64)], axis=0)
    assert np.abs(one_sample - elbo).max() < 0.05 * np.abs(elbo).max() + 50
    assert model.importance_log_likelihood(images, k=64, seed=1).mean() >= elbo.mean() - 1.0
    assert (model.elbo(images, mc_samples=64) <= model.log_likelihood(images) + 1e4).all()


def test_elbo_by_hand_for_one_image(model, images):
    """The ELBO of one image from encode/decode and scipy: E_q log N(x; f) - KL, the same noise."""
    x = images[:1]
    noise = torch.randn((1, 4, model.latent_dim), generator=torch.Generator().manual_seed(5)).numpy()
    mean, variance = model.encode(x)
    z = mean + np.sqrt(variance) * noise[0]
    image_mean, image_variance = model.decode(z)
    log_lik = stats.norm.logpdf(x.astype(np.float64), image_mean, np.sqrt(image_variance.astype(np.float64)))
    kl = 0.5 * np.sum(variance + mean ** 2 - 1 - np.log(variance))
    expected = log_lik.sum(axis=(1, 2)).mean() - kl
    assert model.elbo(x, mc_samples=4, seed=5)[0] == pytest.approx(expected, rel=1e-5)


def test_batching_does_not_change_results(model, images, monkeypatch):
    whole = model.log_likelihood(images), model.encode(images)[0], model.importance_log_likelihood(images, k=3)
    monkeypatch.setattr(runs, "INFERENCE_BATCH", 3)
    batched = model.log_likelihood(images), model.encode(images)[0], model.importance_log_likelihood(images, k=3)
    for a, b in zip(whole, batched):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # float32 sums in another order


def test_empty_inputs_give_empty_outputs(model):
    assert model.log_likelihood(np.zeros((0, 69, 69))).shape == (0,)
    assert model.encode(np.zeros((0, 69, 69)))[0].shape == (0, 8)
    assert model.decode(np.zeros((0, 8)))[0].shape == (0, 69, 69)


def test_bad_inputs_are_input_errors(model):
    with pytest.raises(InputError, match=r"images\[None\]"):
        model.reconstruct(np.zeros((69, 69)))
    with pytest.raises(InputError, match="expected shape"):
        model.encode(np.zeros((2, 32, 32)))
    with pytest.raises(InputError, match="NaN"):
        model.log_likelihood(np.full((1, 69, 69), np.nan))
    with pytest.raises(InputError, match="z: expected shape"):
        model.decode(np.zeros((2, 3)))
    with pytest.raises(InputError, match="k must be"):
        model.importance_log_likelihood(np.zeros((1, 69, 69)), k=0)


def test_missing_or_damaged_runs_are_input_errors(tmp_path, trained):
    with pytest.raises(InputError, match="no such run directory"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(InputError, match="'last' or 'best'"):
        load_run(trained[0], checkpoint="middle")
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "config.json").write_bytes((trained[0] / "config.json").read_bytes())
    (copy / "checkpoints" / "best.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="best.pt: not a readable checkpoint"):
        load_run(copy)
    torch.save({"weights": torch.zeros(3)}, copy / "checkpoints" / "best.pt")
    with pytest.raises(CheckpointError, match="not a galaxyvae checkpoint"):
        load_run(copy)


def test_device_choice(trained):
    assert load_run(trained[0], device="cpu").device == torch.device("cpu")
    with pytest.raises(InputError, match="device must be"):
        load_run(trained[0], device="abacus")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            load_run(trained[0], device="cuda")


def test_checkpoints_load_with_weights_only(trained):
    record = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    assert record["format"] == runs.CHECKPOINT_FORMAT and record["pixel_scaling"]["scale"] > 0
    assert set(record["rng"]) == {"torch"} and "optimizer_state" in record
