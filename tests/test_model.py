import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Independent, Normal, kl_divergence

from galaxyvae.config import ModelConfig
from galaxyvae.errors import InputError
from galaxyvae.model import (
    KNEE, GalaxyVAE, PixelScaling, bounded_log_variance, count_parameters, gaussian_log_density,
    kl_to_standard_normal,
)
from tests.helpers import gaussian_blobs


def small_model(seed=0, **changes):
    torch.manual_seed(seed)
    config = ModelConfig(image_size=9, latent_dim=3, hidden=16, **changes)
    return GalaxyVAE(config).double()


def test_default_model_is_the_papers_with_1874114_parameters():
    model = GalaxyVAE()
    assert [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)] == [128, 128]
    assert model.encoder[0].in_features == 69 * 69
    assert model.encoder_head.out_features == 2 * 8
    assert model.decoder[0].in_features == 8
    assert model.decoder_head.out_features == 2 * 4761
    # encoder 4761*128+128 + 128*128+128 + 128*16+16; decoder 8*128+128 + 128*128+128 + 128*9522+9522
    assert count_parameters(model) == 1_874_114


def test_parameter_count_follows_the_config():
    config = ModelConfig(image_size=10, latent_dim=4, hidden=32, hidden_layers=3)
    p, h, d = 100, 32, 4
    expected = (p * h + h) + 2 * (h * h + h) + (h * 2 * d + 2 * d) + (d * h + h) + 2 * (h * h + h) + (h * 2 * p + 2 * p)
    assert count_parameters(GalaxyVAE(config)) == expected


def test_bad_model_settings_are_input_errors():
    with pytest.raises(InputError, match="latent_dim"):
        GalaxyVAE(ModelConfig(latent_dim=0))
    with pytest.raises(InputError, match="pixel variance bounds"):
        GalaxyVAE(ModelConfig(pixel_variance_min=1.0, pixel_variance_max=0.5))


def test_bounded_log_variance_is_the_identity_inside_and_bounded_outside():
    low, high = math.log(1e-4), math.log(1e6)
    inside = torch.linspace(low + KNEE, high - KNEE, 101, dtype=torch.float64)
    assert torch.equal(bounded_log_variance(inside, low, high), inside)
    extreme = torch.tensor([-1e30, -1e4, -50.0, 50.0, 1e4, 1e30], dtype=torch.float64, requires_grad=True)
    out = bounded_log_variance(extreme, low, high)
    assert ((out >= low) & (out <= high)).all() and ((out[1:-1] > low) & (out[1:-1] < high)).all()
    out.sum().backward()
    assert torch.isfinite(extreme.grad).all() and (extreme.grad >= 0).all()
    dense = bounded_log_variance(torch.linspace(-100, 100, 20001, dtype=torch.float64), low, high)
    assert (dense.diff() > 0).all()


def test_gaussian_log_density_matches_scipy():
    rng = np.random.default_rng(1)
    x, mean, log_var = rng.normal(size=(3, 50))
    ours = gaussian_log_density(*(torch.from_numpy(a) for a in (x, mean, log_var))).numpy()
    np.testing.assert_allclose(ours, stats.norm.logpdf(x, mean, np.exp(0.5 * log_var)), rtol=1e-12)


def test_closed_form_kl_matches_torch_distributions_and_monte_carlo():
    mean = torch.tensor([0.3, -1.2, 0.0, 2.0], dtype=torch.float64)
    log_var = torch.tensor([-0.5, 0.4, -2.0, 0.0], dtype=torch.float64)
    closed = kl_to_standard_normal(mean, log_var)
    q = Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)
    p = Independent(Normal(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)), 1)
    assert torch.allclose(closed, kl_divergence(q, p))
    z = mean + torch.exp(0.5 * log_var) * torch.randn(
        200_000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples = q.log_prob(z) - p.log_prob(z)
    standard_error = samples.std() / math.sqrt(len(samples))
    assert abs(samples.mean() - closed) < 4 * standard_error


@pytest.mark.parametrize("arch", [{}, {"arch": "conv", "conv_channels": 4, "conv_layers": 2}], ids=["mlp", "conv"])
def test_hot_path_negative_elbo_equals_the_torch_distributions_version(arch):
    model = small_model(**arch)
    x = torch.randn(5, 81, dtype=torch.float64)
    for k in (1, 3):
        noise = torch.randn(k, 5, 3, dtype=torch.float64)
        fast = model.negative_elbo(x, noise)
        grads_fast = torch.autograd.grad(fast.sum(), list(model.parameters()))
        reference = model.negative_elbo_reference(x, noise)
        grads_reference = torch.autograd.grad(reference.sum(), list(model.parameters()))
        assert torch.allclose(fast, reference, rtol=1e-12, atol=1e-9)
        for a, b in zip(grads_fast, grads_reference):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_k_samples_average_the_single_sample_estimates():
    model = small_model()
    x = torch.randn(4, 81, dtype=torch.float64)
    noise = torch.randn(3, 4, 3, dtype=torch.float64)
    singles = torch.stack([model.negative_elbo(x, noise[j:j + 1]) for j in range(3)])
    assert torch.allclose(model.negative_elbo(x, noise), singles.mean(0))


def test_negative_elbo_is_reconstruction_plus_kl_by_hand():
    """Check the reparameterisation against a direct computation with scipy for one image."""
    model = small_model()
    x = torch.randn(1, 81, dtype=torch.float64)
    eps = torch.randn(1, 1, 3, dtype=torch.float64)
    with torch.no_grad():
        q_mean, q_log_var = model.encode(x)
        z = q_mean + torch.exp(0.5 * q_log_var) * eps[0]
        mean, log_var = model.decode(z)
        log_lik = stats.norm.logpdf(x.numpy(), mean.numpy(), np.exp(0.5 * log_var.numpy())).sum()
        expected = -log_lik + float(kl_to_standard_normal(q_mean, q_log_var)[0])
        assert float(model.negative_elbo(x, eps)[0]) == pytest.approx(expected, rel=1e-10)


def test_loss_and_gradients_stay_finite_for_extreme_outputs_and_inputs():
    model = small_model()
    with torch.no_grad():
        model.decoder_head.bias[:81] = 1e6        # absurd means
        model.decoder_head.bias[81:] = -1e8       # log-variances far below the floor
        model.encoder_head.bias[3:] = 1e8         # latent variances far above the ceiling
    x = torch.full((2, 81), 1e8, dtype=torch.float64)
    loss = model.negative_elbo(x, torch.randn(1, 2, 3, dtype=torch.float64)).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_float32_loss_is_finite_when_the_variance_sits_at_its_floor():
    torch.manual_seed(0)
    model = GalaxyVAE(ModelConfig(image_size=9, latent_dim=3, hidden=16))
    with torch.no_grad():
        model.decoder_head.bias[81:] = -1e4
    x = torch.full((2, 81), 1e4)
    assert torch.isfinite(model.negative_elbo(x, torch.zeros(1, 2, 3))).all()


# --- pixel scaling ---------------------------------------------------------------------------------

def test_pixel_scaling_recovers_sky_level_and_noise():
    images = 7.0 * gaussian_blobs(300, seed=2, noise=0.0) + np.random.default_rng(3).normal(
        3.0, 2.0, (300, 69, 69)).astype(np.float32)
    scaling = PixelScaling.fit(images)
    assert scaling.offset == pytest.approx(3.0, abs=0.02)
    assert scaling.scale == pytest.approx(2.0, rel=0.02)


def test_pixel_scaling_falls_back_for_constant_borders_and_images():
    images = np.zeros((4, 69, 69), np.float32)
    images[:, 30:40, 30:40] = 5.0
    scaling = PixelScaling.fit(images)
    assert scaling.offset == 0.0 and scaling.scale == pytest.approx(images.std(), rel=1e-6)
    assert PixelScaling.fit(np.ones((3, 69, 69))).scale == 1.0
    with pytest.raises(InputError, match="pixel scaling"):
        PixelScaling.fit(np.zeros((0, 69, 69)))


def test_scaling_round_trips_and_the_jacobian_converts_densities_to_data_units():
    torch.manual_seed(0)
    scaling = PixelScaling(offset=3.5, scale=0.25)
    model = GalaxyVAE(ModelConfig(image_size=9, latent_dim=3, hidden=16), scaling).double()
    data = torch.randn(2, 9, 9, dtype=torch.float64) * 0.3 + 3.5
    scaled = model.scale(data)
    with torch.no_grad():
        mean, log_var = model.decode(torch.randn(2, 3, dtype=torch.float64))
        in_data_units = stats.norm.logpdf(
            data.numpy().reshape(2, -1), model.unscale_mean(mean).numpy().reshape(2, -1),
            np.sqrt(model.unscale_variance(torch.exp(log_var)).numpy().reshape(2, -1).astype(np.float64)),
        ).sum(1)
        via_scaled = gaussian_log_density(scaled.double(), mean, log_var).sum(-1).numpy() + model.log_jacobian()
    np.testing.assert_allclose(via_scaled, in_data_units, rtol=1e-5)
    assert model.log_jacobian() == pytest.approx(-81 * math.log(0.25))
    np.testing.assert_allclose(model.unscale_mean(scaled.double()).numpy(), data.numpy(), rtol=1e-6)


def test_scaling_is_saved_in_the_state_dict():
    model = GalaxyVAE(ModelConfig(image_size=9, latent_dim=3, hidden=16), PixelScaling(1.5, 0.5))
    copy = GalaxyVAE(ModelConfig(image_size=9, latent_dim=3, hidden=16))
    copy.load_state_dict(model.state_dict())
    assert copy.scaling == PixelScaling(1.5, 0.5)
