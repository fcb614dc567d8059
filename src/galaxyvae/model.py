"""The paper's VAE: a decoder that gives every pixel its own mean and its own variance.

Generative model (Regier, McAuliffe & Prabhat)::

    z ~ N(0, I)                                   (latent_dim, default 8)
    x | z ~ N(f_mu(z), diag f_sigma(z))           (69 * 69 = 4,761 pixels)

and the variational posterior ``q(z | x) = N(g_mu(x), diag g_sigma(x))``. Both f and g are
multilayer perceptrons (two hidden layers of 128 ReLU units by default); the two variance
outputs pass through exponential nonlinearities of a softly bounded log-variance (see
``bounded_log_variance``), so that the loss is finite for any finite input.

With ``ModelConfig.arch="conv"`` (not in the paper), g starts with stride-2 convolutions
(69 -> 35 -> 18 -> 9 pixels) before its hidden layers, and f ends with their mirror image,
upsampling convolutions back to the full image, whose last layer has two output channels: the
per-pixel mean and the per-pixel log-variance. The likelihood, the posterior and the interface
are the same for both architectures; both name their parts ``encoder``, ``encoder_head``
(the layer giving g_mu, log g_sigma), ``decoder`` and ``decoder_head`` (the layer giving f_mu,
log f_sigma).

The network works on *scaled* pixels (``PixelScaling``: subtract a robust offset, divide by
the sky-noise scale), fitted on the training split and stored with the weights as buffers.
Every likelihood that leaves galaxyvae (``galaxyvae.runs``, the training log) is converted
back to the data set's pixel units with the log-Jacobian ``GalaxyVAE.log_jacobian``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galaxyvae.config import ModelConfig
from galaxyvae.errors import InputError

LOG_2PI = math.log(2 * math.pi)
BORDER_WIDTH = 5
"""Width in pixels of the stamp border whose pixels estimate the sky level and noise."""
MAD_TO_SIGMA = 1.482602218505602
"""Median absolute deviation of a normal distribution, in standard deviations: 1 / Phi^-1(3/4)."""
KNEE = 2.0
"""Nats inside each log-variance bound where the soft bending starts (``bounded_log_variance``)."""
SCALING_SAMPLE = 4096
"""Images (evenly spaced through the training split) used to fit the pixel scaling."""


@dataclass(frozen=True)
class PixelScaling:
    """The affine map between data units and the network's units: ``scaled = (x - offset) / scale``.

    offset: a robust sky level in data units (median of the stamps' border pixels)
    scale:  a robust sky-noise standard deviation in data units (1.4826 x their MAD)

    Densities transform with the Jacobian: ``log p(x) = log p(scaled) - n_pixels * log(scale)``.
    """

    offset: float
    scale: float

    @classmethod
    def fit(cls, images: np.ndarray) -> "PixelScaling":
        """Fit on training images (N, H, W) in data units, from the pixels within ``BORDER_WIDTH``
        of the edge, where the sky dominates: offset = median, scale = 1.4826 x MAD.

        If the border is constant (e.g. quantised or zero-padded images), the scale falls back to
        the standard deviation of all pixels, and to 1 for constant images.
        """
        images = np.asarray(images)
        if images.ndim != 3 or len(images) == 0:
            raise InputError(f"pixel scaling: expected training images of shape (N, H, W) with N > 0, got {images.shape}")
        step = max(1, len(images) // SCALING_SAMPLE)
        sample = images[::step].astype(np.float64)
        border = np.ones(sample.shape[1:], bool)
        border[BORDER_WIDTH:-BORDER_WIDTH, BORDER_WIDTH:-BORDER_WIDTH] = False
        sky = sample[:, border]
        offset = float(np.median(sky))
        scale = MAD_TO_SIGMA * float(np.median(np.abs(sky - offset)))
        if not scale > 0:
            scale = float(sample.std())
        if not scale > 0 or not math.isfinite(scale):
            scale = 1.0
        return cls(offset=offset, scale=scale)

    def to_dict(self) -> dict[str, float]:
        """Plain numbers for JSON and checkpoints."""
        return {"offset": float(self.offset), "scale": float(self.scale)}


def bounded_log_variance(raw: torch.Tensor, log_min: float, log_max: float) -> torch.Tensor:
    """A log-variance equal to ``raw`` inside [log_min + KNEE, log_max - KNEE] that bends smoothly onto the bounds.

    Beyond a knee at ``t = log_max - KNEE`` the value is ``t + KNEE * s / (1 + s)`` with
    ``s = (raw - t) / KNEE`` (and the mirror image below ``log_min + KNEE``): continuous with slope 1
    at the knee, strictly increasing, and never outside [log_min, log_max]. So ``exp`` of it is the
    paper's exponential nonlinearity wherever the variance is sensible, always a positive, finite
    variance above a floor, and its gradient decays only polynomially (a pixel pushed far out can
    come back). It costs a few multiplications, no transcendental function.
    """
    knee = min(KNEE, (log_max - log_min) / 4)
    low, high = log_min + knee, log_max - knee
    over = (raw - high).clamp(min=0) / knee
    under = (low - raw).clamp(min=0) / knee
    return raw.clamp(low, high) + knee * (over / (1 + over) - under / (1 + under))


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(x; mean, exp(log_var))`` in nats (broadcasting)."""
    return -0.5 * (LOG_2PI + log_var + (x - mean).square() * torch.exp(-log_var))


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Closed-form ``KL[N(mean, diag exp(log_var)) || N(0, I)]`` over the last axis, in nats: (..., d) -> (...)."""
    return 0.5 * (torch.exp(log_var) + mean.square() - 1.0 - log_var).sum(-1)


def _full_precision(outputs: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (under bf16 autocast) as float32, so that the likelihood is never
    computed in 8-bit mantissas; float32 and float64 pass through."""
    return outputs.float() if outputs.dtype in (torch.bfloat16, torch.float16) else outputs


def _mlp(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return layers


def feature_map_sides(image_size: int, conv_layers: int) -> list[int]:
    """Sides in pixels of the conv encoder's feature maps, input first: ``conv_layers + 1`` numbers.

    A 3x3 convolution with stride 2 and padding 1 maps a side s to ceil(s / 2): 69, 35, 18, 9.
    The decoder retraces them in reverse.
    """
    sides = [image_size]
    for _ in range(conv_layers):
        sides.append((sides[-1] + 1) // 2)
    return sides


_RESIZE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))
"""Which taps of a 3x3 kernel (columns) reach each tap of the equivalent 4-tap transposed kernel (rows)
when a 2x nearest-neighbour upsampling precedes the 3x3 convolution (``ResizeConvolution``)."""


class ResizeConvolution(nn.Module):
    """2x nearest-neighbour upsampling, a 3x3 convolution (padding 1), and a crop to ``side_out``:
    (B, c_in, s, s) -> (B, c_out, side_out, side_out), side_out in {2s - 1, 2s}.

    Unlike a learned stride-2 transposed convolution, whose 3x3 kernel reaches alternate output
    pixels through 1 or 2 taps per axis and so paints a checkerboard on smooth images, every
    output pixel here sees a 2x2 neighbourhood with weights drawn from one kernel (Odena et al.
    2016, "Deconvolution and checkerboard artifacts"). It is computed as one stride-2 transposed
    convolution with a 4x4 kernel built from the 3x3 one, a quarter of the work of convolving the
    upsampled image; parameters and initialisation are those of ``nn.Conv2d(c_in, c_out, 3)``.
    """

    def __init__(self, c_in: int, c_out: int, side_out: int):
        super().__init__()
        self.side_out = side_out
        self.weight = nn.Parameter(torch.empty(c_out, c_in, 3, 3))
        self.bias = nn.Parameter(torch.empty(c_out))
        self.register_buffer("taps", torch.tensor(_RESIZE_TAPS), persistent=False)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d.reset_parameters
        bound = 1 / math.sqrt(c_in * 9)
        nn.init.uniform_(self.bias, -bound, bound)

    def transposed_kernel(self) -> torch.Tensor:
        """The (c_in, c_out, 4, 4) kernel of the equivalent stride-2 transposed convolution."""
        taps = self.taps.to(self.weight.dtype)
        return torch.einsum("ai,bj,oqij->qoab", taps, taps, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv_transpose2d(x, self.transposed_kernel(), self.bias, stride=2, padding=1)
        return out[:, :, :self.side_out, :self.side_out]


def _mlp_networks(config: ModelConfig) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """The paper's encoder, encoder head, decoder and decoder head."""
    n_pixels, hidden = config.image_size ** 2, [config.hidden] * config.hidden_layers
    return (nn.Sequential(*_mlp([n_pixels] + hidden)), nn.Linear(hidden[-1], 2 * config.latent_dim),
            nn.Sequential(*_mlp([config.latent_dim] + hidden)), nn.Linear(hidden[-1], 2 * n_pixels))


def _conv_networks(config: ModelConfig) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """Encoder: (B, pixels) -> (B, 1, S, S) -> stride-2 3x3 convolutions with ReLU -> flatten -> hidden
    layers; encoder head: a linear layer to (mean, log-variance) of z. Decoder: hidden layers -> a
    linear layer to the smallest feature map -> upsampling convolutions (``ResizeConvolution``)
    with ReLU, back through the encoder's sides; decoder head: one more, to 2 channels (mean,
    log-variance) of side S."""
    side, hidden = config.image_size, [config.hidden] * config.hidden_layers
    sides = feature_map_sides(side, config.conv_layers)
    channels = [1] + [config.conv_channels * 2 ** i for i in range(config.conv_layers)]
    smallest = (channels[-1], sides[-1], sides[-1])
    encoder: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        encoder += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
    encoder += [nn.Flatten(), *_mlp([math.prod(smallest)] + hidden)]
    decoder = [*_mlp([config.latent_dim] + hidden + [math.prod(smallest)]), nn.Unflatten(1, smallest)]
    for i in range(config.conv_layers - 1, 0, -1):
        decoder += [ResizeConvolution(channels[i + 1], channels[i], sides[i]), nn.ReLU()]
    return (nn.Sequential(*encoder), nn.Linear(hidden[-1], 2 * config.latent_dim),
            nn.Sequential(*decoder), ResizeConvolution(channels[1], 2, sides[0]))


def _check_config(config: ModelConfig) -> None:
    if config.arch not in ("mlp", "conv"):
        raise InputError(f"model arch must be 'mlp' or 'conv', not {config.arch!r}")
    sizes = ("image_size", "latent_dim", "hidden", "hidden_layers")
    for name in sizes + (("conv_channels", "conv_layers") if config.arch == "conv" else ()):
        if getattr(config, name) < 1:
            raise InputError(f"model {name} must be at least 1, not {getattr(config, name)}")
    if config.arch == "conv":
        useful = feature_map_sides(config.image_size, config.image_size).index(1)
        if useful == 0:
            raise InputError("model arch conv needs images of at least 2 x 2 pixels, not 1 x 1")
        if config.conv_layers > useful:
            raise InputError(f"model conv_layers must be at most {useful} for {config.image_size}-pixel images "
                             f"(each stride-2 convolution halves the side; {useful} leave 1 pixel), "
                             f"not {config.conv_layers}")
    for what in ("pixel", "latent"):
        low, high = getattr(config, f"{what}_variance_min"), getattr(config, f"{what}_variance_max")
        if not 0 < low < high < math.inf:
            raise InputError(f"model {what} variance bounds must satisfy 0 < min < max, got {low}, {high}")


class GalaxyVAE(nn.Module):
    """Encoder g: pixels -> (g_mu, g_sigma); decoder f: z -> (f_mu, f_sigma), per-pixel.

    Images enter as flattened, scaled pixels ``x: (B, n_pixels)`` float32 (see ``scale``), whatever
    the architecture (the conv one reshapes them to (B, 1, S, S) inside ``encoder``). The pixel
    scaling is held in the buffers ``pixel_offset`` and ``pixel_scale`` and saved with the
    weights. Outputs are in scaled units unless a method says "data units".

    Parts (the same names for both architectures, so that freezing "the encoder" means the same):
    ``encoder`` and ``encoder_head`` form g, ``decoder`` and ``decoder_head`` form f.
    """

    def __init__(self, config: ModelConfig | None = None, scaling: PixelScaling | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        _check_config(config)
        self.n_pixels = config.image_size ** 2
        self.latent_dim = config.latent_dim
        networks = _conv_networks(config) if config.arch == "conv" else _mlp_networks(config)
        self.encoder, self.encoder_head, self.decoder, self.decoder_head = networks
        self.pixel_log_var_bounds = (math.log(config.pixel_variance_min), math.log(config.pixel_variance_max))
        self.latent_log_var_bounds = (math.log(config.latent_variance_min), math.log(config.latent_variance_max))
        scaling = scaling or PixelScaling(0.0, 1.0)
        self.register_buffer("pixel_offset", torch.tensor(float(scaling.offset), dtype=torch.float64))
        self.register_buffer("pixel_scale", torch.tensor(float(scaling.scale), dtype=torch.float64))

    def set_pixel_variance_bounds(self, low: float, high: float) -> None:
        """Replace the floor and ceiling of f_sigma (sky variances) and record them in ``config``.

        The weights are kept; the raw output is bent onto the new bounds (``bounded_log_variance``),
        so a model trained under a low ceiling can have its variances refitted under a higher one
        (``--freeze mean``).
        """
        config = replace(self.config, pixel_variance_min=low, pixel_variance_max=high)
        _check_config(config)
        self.config = config
        self.pixel_log_var_bounds = (math.log(low), math.log(high))

    def variance_output_masks(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """For each parameter of ``decoder_head``, a 0/1 tensor of its shape that is 1 exactly on
        the weights and biases producing log f_sigma, 0 on those producing f_mu.

        Both heads put the means first along their output axis (dimension 0 of weight and bias):
        the MLP head's rows 0..n_pixels-1 and the conv head's channel 0, as ``decode`` reads them.
        """
        masks = []
        for parameter in self.decoder_head.parameters():
            mask = torch.ones_like(parameter)
            mask[: parameter.shape[0] // 2] = 0
            masks.append((parameter, mask))
        return masks

    # --- pixel scaling ------------------------------------------------------------------------
    @property
    def scaling(self) -> PixelScaling:
        """The stored pixel scaling."""
        return PixelScaling(float(self.pixel_offset), float(self.pixel_scale))

    def set_scaling(self, scaling: PixelScaling) -> None:
        """Replace the stored pixel scaling (before training)."""
        self.pixel_offset.fill_(float(scaling.offset))
        self.pixel_scale.fill_(float(scaling.scale))

    def scale(self, images: torch.Tensor) -> torch.Tensor:
        """Data units (B, H, W) or (B, n_pixels) -> flattened scaled pixels (B, n_pixels) float32."""
        flat = images.reshape(len(images), self.n_pixels)
        return ((flat - self.pixel_offset) / self.pixel_scale).to(torch.float32)

    def unscale_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Scaled pixel means (B, n_pixels) -> data units (B, H, W) float32."""
        side = self.config.image_size
        return (mean.double() * self.pixel_scale + self.pixel_offset).float().reshape(-1, side, side)

    def unscale_variance(self, variance: torch.Tensor) -> torch.Tensor:
        """Scaled pixel variances (B, n_pixels) -> data units (B, H, W) float32."""
        side = self.config.image_size
        return (variance.double() * self.pixel_scale ** 2).float().reshape(-1, side, side)

    def log_jacobian(self) -> float:
        """``-n_pixels * log(scale)``: add to a log-density of scaled pixels to get data units (nats)."""
        return -self.n_pixels * math.log(float(self.pixel_scale))

    # --- the two networks -----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled pixels (B, n_pixels) -> mean and log-variance of q(z|x), each (B, latent_dim)."""
        mean, raw = _full_precision(self.encoder_head(self.encoder(x))).chunk(2, dim=-1)
        return mean, bounded_log_variance(raw, *self.latent_log_var_bounds)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, latent_dim) -> f_mu and log f_sigma in scaled units, each (B, n_pixels)."""
        # The conv head's (B, 2, S, S) flattens to the MLP head's layout: all means, then all log-variances.
        mean, raw = _full_precision(self.decoder_head(self.decoder(z)).flatten(1)).chunk(2, dim=-1)
        return mean, bounded_log_variance(raw, *self.pixel_log_var_bounds)

    # --- the objective --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The per-image negative ELBO (see ``negative_elbo``); the training step calls this."""
        return self.negative_elbo(x, noise)

    def negative_elbo(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-image negative ELBO in nats, scaled units: x (B, n_pixels), noise eps (k, B, latent_dim) -> (B,).

        ``-E_q[log N(x; f_mu(z), diag f_sigma(z))] + KL[q(z|x) || N(0, I)]``, the expectation by
        the reparameterisation ``z = g_mu + sqrt(g_sigma) * eps`` averaged over the k draws, the KL
        in closed form. This is the training hot path; ``negative_elbo_reference`` computes the
        same with ``torch.distributions``.
        """
        q_mean, q_log_var = self.encode(x)
        k, batch = noise.shape[0], x.shape[0]
        z = q_mean + torch.exp(0.5 * q_log_var) * noise
        mean, log_var = self.decode(z.reshape(k * batch, self.latent_dim))
        if k > 1:
            mean, log_var = mean.reshape(k, batch, -1), log_var.reshape(k, batch, -1)
        squared = (x - mean).square() * torch.exp(-log_var)
        neg_log_lik = 0.5 * (squared + log_var).sum(-1) + 0.5 * LOG_2PI * self.n_pixels
        if k > 1:
            neg_log_lik = neg_log_lik.mean(0)
        return neg_log_lik + kl_to_standard_normal(q_mean, q_log_var)

    def negative_elbo_reference(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``negative_elbo`` written with ``torch.distributions`` (slower; the tests compare the two)."""
        from torch.distributions import Independent, Normal, kl_divergence

        q_mean, q_log_var = self.encode(x)
        q = Independent(Normal(q_mean, torch.exp(0.5 * q_log_var)), 1)
        prior = Independent(Normal(torch.zeros_like(q_mean), torch.ones_like(q_mean)), 1)
        z = q.mean + q.stddev * noise  # the same eps as the hot path, so the two agree exactly
        mean, log_var = self.decode(z.reshape(-1, self.latent_dim))
        mean, log_var = mean.reshape(*noise.shape[:2], -1), log_var.reshape(*noise.shape[:2], -1)
        log_lik = Independent(Normal(mean, torch.exp(0.5 * log_var)), 1).log_prob(x)
        return -log_lik.mean(0) + kl_divergence(q, prior)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
