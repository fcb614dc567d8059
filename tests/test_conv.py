"""The convolutional architecture (``ModelConfig.arch="conv"``): same interface, likelihood and
run directories as the paper's MLP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from galaxyvae.cli import main
from galaxyvae.config import ModelConfig, TrainConfig
from galaxyvae.dataset import read_dataset
from galaxyvae.errors import InputError
from galaxyvae.evaluation import evaluate
from galaxyvae.model import GalaxyVAE, PixelScaling, ResizeConvolution, count_parameters, feature_map_sides
from galaxyvae.runs import RunPaths, TrainedModel, load_checkpoint, load_run
from galaxyvae.training import DistributedContext, Trainer, train
from tests.helpers import write_blob_dataset
from tests.test_distributed import free_port

TINY = dict(arch="conv", conv_channels=4, hidden=16)
TINY_TRAIN = dict(epochs=2, batch_size=8, compile="off", threads=1, device="cpu")


def conv_model(seed=0, **changes):
    torch.manual_seed(seed)
    settings = dict(arch="conv", image_size=9, latent_dim=3, conv_channels=4, conv_layers=2, hidden=16)
    return GalaxyVAE(ModelConfig(**{**settings, **changes})).double()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("conv") / "blobs.h5", n=48, n_held_out=8)


# --- shapes and sizes -------------------------------------------------------------------------

def test_feature_maps_halve_69_pixels_to_35_18_and_9():
    assert feature_map_sides(69, 3) == [69, 35, 18, 9]
    assert feature_map_sides(16, 2) == [16, 8, 4]


@pytest.mark.parametrize("side, layers", [(2, 1), (9, 3), (16, 2), (23, 4), (69, 3), (70, 3)])
def test_encode_and_decode_have_the_mlp_shapes_for_any_image_size(side, layers):
    model = GalaxyVAE(ModelConfig(arch="conv", image_size=side, latent_dim=5, conv_channels=4, conv_layers=layers,
                                  hidden=16))
    x = torch.randn(3, side * side)
    q_mean, q_log_var = model.encode(x)
    assert q_mean.shape == q_log_var.shape == (3, 5)
    mean, log_var = model.decode(q_mean)
    assert mean.shape == log_var.shape == (3, side * side)
    low, high = model.pixel_log_var_bounds
    assert torch.isfinite(mean).all() and ((log_var >= low) & (log_var <= high)).all()
    loss = model.negative_elbo(x, torch.randn(2, 3, 5))
    assert loss.shape == (3,) and torch.isfinite(loss).all()


def test_settings_the_conv_cannot_handle_are_input_errors():
    with pytest.raises(InputError, match="conv_layers must be at most 3 for 8-pixel images"):
        GalaxyVAE(ModelConfig(arch="conv", image_size=8, conv_layers=4))
    with pytest.raises(InputError, match="at least 2 x 2 pixels"):
        GalaxyVAE(ModelConfig(arch="conv", image_size=1))
    with pytest.raises(InputError, match="conv_channels must be at least 1"):
        GalaxyVAE(ModelConfig(arch="conv", conv_channels=0))
    with pytest.raises(InputError, match="arch must be 'mlp' or 'conv'"):
        GalaxyVAE(ModelConfig(arch="resnet"))


def conv_parameter_count(side, latent_dim, channels, layers, hidden, hidden_layers):
    """Parameters from the layer shapes: 3x3 kernels plus biases, dense weights plus biases."""
    sides = [side]
    for _ in range(layers):
        sides.append(-(-sides[-1] // 2))
    widths = [1] + [channels * 2 ** i for i in range(layers)]
    convs = sum((c_in * 9 + 1) * c_out for c_in, c_out in zip(widths[:-1], widths[1:]))
    flat = widths[-1] * sides[-1] ** 2
    encoder_dense = (flat * hidden + hidden) + (hidden_layers - 1) * (hidden * hidden + hidden)
    encoder_head = hidden * 2 * latent_dim + 2 * latent_dim
    decoder_dense = ((latent_dim * hidden + hidden) + (hidden_layers - 1) * (hidden * hidden + hidden)
                     + (hidden * flat + flat))
    upsampling = sum((c_in * 9 + 1) * c_out for c_in, c_out in zip(widths[:1:-1], widths[-2:0:-1]))
    decoder_head = (widths[1] * 9 + 1) * 2
    return convs + encoder_dense + encoder_head + decoder_dense + upsampling + decoder_head


def test_default_conv_has_1415330_parameters_as_counted_from_its_layer_shapes():
    expected = conv_parameter_count(69, 8, 16, 3, 128, 2)
    assert expected == 1_415_330
    assert count_parameters(GalaxyVAE(ModelConfig(arch="conv"))) == expected
    config = ModelConfig(arch="conv", image_size=23, latent_dim=3, conv_channels=5, conv_layers=4, hidden=24,
                         hidden_layers=3)
    assert count_parameters(GalaxyVAE(config)) == conv_parameter_count(23, 3, 5, 4, 24, 3)


def test_the_conv_has_the_mlp_parts_and_each_network_uses_only_its_own():
    """Freezing 'the encoder' or 'the decoder' (fine-tuning) must mean the same for both architectures."""
    model = conv_model()
    assert [name for name, _ in model.named_children()] == [
        name for name, _ in GalaxyVAE(ModelConfig(image_size=9, latent_dim=3, hidden=16)).named_children()]
    encoder = {id(p) for part in (model.encoder, model.encoder_head) for p in part.parameters()}
    decoder = {id(p) for part in (model.decoder, model.decoder_head) for p in part.parameters()}
    assert len(encoder) + len(decoder) == len(list(model.parameters()))
    q_mean, q_log_var = model.encode(torch.randn(2, 81, dtype=torch.float64))
    mean, log_var = model.decode(torch.randn(2, 3, dtype=torch.float64))
    for outputs, own in (((q_mean, q_log_var), encoder), ((mean, log_var), decoder)):
        grads = torch.autograd.grad(sum(o.sum() for o in outputs), list(model.parameters()), allow_unused=True)
        assert {id(p) for p, g in zip(model.parameters(), grads) if g is not None} == own


# --- the upsampling layer -------------------------------------------------------------------------

@pytest.mark.parametrize("side_in, side_out", [(35, 69), (18, 35), (9, 18), (1, 1), (2, 3)])
def test_resize_convolution_is_nearest_upsampling_then_a_3x3_convolution(side_in, side_out):
    torch.manual_seed(1)
    layer = ResizeConvolution(5, 3, side_out).double()
    x = torch.randn(2, 5, side_in, side_in, dtype=torch.float64)
    upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
    expected = F.conv2d(upsampled, layer.weight, layer.bias, padding=1)[:, :, :side_out, :side_out]
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_resize_convolution_paints_no_checkerboard_where_a_transposed_convolution_does():
    """A constant feature map must upsample to a constant image away from the border."""
    torch.manual_seed(2)
    constant = torch.ones(1, 4, 10, 10, dtype=torch.float64)
    resized = ResizeConvolution(4, 1, 20).double()(constant)[0, 0, 2:-2, 2:-2]
    assert resized.std() < 1e-12
    transposed = torch.nn.ConvTranspose2d(4, 1, 3, stride=2, padding=1).double()(constant)[0, 0, 2:-2, 2:-2]
    assert transposed.std() > 1e-3


# --- the objective ----------------------------------------------------------------------------------

def test_the_two_output_channels_are_the_per_pixel_mean_and_log_variance():
    model = conv_model()
    z = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        raw = model.decoder_head(model.decoder(z))
        mean, log_var = model.decode(z)
        model.decoder_head.bias[1] -= 1.0
        lowered_mean, lowered_log_var = model.decode(z)
    assert raw.shape == (2, 2, 9, 9)
    torch.testing.assert_close(mean, raw[:, 0].reshape(2, 81))
    torch.testing.assert_close(log_var, raw[:, 1].reshape(2, 81))  # inside the bounds: the identity
    torch.testing.assert_close(lowered_mean, mean)
    torch.testing.assert_close(lowered_log_var, log_var - 1.0)


def test_loss_and_gradients_stay_finite_for_extreme_outputs_and_inputs():
    model = conv_model()
    with torch.no_grad():
        model.decoder_head.bias[0] = 1e6          # absurd means
        model.decoder_head.bias[1] = -1e8         # log-variances far below the floor
        model.encoder_head.bias[3:] = 1e8         # latent variances far above the ceiling
    loss = model.negative_elbo(torch.full((2, 81), 1e8, dtype=torch.float64),
                               torch.randn(1, 2, 3, dtype=torch.float64)).sum()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- runs ------------------------------------------------------------------------------------------

def test_cli_trains_a_conv_run_that_reloads_to_the_in_memory_model(tmp_path, blobs):
    """`galaxyvae train --arch conv` and the library with the same settings train the same weights;
    load_run gives the in-memory model's outputs; evaluate works on the run."""
    assert main(["train", str(blobs), "--out", str(tmp_path / "cli"), "--arch", "conv", "--conv-channels", "4",
                 "--hidden", "16", "--epochs", "2", "--batch-size", "8", "--compile", "off", "--threads", "1",
                 "--device", "cpu"]) == 0
    stored = json.loads((tmp_path / "cli" / "config.json").read_text())["model"]
    assert (stored["arch"], stored["conv_channels"], stored["conv_layers"]) == ("conv", 4, 3)

    config = TrainConfig(**TINY_TRAIN, model=ModelConfig(**TINY))
    trainer = Trainer(blobs, tmp_path / "library", config, False, None, False, DistributedContext())
    try:
        trainer.run()
    finally:
        trainer.close()
    in_memory = trainer.model.eval()
    loaded = load_run(tmp_path / "cli", device="cpu", checkpoint="last")
    assert loaded.config.model == config.model
    for name, value in in_memory.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name

    images = read_dataset(blobs, split="held_out").images
    with torch.no_grad():
        q_mean, q_log_var = in_memory.encode(in_memory.scale(torch.from_numpy(images)))
        mean, log_var = in_memory.decode(q_mean)
    encoded = loaded.encode(images)
    np.testing.assert_array_equal(encoded[0], q_mean.numpy())
    np.testing.assert_array_equal(encoded[1], torch.exp(q_log_var).numpy())
    decoded = loaded.decode(encoded[0])
    np.testing.assert_array_equal(decoded[0], in_memory.unscale_mean(mean).numpy())
    np.testing.assert_array_equal(decoded[1], in_memory.unscale_variance(torch.exp(log_var)).numpy())

    result = evaluate(tmp_path / "cli", importance_samples=4, progress=False)
    assert result.summary["n_images"] == 8 and np.isfinite(result.summary["vae"]["elbo_nats"])


def test_runs_written_before_the_conv_settings_existed_still_load_and_resume(tmp_path, blobs):
    run = train(blobs, tmp_path / "old", TrainConfig(**TINY_TRAIN, model=ModelConfig(hidden=16)), progress=False)
    paths = RunPaths(run)
    config = json.loads(paths.config.read_text())
    for key in ("conv_channels", "conv_layers"):
        del config["model"][key]
    paths.config.write_text(json.dumps(config))
    for which in ("best", "last"):
        record = torch.load(paths.checkpoint(which), weights_only=True)
        for key in ("conv_channels", "conv_layers"):
            del record["model_config"][key]
        torch.save(record, paths.checkpoint(which))
    images = read_dataset(blobs, split="held_out").images
    before = load_run(run, checkpoint="last")
    assert before.config.model == ModelConfig(hidden=16) and before.reconstruct(images).shape == (8, 69, 69)
    train(blobs, run, TrainConfig(**{**TINY_TRAIN, "epochs": 3}), resume=True, progress=False)
    assert list(load_run(run).history()["epoch"]) == [1, 2, 3]


def test_a_briefly_trained_conv_fits_held_out_blobs_better_than_at_initialisation(tmp_path):
    """Held-out ELBO and reconstruction error must improve on the untrained network, and the
    reconstructions must follow each image (far better than the mean training image): z is used."""
    blobs = write_blob_dataset(tmp_path / "blobs.h5", n=160, n_held_out=8)
    config = TrainConfig(epochs=40, batch_size=16, learning_rate=3e-3, compile="off", threads=1, device="cpu",
                         model=ModelConfig(arch="conv", conv_channels=8, hidden=32))
    run = train(blobs, tmp_path / "run", config, progress=False)
    dataset = read_dataset(blobs)
    train_images, held_out = dataset.images[~dataset.held_out], dataset.images[dataset.held_out]
    torch.manual_seed(config.seed)  # the initial weights, as train draws them
    untrained = TrainedModel(GalaxyVAE(config.model, PixelScaling.fit(train_images)), config, run, blobs, 0)
    trained = load_run(run)

    def mse(model):
        return float(((model.reconstruct(held_out) - held_out) ** 2).mean())

    assert trained.elbo(held_out, mc_samples=8).mean() > untrained.elbo(held_out, mc_samples=8).mean() + 5000
    mean_image_mse = float(((train_images.mean(0) - held_out) ** 2).mean())
    assert mse(trained) < 0.6 * mean_image_mse < mean_image_mse < mse(untrained)


def test_two_gloo_processes_train_the_conv_like_one_process_seeing_the_whole_batch(tmp_path, blobs):
    options = ["--arch", "conv", "--conv-channels", "4", "--hidden", "16", "--epochs", "2", "--batch-size", "8",
               "--compile", "off", "--device", "cpu"]
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "galaxyvae.cli", "-q", "train", str(blobs), "--out", str(tmp_path / "ddp"), *options]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[:6000]
    single = train(blobs, tmp_path / "single", TrainConfig(**TINY_TRAIN, model=ModelConfig(**TINY)), progress=False)
    ddp, one = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (tmp_path / "ddp", single))
    assert ddp["world_size"] == 2 and ddp["step"] == one["step"]
    for name, weight in one["model_state"].items():
        difference = (ddp["model_state"][name] - weight).norm()
        assert difference <= 1e-4 * weight.norm() + 1e-6, name
