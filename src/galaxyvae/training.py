"""Fitting the VAE by stochastic variational inference, with crash-safe, resumable run directories.

``train(data, out, config)`` reads a data set, sets aside a seeded validation subset of its
training split (``validation_fraction``), fits the pixel scaling on the rest and minimises the
mean negative ELBO over the rest with Adam, one epoch at a time. After every epoch it computes
the validation ELBO and reconstruction MSE and writes (atomically, in this order)
``checkpoints/best.pt`` when the one chosen by ``checkpoint_metric`` improved,
``checkpoints/last.pt`` and ``log.csv``; the layout is described in
:mod:`galaxyvae.runs`. The held-out split is never used, so it stays an unbiased test set for
``galaxyvae evaluate``.

Reproducibility. Every random choice of an epoch (the order of the images, the noise of the
reparameterisation, the augmentation) is drawn from generators seeded by (seed, epoch), and the
checkpoint holds the weights, the optimizer's state and the step counters, so a resumed run
computes bit for bit what an uninterrupted one computes on the same machine and settings.

Speed. The training split lives on the device as one contiguous (N, pixels) tensor of scaled
pixels; batches are gathered by index (no DataLoader), the noise of an epoch is drawn at once,
Adam runs fused, and the step is compiled with ``torch.compile`` unless the split is tiny.

Several processes. Started by ``torchrun``, each process reads WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT (``DistributedContext.from_env``) and trains a DistributedDataParallel
copy on its share of every batch; the batch size is the global one, and the gradient equals that
of a single process seeing the whole batch. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from galaxyvae._io import write_json_atomic
from galaxyvae.config import DISPLAY_PIXEL_VARIANCE_MAX, ModelConfig, TrainConfig
from galaxyvae.dataset import GalaxyDataset, read_dataset
from galaxyvae.errors import InputError, OutputExistsError
from galaxyvae.model import SCALING_SAMPLE, GalaxyVAE, PixelScaling
from galaxyvae.provenance import library_versions
from galaxyvae.runs import (
    RunPaths, load_checkpoint, model_from_checkpoint, read_run_config, save_checkpoint, write_log,
)

log = logging.getLogger("galaxyvae.training")

COMPILE_MIN_IMAGES = 4096
"""With ``compile="auto"``, the step is compiled only for training splits at least this large:
compiling costs tens of seconds on a CPU, more than a tiny run takes."""
EVAL_BATCH = 1024
"""Images per forward pass of the validation ELBO."""
EXECUTION_SETTINGS = ("epochs", "device", "threads")
"""Settings a resumed run takes from the command line; all others come from the run's config.json."""

_ORDER, _NOISE, _AUGMENT, _VALIDATION_NOISE, _VALIDATION_CHOICE = range(5)


class RunExistsError(InputError, OutputExistsError):
    """The run directory exists and resuming it was not asked for."""


class TrainingDivergedError(InputError):
    """The training loss became NaN or infinite (the weights diverged)."""


# --- processes, devices, threads ----------------------------------------------------------------------

@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the processes started by ``torchrun`` (one process: the defaults)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = ""
    master_port: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistributedContext":
        """Read WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.

        Without WORLD_SIZE (or with WORLD_SIZE=1) this is a single process. Raises InputError
        naming the variable if one is missing or malformed.
        """
        env = os.environ if env is None else env
        world_size = _env_int(env, "WORLD_SIZE", 1)
        if world_size == 1:
            return cls()
        rank = _env_int(env, "RANK", None)
        local_rank = _env_int(env, "LOCAL_RANK", rank)
        local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", world_size)
        master_addr = env.get("MASTER_ADDR", "")
        master_port = _env_int(env, "MASTER_PORT", None)
        if not master_addr:
            raise InputError("environment variable MASTER_ADDR is not set (start several processes with torchrun)")
        if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
            raise InputError(f"inconsistent torchrun environment: WORLD_SIZE={world_size}, RANK={rank}, "
                             f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world_size}")
        if not 0 < master_port < 65536:
            raise InputError(f"environment variable MASTER_PORT={master_port} is not a TCP port")
        return cls(world_size, rank, local_rank, local_world_size, master_addr, master_port)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True for the process that writes the run directory (rank 0)."""
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise InputError(f"environment variable {name} is not set (start several processes with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def configure_threads(threads: int, context: DistributedContext, env: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op threads and return the number: ``threads`` if positive, else torch's own
    choice when the user set OMP_NUM_THREADS, else the available cores shared among this node's processes."""
    env = os.environ if env is None else env
    if threads > 0:
        torch.set_num_threads(threads)
    elif not env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, available_cores() // context.local_world_size))
    return torch.get_num_threads()


def choose_device(name: str, context: DistributedContext) -> torch.device:
    """"auto" -> this process's CUDA device if CUDA is present, else the CPU; "cuda" -> cuda:LOCAL_RANK."""
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(f"cuda:{context.local_rank}") if name == "cuda" else torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"device must be cpu, cuda, cuda:N or auto, not {name!r}")


# --- randomness ------------------------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one stream (order, noise, augmentation) of one epoch, seeded by (seed, epoch, stream)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def batch_plan(n_train: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The image indices of every step of an epoch: (steps, batch) int64.

    A random permutation cut into full batches; the remainder is left out of this epoch (a
    different one each epoch), so every step has the same shape. If the split is smaller than
    the batch, the whole split is one batch.
    """
    batch = min(batch_size, n_train)
    order = torch.randperm(n_train, generator=epoch_generator(seed, epoch, _ORDER))
    steps = n_train // batch
    return order[: steps * batch].reshape(steps, batch)


def selection_score(row: Mapping[str, float], metric: str) -> float:
    """How good an epoch's log row is by ``metric`` ("elbo" or "mse"), higher is better: best.pt
    keeps the epoch with the highest score so far."""
    return row["validation_elbo"] if metric == "elbo" else -row["validation_mse"]


def validation_split(train_index: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training split's image indices into (fitted, validation), both sorted.

    The validation subset holds ``round(fraction * n)`` images (at least one) drawn without
    replacement by a generator seeded with ``seed``, so a resumed run gets the same subset.
    Raises InputError unless 0 < fraction < 1 and at least one image is left to fit.
    """
    if not 0 < fraction < 1:
        raise InputError(f"validation_fraction (--validation-fraction) must lie between 0 and 1, not {fraction}")
    n = len(train_index)
    n_validation = max(1, round(fraction * n))
    if n_validation >= n:
        raise InputError(f"a training split of {n} image(s) cannot spare a validation subset "
                         f"(--validation-fraction {fraction}) and still have images to fit")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _VALIDATION_CHOICE]))
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.choice(n, size=n_validation, replace=False)] = True
    return train_index[~chosen], train_index[chosen]


def augmentation_indices(side: int, flips: bool, shift: int) -> torch.Tensor | None:
    """Pixel permutations of a flattened (side, side) stamp that training draws from, one per row:
    the 8 flips and rotations (``flips``) composed with every whole-pixel shift (dy, dx), -shift to
    shift per axis, wrapped round the edges; shape ((2 shift + 1)^2 * (8 if flips else 1), side^2),
    shift-major, int32 (44 MB for 69-pixel stamps with flips and shift 8, the most allowed).
    None when there is nothing to draw (no flips, shift 0)."""
    if not flips and shift == 0:
        return None
    base = dihedral_indices(side) if flips else torch.arange(side * side)[None]
    grid = torch.arange(side * side).reshape(side, side)
    offsets = range(-shift, shift + 1)
    shifted = [torch.roll(grid, (dy, dx), (0, 1)).reshape(-1)[base] for dx in offsets for dy in offsets]
    return torch.cat(shifted).to(torch.int32)


def dihedral_indices(side: int) -> torch.Tensor:
    """(8, side*side) pixel permutations of the 8 flips and 90-degree rotations of a square stamp."""
    grid = torch.arange(side * side).reshape(side, side)
    elements = []
    for element in range(8):
        image = grid.T if element & 4 else grid
        image = image.flip(0) if element & 1 else image
        image = image.flip(1) if element & 2 else image
        elements.append(image.reshape(-1))
    return torch.stack(elements)


# --- run directory --------------------------------------------------------------------------------

def data_record(dataset: GalaxyDataset, scaling: PixelScaling, n_validation: int) -> dict[str, Any]:
    """What data.json says about the training data: where, how big, its attrs and provenance.
    n_train counts the images fitted: the training split less the ``n_validation`` set aside."""
    path = Path(dataset.path).resolve()
    attrs = {k: v for k, v in dataset.attrs.items() if k != "provenance"}
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "n_images": len(dataset),
        "n_train": int((~dataset.held_out).sum()) - n_validation,
        "n_validation": n_validation,
        "n_held_out": int(dataset.held_out.sum()),
        "attrs": attrs,
        "provenance": dataset.provenance,
        "pixel_scaling": scaling.to_dict(),
    }


def _check_same_data(paths: RunPaths, dataset: GalaxyDataset) -> None:
    if not paths.data.is_file():
        return
    recorded = json.loads(paths.data.read_text(encoding="utf-8"))
    now = {"training split": int((~dataset.held_out).sum()), "n_held_out": int(dataset.held_out.sum()),
           "created": dataset.attrs.get("created")}
    before = {"training split": recorded.get("n_train", 0) + recorded.get("n_validation", 0),
              "n_held_out": recorded.get("n_held_out"), "created": recorded.get("attrs", {}).get("created")}
    if now != before:
        raise InputError(f"{dataset.path}: not the data set the run in {paths.run_dir} was trained on "
                         f"({recorded.get('path')}); resume with that data set")


# --- the trainer ----------------------------------------------------------------------------------

def train(
    data: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Fit the VAE to the training split of ``data`` and write the run directory ``out``; return it.

    data:     a galaxyvae data set (.h5) with a training split of at least two images; its
              held-out split (possibly empty) is not used
    out:      the run directory; must not exist unless ``resume``
    config:   TrainConfig (default: the paper's settings; with ``resume``, the run's own config.json)
    resume:   continue the run in ``out`` from its last checkpoint (its config.json wins, except
              for epochs, device and threads taken from ``config`` when one is given; see
              ``resumed_config``); a run directory without a checkpoint starts over
    init:     a run directory whose best weights and pixel scaling start this run (fine-tuning)
    progress: show a progress bar (rank 0 only)

    Raises InputError (or a subclass) naming the file or setting at fault; nothing is
    overwritten then.
    """
    context = DistributedContext.from_env()
    trainer = Trainer(Path(data), Path(out), config, resume, init, progress, context)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer.paths.run_dir


def resumed_config(out: str | Path, **settings) -> TrainConfig:
    """The config of the run in ``out`` with the given execution settings (epochs, device,
    threads) replaced, for ``train(..., resume=True)``; other settings are ignored with a warning,
    since a resumed run keeps its own model and optimisation settings."""
    paths = RunPaths(Path(out))
    if not paths.config.is_file():
        raise InputError(f"{out}: nothing to resume (no config.json; is it a run directory?)")
    stored, _ = read_run_config(paths)
    ignored = sorted(set(settings) - set(EXECUTION_SETTINGS))
    if ignored:
        log.warning("resuming %s with its own settings; ignoring the given %s", out, ", ".join(ignored))
    return replace(stored, **{k: v for k, v in settings.items() if k in EXECUTION_SETTINGS})


class Trainer:
    """One training run: its data on the device, model, optimizer, progress and run directory."""

    def __init__(self, data: Path, out: Path, config: TrainConfig | None, resume: bool, init: str | Path | None,
                 progress: bool, context: DistributedContext):
        self.context = context
        self.paths = RunPaths(out)
        self.progress = progress and context.is_main
        self.process_group_started = False
        self.resume_record: dict[str, Any] | None = None
        self._resuming = resume
        self.config = self._resolve_config(config, resume, init)
        self.init = Path(init).resolve() if init is not None else None
        self._check_settings()
        self.dataset = read_dataset(data)
        self._check_dataset()
        if resume:
            _check_same_data(self.paths, self.dataset)
        self._start_processes()
        try:
            self.threads = configure_threads(self.config.threads, context)
            self.device = choose_device(self.config.device, context)
            self._build()
        except BaseException:
            self.close()
            raise

    # --- setup -------------------------------------------------------------------------------------
    def _resolve_config(self, config: TrainConfig | None, resume: bool, init) -> TrainConfig:
        run_dir = self.paths.run_dir
        if resume and init is not None:
            raise InputError("--init starts a new run and --resume continues one; give only one of them")
        if not resume:
            if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
                raise RunExistsError(f"{run_dir} already exists; pass --resume to continue that run, "
                                     "or choose a new --out")
            if not run_dir.parent.is_dir():
                raise InputError(f"cannot create {run_dir}: folder {run_dir.parent} does not exist")
            return config or TrainConfig()
        if not self.paths.config.is_file():
            raise InputError(f"{run_dir}: nothing to resume (no config.json; is it a run directory?)")
        stored, _ = read_run_config(self.paths)
        if "validation_fraction" not in json.loads(self.paths.config.read_text(encoding="utf-8")):
            raise InputError(f"{run_dir}: trained before galaxyvae set a validation subset aside (its checkpoints "
                             "were chosen on the held-out split), so it cannot be resumed; start a new run, "
                             "or --init from this one")
        if self.paths.checkpoint("last").is_file():
            self.resume_record = load_checkpoint(self.paths.checkpoint("last"))
        if config is None:
            return stored
        ignored = [f for f in stored.to_dict() if f not in EXECUTION_SETTINGS
                   and getattr(stored, f) != getattr(config, f) and getattr(config, f) != getattr(TrainConfig(), f)]
        if ignored:
            log.warning("resuming %s with its own settings; ignoring the given %s", run_dir, ", ".join(ignored))
        resumed = replace(stored, **{f: getattr(config, f) for f in EXECUTION_SETTINGS})
        _warn_if_schedule_restarts(stored, resumed)
        return resumed

    def _check_settings(self) -> None:
        c = self.config
        for name in ("epochs", "batch_size", "mc_samples"):
            if getattr(c, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(c, name)}")
        if not c.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, not {c.learning_rate}")
        if c.threads < 0:
            raise InputError(f"threads must be 0 (automatic) or positive, not {c.threads}")
        if c.precision not in ("fp32", "bf16"):
            raise InputError(f"precision must be fp32 or bf16, not {c.precision!r}")
        if c.compile not in ("auto", "on", "off"):
            raise InputError(f"compile must be auto, on or off, not {c.compile!r}")
        if c.checkpoint_metric not in ("elbo", "mse"):
            raise InputError(f"checkpoint_metric must be elbo or mse, not {c.checkpoint_metric!r}")
        if c.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {c.lr_schedule!r}")
        if not 0 <= c.augment_shift <= c.model.image_size // 8:
            raise InputError(f"augment_shift must be 0 to {c.model.image_size // 8} pixels (an eighth of the "
                             f"{c.model.image_size}-pixel side), not {c.augment_shift}")
        if c.freeze not in FROZEN_PARTS:
            raise InputError(f"freeze must be one of {', '.join(FROZEN_PARTS)}, not {c.freeze!r}")
        if c.freeze != "none" and self.init is None and not self._resuming:
            raise InputError(f"--freeze {c.freeze} keeps pretrained weights fixed, so it needs --init RUN_DIR")

    def _check_dataset(self) -> None:
        dataset, side = self.dataset, self.config.model.image_size
        if dataset.images.shape[1:] != (side, side):
            raise InputError(f"{dataset.path}: images are {dataset.images.shape[1:]}, the model expects ({side}, {side})")
        if (~dataset.held_out).sum() == 0:
            raise InputError(f"{dataset.path}: the training split is empty")
        self.fit_index, self.validation_index = validation_split(
            dataset.train_index, self.config.validation_fraction, self.config.seed)
        if len(self.fit_index) < self.context.world_size:
            raise InputError(f"{dataset.path}: {len(self.fit_index)} training images (after setting "
                             f"{len(self.validation_index)} aside for validation) cannot be shared "
                             f"among {self.context.world_size} processes")

    def _start_processes(self) -> None:
        if not self.context.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if self.config.device != "cpu" and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.context.local_rank)
            dist.init_process_group(backend=backend, init_method="env://",
                                    world_size=self.context.world_size, rank=self.context.rank)
            self.process_group_started = True
        # Every process has checked the run directory before rank 0 starts writing it.
        dist.barrier()

    def _build(self) -> None:
        config = self.config
        fit_index = self.fit_index
        sample = self.dataset.images[fit_index[::max(1, len(fit_index) // SCALING_SAMPLE)]]
        self.model, scaling = self._initial_model(sample)
        if config.freeze != "mean":  # refitting f_sigma alone cannot let it absorb misfit of f_mu
            _warn_if_display_ceiling(self.dataset, self.config.model)
        self.model.to(self.device)
        self.gradient_masks = freeze(self.model, config.freeze)
        self.data_info = data_record(self.dataset, scaling, len(self.validation_index))
        log.info("%s: fitting %d images, %d set aside to choose the checkpoint, %d held out (not used)",
                 self.dataset.path, len(fit_index), len(self.validation_index), int(self.dataset.held_out.sum()))
        self.train_x = self._to_device(fit_index)
        self.validation_x = self._to_device(self.validation_index)
        self.dataset.images = np.empty((0,) + self.dataset.images.shape[1:], np.float32)  # keep only the device copies
        self.optimizer = torch.optim.Adam(trainable_parameters(self.model), lr=config.learning_rate,
                                          **_fast_adam_options(self.device))
        self.epoch, self.step, self.history, self.best_score = 0, 0, [], -math.inf
        if self.resume_record is not None:
            self._restore(self.resume_record)
        self.scaling = self.model.scaling
        self.compiled = self._should_compile()
        self.network = self._wrap(self.model)
        augmentations = augmentation_indices(config.model.image_size, config.augment, config.augment_shift)
        self.augmentations = augmentations.to(self.device) if augmentations is not None else None

    def _initial_model(self, scaling_sample: np.ndarray) -> tuple[GalaxyVAE, PixelScaling]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            if self.init is None:
                scaling = PixelScaling.fit(scaling_sample)
                return GalaxyVAE(self.config.model, scaling), scaling
            record = load_checkpoint(RunPaths(self.init).checkpoint("best"))
            model = model_from_checkpoint(record, RunPaths(self.init).checkpoint("best")).train()
        init_model = ModelConfig(**record["model_config"])
        requested = init_model if self.config.model == ModelConfig() else self.config.model
        if replace(requested, **{name: getattr(init_model, name) for name in ADJUSTABLE_AT_INIT}) != init_model:
            raise InputError(f"--init {self.init}: its model ({init_model}) differs from the requested one "
                             f"({requested}); only {' and '.join(ADJUSTABLE_AT_INIT)} may change")
        if requested != init_model:
            log.info("--init %s: f_sigma bounds %g to %g sky variances (were %g to %g)", self.init,
                     requested.pixel_variance_min, requested.pixel_variance_max,
                     init_model.pixel_variance_min, init_model.pixel_variance_max)
            model.set_pixel_variance_bounds(requested.pixel_variance_min, requested.pixel_variance_max)
        self.config = replace(self.config, model=requested)
        # The transfer rule (docs/transfer.md): the network works in sky-noise units of the data it
        # is trained on, so the scaling is refitted here rather than inherited from the init run.
        scaling = PixelScaling.fit(scaling_sample)
        log.info("--init %s: pixel scaling refitted on %s: offset %.6g, scale %.6g (was %.6g, %.6g)",
                 self.init, self.dataset.path, scaling.offset, scaling.scale, model.scaling.offset, model.scaling.scale)
        model.set_scaling(scaling)
        return model, scaling

    def _to_device(self, index: np.ndarray) -> torch.Tensor:
        """The data set's images at ``index`` as (n, pixels) scaled float32 on the device, scaled
        by ``GalaxyVAE.scale`` exactly as at evaluation, a chunk at a time to bound memory."""
        scaled = torch.empty(len(index), self.model.n_pixels, dtype=torch.float32, device=self.device)
        for start in range(0, len(index), 4096):
            chunk = torch.from_numpy(self.dataset.images[index[start:start + 4096]]).to(self.device)
            scaled[start:start + 4096] = self.model.scale(chunk)
        return scaled

    def _restore(self, record: dict[str, Any]) -> None:
        # Settings added since the checkpoint was written (e.g. conv_channels) take their defaults, as in load_run.
        if {**ModelConfig().__dict__, **record.get("model_config", {})} != self.config.model.__dict__:
            raise InputError(f"{self.paths.checkpoint('last')}: its model differs from the run's config.json")
        self.model.load_state_dict(record["model_state"])
        self.optimizer.load_state_dict(record["optimizer_state"])
        self.epoch, self.step = int(record["epoch"]), int(record["step"])
        self.history = [dict(row) for row in record["history"]]
        self.best_score = float(record.get("best_validation_score", record.get("best_validation_elbo")))
        torch.random.set_rng_state(record["rng"]["torch"])

    def _wrap(self, model: GalaxyVAE) -> torch.nn.Module:
        network: torch.nn.Module = model
        if self.context.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            network = DistributedDataParallel(model, device_ids=ids)
        if self.compiled:
            network = torch.compile(network, dynamic=False)
        return network

    def _should_compile(self) -> bool:
        if self.config.compile == "off":
            return False
        if self.config.compile == "on":
            return True
        big_enough = len(self.train_x) >= COMPILE_MIN_IMAGES
        has_compiler = self.device.type == "cuda" or shutil.which(os.environ.get("CXX", "g++")) is not None
        return big_enough and has_compiler

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        """Train from the current epoch to ``config.epochs``, writing the run directory after each epoch."""
        if self.context.is_main:
            self._write_run_files()
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            started = time.perf_counter()
            train_loss, images_per_s = self._train_epoch(epoch)
            validation_elbo, validation_mse = self.validation_scores()
            self.epoch = epoch
            row = {"epoch": epoch, "step": self.step, "train_loss": train_loss, "validation_elbo": validation_elbo,
                   "validation_mse": validation_mse, "images_per_s": images_per_s,
                   "seconds": time.perf_counter() - started}
            self.history.append(row)
            log.info("epoch %d/%d: training loss %.2f, validation ELBO %.2f nats per image, validation MSE %.4g, "
                     "%.0f images/s", epoch, self.config.epochs, train_loss, validation_elbo, validation_mse,
                     images_per_s)
            score = selection_score(row, self.config.checkpoint_metric)
            if self.context.is_main:
                self._write_epoch(score)
            elif score > self.best_score:
                self.best_score = score
        if self.context.distributed:
            import torch.distributed as dist

            # gloo aborts a process that leaves the group while another is still writing its files.
            dist.barrier()

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        config, ctx = self.config, self.context
        plan = batch_plan(len(self.train_x), config.batch_size, config.seed, epoch)
        steps, batch = plan.shape
        noise = torch.randn(steps, config.mc_samples, batch, config.model.latent_dim,
                            generator=epoch_generator(config.seed, epoch, _NOISE))
        elements = (torch.randint(0, len(self.augmentations), plan.shape,
                                  generator=epoch_generator(config.seed, epoch, _AUGMENT))
                    if self.augmentations is not None else None)
        plan, noise = plan[:, ctx.rank::ctx.world_size].to(self.device), noise[:, :, ctx.rank::ctx.world_size].to(self.device)
        # Each process's loss is its images' share of the batch sum, scaled so that DDP's average over
        # processes is the mean over the whole batch.
        weight = ctx.world_size / batch
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
        bar = self._progress_bar(epoch, steps)
        self.model.train()
        started = time.perf_counter()
        for i in range(steps):
            self._set_learning_rate((epoch - 1 + i / steps) / config.epochs)
            x = self.train_x.index_select(0, plan[i])
            if elements is not None:
                chosen = self.augmentations[elements[i, ctx.rank::ctx.world_size].to(self.device)]
                x = torch.gather(x, 1, chosen.long())
            losses = self._losses(x, noise[i], autocast)
            loss = losses.sum() * weight
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for parameter, keep in self.gradient_masks:
                parameter.grad.mul_(keep)
            self.optimizer.step()
            self.step += 1
            total += losses.detach().sum()
            if bar is not None:
                self._update_bar(bar, i, total, started, batch)
        seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
        total = self._all_reduce(total)
        train_loss = float(total) / (steps * batch) - self.model.log_jacobian()
        if not math.isfinite(train_loss):
            kept = (f"{self.paths.checkpoint('last')} keeps epoch {epoch - 1}" if epoch > 1
                    else "no checkpoint was written")
            raise TrainingDivergedError(f"the training loss became {train_loss} in epoch {epoch}; lower "
                                        f"--learning-rate (now {config.learning_rate}); {kept}")
        return train_loss, steps * batch / seconds

    def _set_learning_rate(self, progress: float) -> None:
        """The Adam step size at ``progress`` (0 to 1: the fraction of the run's steps taken)."""
        rate = scheduled_learning_rate(self.config.learning_rate, self.config.lr_schedule, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def _losses(self, x: torch.Tensor, noise: torch.Tensor, autocast) -> torch.Tensor:
        """Per-image negative ELBO of a batch; with ``compile="auto"``, falls back to eager mode
        (with a warning) if compilation fails, e.g. for want of a C++ compiler."""
        try:
            with autocast:
                return self.network(x, noise)
        except Exception as err:  # inductor reports failures under many types
            if not (self.compiled and self.config.compile == "auto"):
                raise
            log.warning("torch.compile failed (%s); training without it", str(err).splitlines()[0][:200])
            self.compiled = False
            self.network = self._wrap(self.model)
            if self.context.is_main:
                self._write_versions()
            with autocast:
                return self.network(x, noise)

    def _progress_bar(self, epoch: int, steps: int):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"epoch {epoch}/{self.config.epochs}", unit="step", leave=False,
                    dynamic_ncols=True, mininterval=0.5)

    def _update_bar(self, bar, i: int, total: torch.Tensor, started: float, batch: int) -> None:
        bar.update(1)
        if i % 25 == 24:
            seconds = time.perf_counter() - started
            loss = float(total) / ((i + 1) * batch // self.context.world_size) - self.model.log_jacobian()
            bar.set_postfix_str(f"loss {loss:.1f}, {(i + 1) * batch / seconds:.0f} images/s", refresh=False)

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        if self.context.distributed:
            import torch.distributed as dist

            dist.all_reduce(value)
        return value

    def validation_scores(self) -> tuple[float, float]:
        """Mean ELBO of the validation images in nats per image, data units (one reparameterised
        draw per image with noise fixed for the whole run, so that epochs are compared on equal
        terms), and the mean pixel MSE of their reconstructions f_mu(g_mu(x)) in data units squared."""
        ctx = self.context
        n = len(self.validation_x)
        noise = torch.randn(1, n, self.config.model.latent_dim,
                            generator=epoch_generator(self.config.seed, 0, _VALIDATION_NOISE))
        mine = torch.arange(ctx.rank, n, ctx.world_size)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(mine), EVAL_BATCH):
                index = mine[start:start + EVAL_BATCH]
                x = self.validation_x[index.to(self.device)]
                totals[0] += self.model.negative_elbo(x, noise[:, index].to(self.device)).double().sum()
                reconstruction, _ = self.model.decode(self.model.encode(x)[0])
                totals[1] += (reconstruction - x).double().square().mean(dim=1).sum()
        self.model.train()
        negative_elbo, squared = (float(v) / n for v in self._all_reduce(totals))
        return -negative_elbo + self.model.log_jacobian(), squared * float(self.model.pixel_scale) ** 2

    # --- writing -------------------------------------------------------------------------------------
    def _write_run_files(self) -> None:
        paths = self.paths
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        extra = {"data": str(Path(self.dataset.path).resolve())}
        if self.init is not None:
            extra["init"] = str(self.init)
        write_json_atomic(paths.config, {**self.config.to_dict(), **extra})
        self._write_versions()
        write_json_atomic(paths.data, self.data_info)
        write_log(paths.log, self.history)

    def _write_versions(self) -> None:
        execution = {"device": str(self.device), "torch_threads": self.threads,
                     "world_size": self.context.world_size, "compiled": self.compiled,
                     "precision": self.config.precision}
        if self.context.distributed:
            execution.update(master_addr=self.context.master_addr, master_port=self.context.master_port)
        write_json_atomic(self.paths.versions, {**library_versions(), "execution": execution})

    def _write_epoch(self, score: float) -> None:
        improved = score > self.best_score
        if improved:
            self.best_score = score
        record = self._checkpoint_record()
        if improved:
            save_checkpoint(self.paths.checkpoint("best"), record)
        save_checkpoint(self.paths.checkpoint("last"), record)
        write_log(self.paths.log, self.history)

    def _checkpoint_record(self) -> dict[str, Any]:
        return {
            "model_config": dict(self.config.model.__dict__),
            "train_config": self.config.to_dict(),
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer_state": _to_cpu(self.optimizer.state_dict()),
            "pixel_scaling": self.scaling.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": [dict(row) for row in self.history],
            "best_validation_score": self.best_score,
            "rng": {"torch": torch.random.get_rng_state()},
            "world_size": self.context.world_size,
            "data": str(Path(self.dataset.path).resolve()),
        }

    def close(self) -> None:
        """Leave the process group if this trainer started it."""
        if self.process_group_started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.process_group_started = False


FROZEN_PARTS = {
    "none": (),
    "encoder": ("encoder", "encoder_head"),
    "decoder": ("decoder", "decoder_head"),
    "decoder-body": ("decoder",),
    "mean": ("encoder", "encoder_head", "decoder"),
}
"""The submodules of ``GalaxyVAE`` that each ``--freeze`` choice keeps fixed; "mean" also fixes the
half of ``decoder_head`` that paints f_mu (``freeze`` returns the masks that do it)."""

ADJUSTABLE_AT_INIT = ("pixel_variance_min", "pixel_variance_max")
"""Model settings that ``--init`` may change: bounds of f_sigma, not shapes of weights."""


LR_SCHEDULES = ("constant", "cosine")


def scheduled_learning_rate(base: float, schedule: str, progress: float) -> float:
    """The step size ``progress`` (0 to 1) of the way through a run: ``base`` for "constant", and
    ``base * (1 + cos(pi * progress)) / 2`` for "cosine", which falls from ``base`` to 0 at the end."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise InputError(f"lr_schedule (--lr-schedule) must be constant or cosine, not {schedule!r}")


def _warn_if_schedule_restarts(stored: TrainConfig, resumed: TrainConfig) -> None:
    """A cosine schedule is laid over the run's epochs, so extending a run raises its step size again."""
    if stored.lr_schedule != "cosine" or resumed.epochs == stored.epochs:
        return
    before, after = (scheduled_learning_rate(stored.learning_rate, "cosine", min(1.0, stored.epochs / epochs))
                     for epochs in (stored.epochs, resumed.epochs))
    log.warning("the cosine schedule now spans %d epochs instead of %d: at epoch %d the step size goes from %.3g "
                "to %.3g", resumed.epochs, stored.epochs, stored.epochs, before, after)


def is_display_levels(dataset: GalaxyDataset) -> bool:
    """Whether the data set's pixels are display levels (a stretched picture), by its ``pixel_units``."""
    return "display level" in str(dataset.attrs.get("pixel_units", "")).lower()


def _warn_if_display_ceiling(dataset: GalaxyDataset, model: ModelConfig) -> None:
    """A ceiling set for the Poisson noise of linear pixels lets f_sigma absorb misfit on stretched ones."""
    if is_display_levels(dataset) and model.pixel_variance_max > DISPLAY_PIXEL_VARIANCE_MAX:
        log.warning("%s holds display levels (%s): the stretch compresses the noise of bright pixels, so a "
                    "pixel-variance ceiling of %g sky variances lets f_sigma absorb the model's misfit; "
                    "--pixel-variance-max %g suits such data (docs/transfer.md)", dataset.path,
                    dataset.attrs["pixel_units"], model.pixel_variance_max, DISPLAY_PIXEL_VARIANCE_MAX)


def freeze(model: GalaxyVAE, part: str) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Stop gradients into the submodules named by ``FROZEN_PARTS[part]`` (in place), and return
    (parameter, 0/1 mask) pairs by which each step multiplies the gradients of partly frozen
    parameters: for "mean", the mean half of f's output layer, so that f_mu(g_mu(x)) stays the
    pretrained one bit for bit (Adam moves no weight whose gradient is always 0)."""
    for name in FROZEN_PARTS[part]:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(False)
    return model.variance_output_masks() if part == "mean" else []


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: those not frozen."""
    return [p for p in model.parameters() if p.requires_grad]


def _fast_adam_options(device: torch.device) -> dict[str, bool]:
    """``fused=True`` (one kernel for the whole update) where this torch supports it on the device."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.Adam([probe], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return {"foreach": True} if device.type == "cuda" else {}
    return {"fused": True}


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
