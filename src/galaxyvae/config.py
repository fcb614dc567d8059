"""Typed configuration of the model and of training, with the paper's values as defaults.

A config is saved as JSON in every run directory, so a run can be reloaded without guessing
its shape; the ``galaxyvae train`` options are generated from these dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any


DISPLAY_PIXEL_VARIANCE_MAX = 10.0
"""The suggested ceiling of f_sigma, in sky-noise variances, for display-level pixels (an asinh or gamma
stretch, 8-bit pictures). The stretch compresses the noise of bright pixels to at most the sky's, so a
ceiling of 50, set for the Poisson noise of linear pixels, lets f_sigma absorb the model's misfit of the
cores and the MSE suffers; a ceiling near 1 charges every misfit and the likelihood suffers. 10 maximised
the smallest of the four cross-validated win fractions on the Hubble Deep Field training cutouts
(``experiments/hdf_ceiling_cv.py``, docs/transfer.md); linear pixels keep ``ModelConfig.pixel_variance_max``."""


@dataclass
class ModelConfig:
    """Shape of the VAE. Defaults are the paper's: 69x69 pixels, z 8-dimensional, two hidden
    layers of 128 ReLU units in both encoder g and decoder f.

    ``arch="conv"`` puts ``conv_layers`` stride-2 convolutions (``conv_channels`` channels,
    doubling at each layer) before the hidden layers of g and their mirror image, upsampling
    convolutions, after those of f (see ``docs/model.md``); the conv settings are ignored by the MLP.

    The variance bounds guard the exponential output nonlinearities (see ``docs/model.md``);
    they are in units of the scaled pixels, where 1 is the sky-noise variance.
    """

    image_size: int = field(default=69, metadata={"help": "side of the square images in pixels"})
    latent_dim: int = field(default=8, metadata={"help": "dimension of z"})
    hidden: int = field(default=128, metadata={"help": "units per hidden layer"})
    hidden_layers: int = field(default=2, metadata={"help": "hidden layers in encoder and decoder"})
    arch: str = field(default="mlp", metadata={
        "help": "mlp: the paper's perceptrons; conv: convolutions around the hidden layers",
        "choices": ["mlp", "conv"]})
    conv_channels: int = field(default=16, metadata={
        "help": "channels of the first convolution of g (arch conv); each further layer doubles them"})
    conv_layers: int = field(default=3, metadata={
        "help": "stride-2 convolutions in g, mirrored in f (arch conv); 3 halve 69 pixels to 35, 18, 9"})
    pixel_variance_min: float = field(
        default=1e-4, metadata={"help": "soft floor of the per-pixel variance f_sigma, in sky-noise variances"})
    pixel_variance_max: float = field(
        default=50.0, metadata={"help": "soft ceiling of the per-pixel variance f_sigma, in sky-noise variances: "
                                        "above the noise of the brightest pixels, so f_sigma cannot hide misfit "
                                        f"(display-level pixels: {DISPLAY_PIXEL_VARIANCE_MAX:g}, "
                                        "see docs/transfer.md)"})
    latent_variance_min: float = field(
        default=1e-6, metadata={"help": "soft floor of the variances g_sigma of q(z|x)"})
    latent_variance_max: float = field(
        default=1e2, metadata={"help": "soft ceiling of the variances g_sigma of q(z|x)"})


@dataclass
class TrainConfig:
    """How to fit the model by stochastic variational inference."""

    epochs: int = field(default=100, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=128, metadata={"help": "images per gradient step (over all processes)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam step size"})
    lr_schedule: str = field(default="cosine", metadata={
        "help": "cosine: decays the step size to zero over the run (half a cosine); constant: the step size "
                "throughout",
        "choices": ["constant", "cosine"]})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batching and noise"})
    validation_fraction: float = field(default=0.02, metadata={
        "help": "fraction of the training split set aside (drawn with --seed) whose ELBO picks the best "
                "checkpoint; the held-out split is never used in training"})
    checkpoint_metric: str = field(default="elbo", metadata={
        "help": "what picks best.pt on the validation subset: elbo (highest ELBO), or mse (lowest pixel MSE of "
                "the reconstruction f_mu(g_mu(x)))", "choices": ["elbo", "mse"]})
    mc_samples: int = field(default=1, metadata={"help": "reparameterised samples of z per image (k)"})
    augment: bool = field(default=False, metadata={"help": "random flips and 90-degree rotations"})
    augment_shift: int = field(default=0, metadata={
        "help": "also shift each training image by a random whole number of pixels, from -N to N along "
                "each axis, wrapping round the stamp edges (0: no shifts; at most an eighth of the side)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, or bf16 autocast of the matrix products (the loss stays fp32)", "choices": ["fp32", "bf16"]})
    compile: str = field(default="auto", metadata={
        "help": "torch.compile the training step: on, off, or auto (on unless the training split is tiny)",
        "choices": ["auto", "on", "off"]})
    threads: int = field(default=0, metadata={
        "help": "CPU threads per process; 0: OMP_NUM_THREADS if set, else the available cores"})
    freeze: str = field(default="none", metadata={
        "help": "with --init, weights kept fixed while fine-tuning: none, encoder (g), decoder (f), "
                "decoder-body (f's hidden layers; its output layer still learns), or mean (all that "
                "f_mu(g_mu(x)) depends on: only f_sigma's output weights learn, e.g. under a new "
                "--pixel-variance-max)",
        "choices": ["none", "encoder", "decoder", "decoder-body", "mean"]})
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError naming them."""
        return _from_dict(cls, data)


def _from_dict(cls, data: dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {', '.join(sorted(unknown))}")
    values = {}
    for name, value in data.items():
        sub = known[name].default_factory if dataclasses.is_dataclass(known[name].default_factory) else None
        values[name] = _from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**values)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one ``--option`` per field of the dataclass ``cls`` (nested dataclasses flattened).

    Booleans become ``--flag`` / ``--no-flag``; help shows the field's default. Options left out
    parse as None, so ``given_arguments`` can tell a default from a value the user typed.
    """
    for f in fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            add_config_arguments(parser, f.default_factory)
            continue
        option = "--" + f.name.replace("_", "-")
        default = f.default
        kwargs = {"default": None, "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if isinstance(default, bool):
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(option, type=type(default), choices=f.metadata.get("choices"), **kwargs)


def config_from_arguments(args: argparse.Namespace, cls):
    """Build the dataclass ``cls`` from parsed arguments made by ``add_config_arguments``;
    options not given take the field's default."""
    values = {}
    for f in fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            values[f.name] = config_from_arguments(args, f.default_factory)
        elif getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def given_arguments(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The settings of ``cls`` (nested ones flattened) that were given on the command line."""
    given = {}
    for f in fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            given.update(given_arguments(args, f.default_factory))
        elif getattr(args, f.name) is not None:
            given[f.name] = getattr(args, f.name)
    return given
