"""Run directories and the trained-model API.

A run directory (made by ``galaxyvae.training.train``)::

    RUN_DIR/config.json          TrainConfig.to_dict() plus {"data": absolute data-set path, "init": ...}
    RUN_DIR/versions.json        library versions, and where the run executed (device, threads, processes)
    RUN_DIR/data.json            the data set's provenance: path, size, attrs, provenance record, split sizes
    RUN_DIR/log.csv              one row per epoch (LOG_COLUMNS)
    RUN_DIR/checkpoints/last.pt  weights, pixel scaling, optimizer and progress after the latest epoch
    RUN_DIR/checkpoints/best.pt  the same after the best epoch on the validation subset (highest
                                 ELBO, or lowest MSE with checkpoint_metric "mse")

Checkpoints hold only tensors, plain containers and numbers, so they load with
``torch.load(weights_only=True)``.

``load_run(run_dir)`` returns a ``TrainedModel`` whose methods take and return numpy float32
arrays in the data set's pixel units; they run in batches on any device.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from galaxyvae._io import atomic_path
from galaxyvae.config import ModelConfig, TrainConfig
from galaxyvae.errors import InputError
from galaxyvae.model import GalaxyVAE, gaussian_log_density

CHECKPOINT_FORMAT = "galaxyvae-checkpoint"
CHECKPOINT_VERSION = 1
LOG_COLUMNS = ("epoch", "step", "train_loss", "validation_elbo", "validation_mse", "images_per_s", "seconds")
"""log.csv columns: epoch (1-based), optimizer steps so far, mean training loss (negative ELBO)
over the epoch and the ELBO of the validation subset after it (both mean nats per image in data
units), the mean pixel MSE of the validation reconstructions f_mu(g_mu(x)) (data units squared),
training throughput and wall-clock seconds of the epoch. Empty cells read as NaN. Runs made
before the validation subset existed have ``held_out_elbo`` instead (and no ``validation_mse``):
their checkpoints were chosen on the held-out split."""
INFERENCE_BATCH = 1024
"""Images per forward pass in the trained-model API."""
REFINE_BATCH = 256
"""Images whose latents ``refine_latents`` optimises together: bounds the memory autograd holds."""
REFINE_LEARNING_RATE = 0.2
"""Default Adam step size of ``refine_latents`` (z is in units of its prior's standard deviation).
Measured on the simulated-survey and Hubble Deep Field runs: with SUGGESTED_REFINE_STEPS it stops
on average within 0.03 nats of a per-image L-BFGS-polished optimum (docs/evaluation.md)."""
SUGGESTED_REFINE_STEPS = 200
"""Refinement steps that reach that optimum at REFINE_LEARNING_RATE (refinement is off by default)."""


class CheckpointError(InputError):
    """A checkpoint file is missing, unreadable, or not a galaxyvae checkpoint."""


@dataclass(frozen=True)
class RunPaths:
    """Where each file of a run directory lives."""

    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def versions(self) -> Path:
        return self.run_dir / "versions.json"

    @property
    def data(self) -> Path:
        return self.run_dir / "data.json"

    @property
    def log(self) -> Path:
        return self.run_dir / "log.csv"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>.pt`` for name "last" or "best"."""
        if name not in ("last", "best"):
            raise InputError(f"checkpoint must be 'last' or 'best', not {name!r}")
        return self.checkpoints / f"{name}.pt"


# --- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors, plain containers, numbers) to ``path`` atomically, tagged with the format."""
    record = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint file atomically (``best.pt`` from ``last.pt``)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check it is a galaxyvae checkpoint.

    Raises CheckpointError naming the file if it is missing, corrupt, or foreign.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged or unsafe files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a galaxyvae checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    if record.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {record.get('format_version')} is not the supported {CHECKPOINT_VERSION}")
    for key in ("model_config", "model_state", "epoch", "step"):
        if key not in record:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return record


def model_from_checkpoint(record: dict[str, Any], path: Path | str = "checkpoint") -> GalaxyVAE:
    """The GalaxyVAE stored in a checkpoint record (on the CPU, in eval mode)."""
    try:
        model = GalaxyVAE(ModelConfig(**record["model_config"]))
        model.load_state_dict(record["model_state"])
    except (TypeError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: weights do not fit the stored model config ({str(err)[:200]})") from None
    return model.eval()


def read_run_config(paths: RunPaths) -> tuple[TrainConfig, Path | None]:
    """The TrainConfig in config.json and the data set it names (None if it names none).

    Raises InputError if config.json is missing or not a galaxyvae training config.
    """
    if not paths.config.is_file():
        raise InputError(f"{paths.run_dir}: not a run directory (no config.json)")
    try:
        stored = json.loads(paths.config.read_text(encoding="utf-8"))
        data = stored.pop("data", None)
        stored.pop("init", None)
        return TrainConfig.from_dict(stored), Path(data) if data else None
    except (TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{paths.config}: not a galaxyvae training config ({err})") from None


# --- the log ------------------------------------------------------------------------------------------

def write_log(path: Path, rows: list[dict[str, float]]) -> None:
    """Write log.csv atomically from the history rows (LOG_COLUMNS)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_log(path: Path) -> dict[str, np.ndarray]:
    """log.csv as column name -> (epochs,) float array (empty arrays if the file has no rows)."""
    if not path.is_file():
        raise InputError(f"{path}: no training log")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = rows[0].keys() if rows else LOG_COLUMNS
    return {name: np.array([float(row[name] or "nan") for row in rows], dtype=float) for name in columns}


def selection_elbo(history: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The per-epoch ELBO that chose best.pt, (epochs,), and the split it was measured on:
    "validation", or "held-out" for runs made before a validation subset was set aside.
    Raises InputError if the history has neither column."""
    for column, split in (("validation_elbo", "validation"), ("held_out_elbo", "held-out")):
        if column in history:
            return np.asarray(history[column], dtype=float), split
    raise InputError("training history lacks column validation_elbo")


# --- the trained-model API -----------------------------------------------------------------------------

def load_run(run_dir: str | Path, device: str | torch.device | None = None, checkpoint: str = "best") -> "TrainedModel":
    """Load a trained run for inference.

    run_dir:    a directory made by ``galaxyvae train``
    device:     "cpu", "cuda", "cuda:N" or a torch.device; None picks CUDA when present
    checkpoint: "best" (the best validation epoch, see TrainConfig.checkpoint_metric) or "last"

    Raises InputError if the directory is not a run or the checkpoint is missing, corrupt or foreign.
    """
    paths = RunPaths(Path(run_dir))
    if not paths.run_dir.is_dir():
        raise InputError(f"{paths.run_dir}: no such run directory")
    config, data_path = read_run_config(paths)
    checkpoint_path = paths.checkpoint(checkpoint)
    record = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(record, checkpoint_path)
    return TrainedModel(model.to(_inference_device(device)), config, paths.run_dir, data_path, int(record["epoch"]))


def check_refine_settings(steps, learning_rate, names: tuple[str, str] = ("steps", "learning_rate")
                          ) -> tuple[int, float]:
    """The settings of ``refine_latents`` as (int, float).

    Raises InputError, naming the setting as ``names`` spell it (an argument or a CLI option),
    unless steps is a whole number >= 0 and learning_rate a positive, finite number.
    """
    steps_name, rate_name = names
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise InputError(f"{steps_name} must be a whole number of steps, 0 or more, not {steps!r}")
    try:
        rate = float(learning_rate)
    except (TypeError, ValueError):
        rate = math.nan
    if not (rate > 0 and math.isfinite(rate)):
        raise InputError(f"{rate_name} must be a positive, finite number, not {learning_rate!r}")
    return int(steps), rate


def _inference_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise InputError(f"device must be cpu, cuda, cuda:N or auto, not {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r}: CUDA is not available on this machine")
    return device


class TrainedModel:
    """A trained VAE with numpy-in, numpy-out methods in the data set's pixel units.

    Images are (N, 69, 69) float32 arrays; latents (N, d). Work is done in batches of
    ``INFERENCE_BATCH`` on ``device``; random draws come from CPU generators seeded by the
    caller, so results do not depend on the device beyond rounding.
    """

    def __init__(self, model: GalaxyVAE, config: TrainConfig, run_dir: Path, data_path: Path | None, epoch: int):
        self.model = model.eval()
        self.config = config
        self.run_dir = Path(run_dir)
        self.data_path = data_path
        self.epoch = epoch
        self.device = next(model.parameters()).device
        self.latent_dim = model.latent_dim
        self.image_size = model.config.image_size

    def __repr__(self) -> str:
        return f"TrainedModel({str(self.run_dir)!r}, epoch={self.epoch}, device={self.device})"

    # --- inputs -----------------------------------------------------------------------------
    def _images(self, images) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        side = self.image_size
        if images.ndim == 2 and images.shape == (side, side):
            raise InputError(f"images: expected a batch of shape (N, {side}, {side}); wrap one image as images[None]")
        if images.ndim != 3 or images.shape[1:] != (side, side):
            raise InputError(f"images: expected shape (N, {side}, {side}), got {images.shape}")
        if not np.isfinite(images).all():
            raise InputError("images: hold NaN or infinite pixels")
        return images

    def _latents(self, z) -> np.ndarray:
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise InputError(f"z: expected shape (N, {self.latent_dim}), got {z.shape}")
        if not np.isfinite(z).all():
            raise InputError("z: holds NaN or infinite values")
        return z

    def _batches(self, arrays: tuple[np.ndarray, ...], function: Callable[..., tuple[torch.Tensor, ...]],
                 draws: int = 1):
        """Apply ``function`` to batches of tensors on the device; concatenate its outputs as numpy.
        With ``draws`` latent draws per image, batches shrink so that each decodes at most
        INFERENCE_BATCH latents at once."""
        n = len(arrays[0])
        size = max(1, INFERENCE_BATCH // draws)
        outputs: list[list[np.ndarray]] = []
        with torch.inference_mode():
            for start in range(0, n, size):
                batch = [torch.from_numpy(np.ascontiguousarray(a[start:start + size])).to(self.device)
                         for a in arrays]
                result = function(*batch)
                result = result if isinstance(result, tuple) else (result,)
                if not outputs:
                    outputs = [[] for _ in result]
                for store, value in zip(outputs, result):
                    store.append(value.detach().cpu().numpy())
        if not outputs:
            return None
        merged = tuple(np.concatenate(parts) for parts in outputs)
        return merged if len(merged) > 1 else merged[0]

    def _noise(self, shape: tuple[int, ...], seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randn(shape, generator=generator).numpy()

    # --- the API of common.md ------------------------------------------------------------------
    def history(self) -> dict[str, np.ndarray]:
        """The training log (log.csv) as column -> (epochs,) array: epoch, step, train_loss,
        validation_elbo (mean nats per image, data units), images_per_s, seconds (see LOG_COLUMNS)."""
        return read_log(RunPaths(self.run_dir).log)

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 69, 69) in data units -> g_mu(x) (N, d) and the diagonal variances g_sigma(x) (N, d)."""
        images = self._images(images)

        def run(x):
            mean, log_var = self.model.encode(self.model.scale(x))
            return mean, torch.exp(log_var)

        return self._empty_pair(len(images), self.latent_dim) if len(images) == 0 else self._batches((images,), run)

    def decode(self, z) -> tuple[np.ndarray, np.ndarray]:
        """Latents (N, d) -> f_mu(z) (N, 69, 69) and the per-pixel variances f_sigma(z) (N, 69, 69), data units."""
        z = self._latents(z)

        def run(latents):
            mean, log_var = self.model.decode(latents)
            return self.model.unscale_mean(mean), self.model.unscale_variance(torch.exp(log_var))

        return self._empty_pair(0, (self.image_size,) * 2) if len(z) == 0 else self._batches((z,), run)

    def reconstruct(self, images) -> np.ndarray:
        """f_mu(g_mu(x)) (N, 69, 69) in data units: the mean image at the posterior mean of z."""
        images = self._images(images)

        def run(x):
            mean, _ = self.model.encode(self.model.scale(x))
            return self.model.unscale_mean(self.model.decode(mean)[0])

        return np.empty((0,) + images.shape[1:], np.float32) if len(images) == 0 else self._batches((images,), run)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n images f_mu(z), z ~ N(0, I) drawn with ``seed``: (n, 69, 69) in data units."""
        return self.decode(self._noise((int(n), self.latent_dim), seed))[0]

    def log_likelihood(self, images) -> np.ndarray:
        """log N(x; f_mu(g_mu(x)), diag f_sigma(g_mu(x))) per image (N,), nats, data units."""
        images = self._images(images)
        jacobian = self.model.log_jacobian()

        def run(x):
            scaled = self.model.scale(x)
            mean, log_var = self.model.decode(self.model.encode(scaled)[0])
            return gaussian_log_density(scaled, mean, log_var).sum(-1).double() + jacobian

        return self._batches((images,), run) if len(images) else np.empty(0)

    def elbo(self, images, mc_samples: int = 1, seed: int = 0) -> np.ndarray:
        """The ELBO per image (N,), nats, data units, its expectation over q estimated with
        ``mc_samples`` reparameterised draws seeded by ``seed`` (the KL is exact)."""
        images = self._images(images)
        if mc_samples < 1:
            raise InputError(f"mc_samples must be at least 1, not {mc_samples}")
        noise = np.ascontiguousarray(self._noise((len(images), mc_samples, self.latent_dim), seed))
        jacobian = self.model.log_jacobian()

        def run(x, eps):
            return -self.model.negative_elbo(self.model.scale(x), eps.transpose(0, 1)).double() + jacobian

        return self._batches((images, noise), run, draws=mc_samples) if len(images) else np.empty(0)

    def importance_log_likelihood(self, images, k: int = 64, seed: int = 0) -> np.ndarray:
        """Importance-weighted estimate of log p(x) per image (N,), nats, data units.

        ``log (1/k) sum_j p(x | z_j) p(z_j) / q(z_j | x)`` with z_j ~ q(z|x) (Burda et al. 2016):
        a lower bound on log p(x) in expectation that tightens as k grows; k=1 is the ELBO's estimate.
        """
        images = self._images(images)
        if k < 1:
            raise InputError(f"k must be at least 1, not {k}")
        noise = np.ascontiguousarray(self._noise((len(images), k, self.latent_dim), seed))
        jacobian = self.model.log_jacobian()
        return self._batches((images, noise), lambda x, eps: self._importance(x, eps, jacobian)) \
            if len(images) else np.empty(0)

    def _importance(self, x: torch.Tensor, eps: torch.Tensor, jacobian: float) -> torch.Tensor:
        scaled = self.model.scale(x)
        q_mean, q_log_var = self.model.encode(scaled)
        z = q_mean[:, None] + torch.exp(0.5 * q_log_var)[:, None] * eps          # (B, k, d)
        log_q = gaussian_log_density(z, q_mean[:, None], q_log_var[:, None]).sum(-1)
        log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
        batch, k = eps.shape[:2]
        log_lik = torch.empty(batch, k, dtype=torch.float64, device=x.device)
        for j in range(k):  # one draw at a time keeps the (B, k, pixels) intermediates out of memory
            mean, log_var = self.model.decode(z[:, j])
            log_lik[:, j] = gaussian_log_density(scaled, mean, log_var).sum(-1).double()
        weights = log_lik + (log_prior - log_q).double()
        return torch.logsumexp(weights, dim=1) - math.log(k) + jacobian

    # --- per-image latent refinement -------------------------------------------------------------
    def log_posterior(self, images, z) -> np.ndarray:
        """The unnormalised log posterior of z per image (N,), nats, data units:
        ``log N(x; f_mu(z), diag f_sigma(z)) + log N(z; 0, I)`` for images (N, 69, 69) in data
        units and latents z (N, d). This is the objective ``refine_latents`` maximises."""
        images, z = self._images(images), self._latents(z)
        if len(images) != len(z):
            raise InputError(f"images and z: {len(images)} images but {len(z)} latents")
        jacobian = self.model.log_jacobian()

        def run(x, latents):
            return self._scaled_log_posterior(self.model.scale(x), latents) + jacobian

        return self._batches((images, z), run) if len(images) else np.empty(0)

    def refine_latents(self, images, steps: int, learning_rate: float = REFINE_LEARNING_RATE) -> np.ndarray:
        """Per-image MAP latents z* (N, d) float32, found by optimising from the encoder's g_mu(x).

        images:        (N, 69, 69) in data units
        steps:         Adam updates of each image's z; 0 returns g_mu(x) itself
        learning_rate: Adam's step size, in units of z (whose prior is N(0, I))

        Maximises ``log_posterior(x, z) = log N(x; f_mu(z), diag f_sigma(z)) + log N(z; 0, I)``
        with the model's weights frozen. The images are optimised ``REFINE_BATCH`` at a time
        as one (B, d) tensor; the objective is a sum of per-image terms and Adam's update is
        elementwise, so each image's z follows exactly its own optimisation. Each image gets the
        z with the highest objective seen along its path (g_mu(x) included), so its objective is
        never below the amortised one. Deterministic: no random draws.
        """
        images = self._images(images)
        steps, learning_rate = check_refine_settings(steps, learning_rate)
        start = self.encode(images)[0]
        if steps == 0 or len(images) == 0:
            return start
        parts = [self._refine_chunk(images[s:s + REFINE_BATCH], start[s:s + REFINE_BATCH], steps, learning_rate)
                 for s in range(0, len(images), REFINE_BATCH)]
        return np.concatenate(parts)

    def _refine_chunk(self, images: np.ndarray, start: np.ndarray, steps: int, learning_rate: float) -> np.ndarray:
        x = self.model.scale(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        z = torch.from_numpy(np.ascontiguousarray(start)).to(self.device).requires_grad_(True)
        best_z = z.detach().clone()
        best = torch.full((len(z),), -math.inf, dtype=torch.float64, device=self.device)
        optimizer = torch.optim.Adam([z], lr=learning_rate)
        for step in range(steps + 1):
            with torch.enable_grad():
                objective = self._scaled_log_posterior(x, z)
                (gradient,) = torch.autograd.grad(objective.sum(), z)
            with torch.no_grad():
                improved = objective > best  # NaN never improves
                best = torch.where(improved, objective, best)
                best_z[improved] = z[improved]
            if step == steps:
                break
            z.grad = -gradient  # Adam minimises
            optimizer.step()
        return best_z.cpu().numpy()

    def _scaled_log_posterior(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(x; f_mu(z), f_sigma(z)) + log N(z; 0, I) in scaled pixel units: (B,) float64."""
        mean, log_var = self.model.decode(z)
        log_lik = gaussian_log_density(x, mean, log_var).double().sum(-1)
        log_prior = -0.5 * (z.double().square() + math.log(2 * math.pi)).sum(-1)
        return log_lik + log_prior

    @staticmethod
    def _empty_pair(n: int, shape) -> tuple[np.ndarray, np.ndarray]:
        shape = (n,) + (tuple(shape) if isinstance(shape, tuple) else (shape,))
        return np.empty(shape, np.float32), np.empty(shape, np.float32)
