"""Held-out evaluation: the VAE against per-image parametric fits, as in the paper's table.

Two layers. The metric functions (``mean_squared_error``, ``gaussian_log_likelihood``,
``mse_wins``, ``likelihood_wins``, ``bootstrap_mean_interval``, ``calibration_fractions``,
``bits_per_pixel``) are pure functions of numpy arrays, tested against independent
computations. ``evaluate`` loads a trained run, fits the baselines to the held-out images,
computes every metric per image and writes three files (see docs/evaluation.md)::

    OUT/evaluation.json   aggregates, with 95% bootstrap intervals and the paper's numbers
    OUT/per_image.csv     one row per held-out image
    OUT/table.md          the paper's table, for the Gaussian and the Sersic fit

With ``refine_steps > 0`` each image's z is also optimised for its own posterior, starting
from g_mu(x) (``TrainedModel.refine_latents``), and the refined reconstruction f_mu(z*) is
scored beside the amortised f_mu(g_mu(x)), which stays the paper's definition and the headline.

OUT is the run directory when the run's own data set is evaluated, and
RUN_DIR/evaluations/<data-set stem>/ for any other data set, so that evaluating a second
data set never replaces the run's own evaluation.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from galaxyvae import __version__
from galaxyvae._io import check_writable, write_json_atomic, write_text_atomic
from galaxyvae.errors import InputError, OutputExistsError
from galaxyvae.provenance import command_line, library_versions, utc_now

log = logging.getLogger(__name__)

PAPER = {"mse_win_fraction": 0.971, "likelihood_win_fraction": 0.972}
"""The paper's held-out results against the scaled bivariate Gaussian fit."""

BASELINE_NAMES = ("gaussian", "sersic")
BASELINE_LABELS = {"gaussian": "Gaussian", "sersic": "Sérsic"}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95
CALIBRATION_WIDTHS = (1, 2)
"""Calibration is the fraction of pixels whose residual lies within this many predicted s.d."""

OUTPUT_NAMES = ("evaluation.json", "per_image.csv", "table.md")
OTHER_DATA_FOLDER = "evaluations"
"""Evaluations of data sets other than the run's own go to RUN_DIR/evaluations/<stem>/."""

IMAGES_PER_CHUNK = 250
"""Images per call into the model and the fitters: bounds memory and paces the progress bars."""
DECODES_PER_CALL = 4096
"""Monte Carlo estimates decode images x samples at once: chunks hold this many decodes at most."""

_BOOTSTRAP_BLOCK = 4_000_000
"""Resampled indices held in memory at once by the bootstrap."""


# --- metrics on arrays -----------------------------------------------------------------------

def mean_squared_error(images: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Mean over pixels of the squared residual, per image.

    images, predictions: (N, H, W) in data units. Returns (N,) float64 in squared data units.
    """
    residual = np.asarray(images, np.float64) - np.asarray(predictions, np.float64)
    return np.mean(residual.reshape(len(residual), -1) ** 2, axis=1)


def gaussian_log_likelihood(images: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """log N(x; mean, diag(variance)) summed over pixels, per image.

    images, mean, variance: (N, H, W) in data units (variance in squared data units, > 0).
    Returns (N,) float64 in nats (a density in data units, so it shifts with the units).
    """
    x = np.asarray(images, np.float64)
    var = np.asarray(variance, np.float64)
    per_pixel = -0.5 * (np.log(2 * np.pi * var) + (x - np.asarray(mean, np.float64)) ** 2 / var)
    return per_pixel.reshape(len(x), -1).sum(axis=1)


def mse_wins(mse_model: np.ndarray, mse_baseline: np.ndarray) -> np.ndarray:
    """(N,) bool: True where the model's MSE is strictly lower than the baseline's.

    A tie, or a NaN on either side (a failed fit), is not a win for the model.
    """
    return np.asarray(mse_model) < np.asarray(mse_baseline)


def likelihood_wins(loglik_model: np.ndarray, loglik_baseline: np.ndarray) -> np.ndarray:
    """(N,) bool: True where the model's log-likelihood is strictly higher than the baseline's.

    ``loglik_baseline`` is the baseline's log-likelihood maximised over its noise level sigma,
    so a win means higher likelihood than N(x-hat, sigma^2 I) for every sigma > 0.
    A tie or a NaN is not a win for the model.
    """
    return np.asarray(loglik_model) > np.asarray(loglik_baseline)


def bootstrap_mean_interval(values: np.ndarray, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                            level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    values: (N,) numbers or bools (for bools the mean is a fraction of wins).
    Draws ``n_resamples`` resamples of N indices with replacement from
    ``numpy.random.default_rng(seed)`` (the same indices as a loop of ``rng.integers(0, N, N)``)
    and returns the (1 - level)/2 and (1 + level)/2 percentiles of the resampled means.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-d array, got shape {values.shape}")
    means = bootstrap_means(values, n_resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples,) means of ``values`` resampled with replacement, computed in blocks."""
    rng = np.random.default_rng(seed)
    n = len(values)
    block = max(1, _BOOTSTRAP_BLOCK // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def calibration_fractions(images: np.ndarray, mean: np.ndarray, variance: np.ndarray,
                          widths=CALIBRATION_WIDTHS) -> np.ndarray:
    """Per image, the fraction of pixels with |x - mean| < k * sqrt(variance), for each k in widths.

    images, mean, variance: (N, H, W). Returns (N, len(widths)) float64. For pixels truly drawn
    from N(mean, variance) the fractions are erf(k / sqrt 2): 0.683 for k = 1, 0.954 for k = 2.
    """
    residual = np.abs(np.asarray(images, np.float64) - np.asarray(mean, np.float64))
    sd = np.sqrt(np.asarray(variance, np.float64))
    flat_r, flat_sd = residual.reshape(len(residual), -1), sd.reshape(len(sd), -1)
    return np.stack([(flat_r < k * flat_sd).mean(axis=1) for k in widths], axis=1)


def calibrated_fraction(width: float) -> float:
    """Fraction of a Gaussian within ``width`` standard deviations of its mean: erf(width / sqrt 2)."""
    return math.erf(width / math.sqrt(2))


def bits_per_pixel(nats_per_image, n_pixels: int):
    """Convert nats per image to bits per pixel, keeping the sign: nats / (n_pixels ln 2).

    The customary figure of merit, the negative log-likelihood in bits per pixel, is
    ``-bits_per_pixel(log_p, n_pixels)``.
    """
    return np.asarray(nats_per_image, np.float64) / (n_pixels * math.log(2))


# --- evaluating a run ------------------------------------------------------------------------

@dataclass
class EvaluationResult:
    """What ``evaluate`` computed and wrote.

    summary:    the contents of evaluation.json
    per_image:  column name -> (N,) array, the contents of per_image.csv
    output_dir: the folder holding evaluation.json, per_image.csv and table.md
    """

    summary: dict[str, Any]
    per_image: dict[str, np.ndarray]
    output_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def table_markdown(self) -> str:
        """The Markdown of table.md: the paper's table for each baseline and the model's scores."""
        return render_table(self.summary)


def evaluate(run_dir: str | Path, data_path: str | Path | None = None, importance_samples: int = 64,
             seed: int = 0, *, overwrite: bool = False, progress: bool = True,
             checkpoint: str = "best", refine_steps: int = 0,
             refine_learning_rate: float | None = None) -> EvaluationResult:
    """Evaluate a trained run on the held-out split of its data set (or of ``data_path``).

    importance_samples: k of the importance-weighted estimate of log p(x); also the number of
                        z samples averaged in the ELBO estimate.
    seed:               seed of the Monte Carlo estimates and of the bootstrap.
    overwrite:          replace an earlier evaluation.json in the output folder.
    refine_steps:       if > 0, also score f_mu(z*), z* from this many Adam steps on each image's
                        log posterior starting at g_mu(x) (``TrainedModel.refine_latents``), beside
                        the amortised f_mu(g_mu(x)): per_image.csv gains *_refined columns and
                        evaluation.json a "refined" block. 0 (default) leaves the outputs as without.
    refine_learning_rate: Adam's step size for the refinement (default
                        ``galaxyvae.runs.REFINE_LEARNING_RATE``).
    Writes evaluation.json, per_image.csv and table.md into the run directory, or into
    RUN_DIR/evaluations/<stem of data_path>/ when ``data_path`` is another data set.
    Raises InputError naming the path for a missing run directory, a data set without a
    held-out split or with images the model cannot take, and OutputExistsError if an
    evaluation exists and ``overwrite`` is false.
    """
    if importance_samples < 1:
        raise InputError(f"importance_samples must be at least 1, not {importance_samples}")
    refine = refine_settings(refine_steps, refine_learning_rate)
    model = load_trained_run(run_dir, checkpoint)
    if data_path is None and model.data_path is None:
        raise InputError(f"{run_dir}: config.json names no data set; give the data set to evaluate on")
    data_path = Path(data_path) if data_path is not None else Path(model.data_path)
    dataset, file_index = read_held_out(data_path, model.config.model.image_size)
    out_dir = output_folder(Path(run_dir), data_path, model.data_path)
    check_outputs_writable(out_dir, overwrite)
    started = time.perf_counter()
    columns, timings = per_image_metrics(model, dataset, file_index, importance_samples, seed, progress, refine)
    summary = summarize(columns, dataset, model, importance_samples=importance_samples, seed=seed,
                        checkpoint=checkpoint, refine=refine)
    timings["total"] = time.perf_counter() - started
    summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    result = EvaluationResult(summary, columns, out_dir)
    result.paths = write_outputs(result)
    log.info("evaluation written to %s", out_dir)
    return result


@dataclass(frozen=True)
class RefineSettings:
    """Per-image latent refinement at evaluation: ``steps`` Adam updates of step ``learning_rate``."""

    steps: int
    learning_rate: float


def refine_settings(steps: int, learning_rate: float | None) -> RefineSettings | None:
    """The refinement to run, or None for ``steps == 0``; InputError naming a bad argument."""
    from galaxyvae.runs import REFINE_LEARNING_RATE, check_refine_settings

    rate = REFINE_LEARNING_RATE if learning_rate is None else learning_rate
    steps, rate = check_refine_settings(steps, rate, names=("refine_steps", "refine_learning_rate"))
    return RefineSettings(steps, rate) if steps > 0 else None


def load_trained_run(run_dir: str | Path, checkpoint: str = "best"):
    """``galaxyvae.runs.load_run`` after checking the folder exists, so the error names it."""
    from galaxyvae.runs import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory (make one with `galaxyvae train`)")
    return load_run(run_dir, checkpoint=checkpoint)


def output_folder(run_dir: Path, data_path: Path, run_data_path: Path | None) -> Path:
    """The run directory for the run's own data set, RUN_DIR/evaluations/<stem>/ for another."""
    if run_data_path is not None and _same_file(data_path, Path(run_data_path)):
        return run_dir
    return run_dir / OTHER_DATA_FOLDER / data_path.stem


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_outputs_writable(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a finished evaluation unless ``overwrite``; make ``out_dir`` if needed.

    evaluation.json is written last, so per_image.csv or table.md without it are leftovers of an
    interrupted evaluation and are replaced.
    """
    if (out_dir / "evaluation.json").exists() and not overwrite:
        raise OutputExistsError(f"{out_dir / 'evaluation.json'} already exists; pass --overwrite "
                                "(overwrite=True) to evaluate again")
    out_dir.mkdir(parents=True, exist_ok=True)


def read_held_out(data_path: Path, image_size: int):
    """The held-out split of ``data_path`` and the row numbers of its images in the file.

    Raises InputError naming the file if it has no held-out images or if its images are not
    image_size x image_size.
    """
    from galaxyvae.dataset import read_dataset

    dataset = read_dataset(data_path, split="held_out")
    if dataset.images.shape[1:] != (image_size, image_size):
        raise InputError(f"{data_path}: images are {dataset.images.shape[1]}x{dataset.images.shape[2]} "
                         f"pixels but the model takes {image_size}x{image_size}")
    return dataset, _held_out_rows(data_path)


def _held_out_rows(data_path: Path) -> np.ndarray:
    import h5py

    with h5py.File(data_path, "r") as f:
        return np.flatnonzero(f["held_out"][()].astype(bool))


def per_image_metrics(model, dataset, file_index: np.ndarray, importance_samples: int, seed: int,
                      progress: bool = True, refine: RefineSettings | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every per-image column of per_image.csv, and the seconds each stage took."""
    images = dataset.images
    n = len(images)
    columns: dict[str, np.ndarray] = {
        "index": np.asarray(file_index, np.int64),
        "object_id": _metadata_column(dataset, "object_id", n),
        "family": _metadata_column(dataset, "family", n),
    }
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    columns.update(reconstruction_metrics(model, images, progress))
    timings["reconstruction"] = time.perf_counter() - clock
    if refine is not None:
        clock = time.perf_counter()
        columns.update(refined_metrics(model, images, refine, progress))
        timings["refinement"] = time.perf_counter() - clock
    clock = time.perf_counter()
    chunk = max(1, DECODES_PER_CALL // importance_samples)
    columns["elbo"] = _chunked(lambda x, s: model.elbo(x, mc_samples=importance_samples, seed=s),
                               images, seed, chunk, progress, f"ELBO ({importance_samples} samples)")
    columns["log_px_iw"] = _chunked(lambda x, s: model.importance_log_likelihood(x, k=importance_samples, seed=s),
                                    images, seed + 1, chunk, progress, f"log p(x), k={importance_samples}")
    timings["monte_carlo"] = time.perf_counter() - clock
    fit_sky = not bool(dataset.attrs["sky_subtracted"])
    for name in BASELINE_NAMES:
        clock = time.perf_counter()
        columns.update(baseline_metrics(name, images, columns, fit_sky, progress))
        timings[f"fit_{name}"] = time.perf_counter() - clock
    return columns, timings


def reconstruction_metrics(model, images: np.ndarray, progress: bool = True) -> dict[str, np.ndarray]:
    """MSE, log-likelihood and calibration of N(f_mu(g_mu(x)), f_sigma(g_mu(x))), per image."""
    parts = []
    for chunk in _progress(_chunks(len(images), IMAGES_PER_CHUNK), progress, "reconstructing"):
        x = images[chunk]
        z_mean, _ = model.encode(x)
        mean, variance = model.decode(z_mean)
        within = calibration_fractions(x, mean, variance)
        parts.append({
            "mse_vae": mean_squared_error(x, mean),
            "loglik_vae": gaussian_log_likelihood(x, mean, variance),
            **{f"within_{k}sigma": within[:, i] for i, k in enumerate(CALIBRATION_WIDTHS)},
        })
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def refined_metrics(model, images: np.ndarray, refine: RefineSettings,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """MSE and log-likelihood of N(f_mu(z*), f_sigma(z*)) per image, z* the refined latents:
    ``mse_vae_refined`` (squared data units) and ``loglik_vae_refined`` (nats)."""
    parts = []
    label = f"refining z ({refine.steps} steps)"
    for chunk in _progress(_chunks(len(images), IMAGES_PER_CHUNK), progress, label):
        x = images[chunk]
        mean, variance = model.decode(model.refine_latents(x, refine.steps, refine.learning_rate))
        parts.append({"mse_vae_refined": mean_squared_error(x, mean),
                      "loglik_vae_refined": gaussian_log_likelihood(x, mean, variance)})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def baseline_metrics(name: str, images: np.ndarray, columns: dict[str, np.ndarray],
                     fit_sky: bool, progress: bool = True) -> dict[str, np.ndarray]:
    """Fit baseline ``name`` to every image; its MSE, best-sigma log-likelihood, the VAE's wins
    (also those of the refined reconstruction when ``columns`` hold the *_refined columns)."""
    from galaxyvae import baselines

    fitter = {"gaussian": baselines.fit_gaussian, "sersic": baselines.fit_sersic}[name]
    log.info("fitting a %s profile%s to %d images", BASELINE_LABELS[name],
             " plus a constant sky level" if fit_sky else "", len(images))
    fits = [fitter(images[chunk], fit_sky=fit_sky)
            for chunk in _progress(_chunks(len(images), IMAGES_PER_CHUNK), progress, f"{name} fits")]
    model_images = np.concatenate([fit.model_images for fit in fits])
    converged = np.concatenate([fit.converged for fit in fits])
    mse = mean_squared_error(images, model_images)
    loglik = np.asarray(baselines.max_gaussian_log_likelihood(images, model_images), np.float64)
    metrics = {
        f"mse_{name}": mse,
        f"loglik_{name}": loglik,
        f"mse_win_{name}": mse_wins(columns["mse_vae"], mse),
        f"likelihood_win_{name}": likelihood_wins(columns["loglik_vae"], loglik),
        f"converged_{name}": np.asarray(converged, bool),
    }
    if "mse_vae_refined" in columns:
        metrics[f"mse_win_{name}_refined"] = mse_wins(columns["mse_vae_refined"], mse)
        metrics[f"likelihood_win_{name}_refined"] = likelihood_wins(columns["loglik_vae_refined"], loglik)
    return metrics


def _metadata_column(dataset, name: str, n: int) -> np.ndarray:
    values = dataset.metadata.get(name)
    return np.array([""] * n if values is None else [str(v) for v in values], dtype=object)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _chunked(estimate: Callable[[np.ndarray, int], np.ndarray], images: np.ndarray, seed: int, size: int,
             progress: bool, label: str) -> np.ndarray:
    """Apply a Monte Carlo estimate ``size`` images at a time, each chunk with its own seed from ``seed``."""
    parts = []
    for number, chunk in enumerate(_progress(_chunks(len(images), size), progress, label)):
        chunk_seed = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
        parts.append(np.asarray(estimate(images[chunk], chunk_seed), np.float64))
    return np.concatenate(parts)


def _progress(items, enabled: bool, label: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=label, unit="chunk", leave=False)


# --- aggregates ------------------------------------------------------------------------------

def summarize(columns: dict[str, np.ndarray], dataset, model, importance_samples: int, seed: int,
              checkpoint: str = "best", refine: RefineSettings | None = None) -> dict[str, Any]:
    """The contents of evaluation.json from the per-image columns (see docs/evaluation.md)."""
    n_pixels = int(np.prod(dataset.images.shape[1:]))
    summary = {
        "n_images": int(len(dataset.images)),
        "n_pixels": n_pixels,
        "pixel_units": dataset.attrs.get("pixel_units"),
        "data": str(Path(dataset.path).resolve()),
        "data_provenance": data_provenance(dataset, model.data_path),
        "split": "held_out",
        "run_dir": str(Path(model.run_dir).resolve()),
        "checkpoint": checkpoint,
        "importance_samples": importance_samples,
        "elbo_samples": importance_samples,
        "seed": seed,
        "bootstrap": {"method": "percentile", "resamples": BOOTSTRAP_RESAMPLES, "level": BOOTSTRAP_LEVEL,
                      "seed": seed, "note": "the same resamples of images for every interval"},
        "fit_sky": not bool(dataset.attrs["sky_subtracted"]),
        "vae": vae_summary(columns, n_pixels),
        "baselines": {name: baseline_summary(columns, name, seed) for name in BASELINE_NAMES},
        **({"refined": refined_summary(columns, refine, seed)} if refine is not None else {}),
        "paper": dict(PAPER),
        "created": utc_now(),
        "command": command_line(),
        "galaxyvae_version": __version__,
        "versions": library_versions(),
    }
    return summary


def vae_summary(columns: dict[str, np.ndarray], n_pixels: int) -> dict[str, Any]:
    """Mean/median MSE, ELBO and log p(x) (nats per image, bits per pixel), calibration."""
    elbo, log_px = float(np.mean(columns["elbo"])), float(np.mean(columns["log_px_iw"]))
    summary = {
        "mean_mse": float(np.mean(columns["mse_vae"])),
        "median_mse": float(np.median(columns["mse_vae"])),
        "mean_loglik_nats": float(np.mean(columns["loglik_vae"])),
        "elbo_nats": elbo,
        "elbo_bits_per_pixel": float(bits_per_pixel(elbo, n_pixels)),
        "negative_elbo_bits_per_pixel": float(-bits_per_pixel(elbo, n_pixels)),
        "log_px_iw_nats": log_px,
        "log_px_iw_bits_per_pixel": float(bits_per_pixel(log_px, n_pixels)),
        "negative_log_px_iw_bits_per_pixel": float(-bits_per_pixel(log_px, n_pixels)),
    }
    for k in CALIBRATION_WIDTHS:
        summary[f"calibration_within_{k}sigma"] = float(np.mean(columns[f"within_{k}sigma"]))
        summary[f"calibration_within_{k}sigma_if_calibrated"] = calibrated_fraction(k)
    return summary


def baseline_summary(columns: dict[str, np.ndarray], name: str, seed: int) -> dict[str, Any]:
    """Win fractions with bootstrap intervals, mean/median MSE and converged fraction of one baseline."""
    mse = columns[f"mse_{name}"]
    summary: dict[str, Any] = {}
    for kind in ("mse", "likelihood"):
        wins = columns[f"{kind}_win_{name}"]
        summary[f"{kind}_win_fraction"] = float(np.mean(wins))
        summary[f"{kind}_win_ci95"] = list(bootstrap_mean_interval(wins, seed=seed))
    summary.update(
        mean_mse=float(np.nanmean(mse)) if np.isfinite(mse).any() else float("nan"),
        median_mse=float(np.nanmedian(mse)) if np.isfinite(mse).any() else float("nan"),
        mean_loglik_nats=float(np.mean(columns[f"loglik_{name}"])),
        fit_converged_fraction=float(np.mean(columns[f"converged_{name}"])),
    )
    return summary


def refined_summary(columns: dict[str, np.ndarray], refine: RefineSettings, seed: int) -> dict[str, Any]:
    """The "refined" block of evaluation.json: the settings, the refined reconstruction's MSE and
    log-likelihood (and how many images refinement improved), and its wins against each fit."""
    mse, loglik = columns["mse_vae_refined"], columns["loglik_vae_refined"]
    baselines = {}
    for name in BASELINE_NAMES:
        baselines[name] = {}
        for kind in ("mse", "likelihood"):
            wins = columns[f"{kind}_win_{name}_refined"]
            baselines[name][f"{kind}_win_fraction"] = float(np.mean(wins))
            baselines[name][f"{kind}_win_ci95"] = list(bootstrap_mean_interval(wins, seed=seed))
    return {
        "steps": refine.steps,
        "learning_rate": refine.learning_rate,
        "optimizer": "adam",
        "objective": "log N(x; f_mu(z), f_sigma(z)) + log N(z; 0, I), from z = g_mu(x); best z seen per image",
        "vae": {
            "mean_mse": float(np.mean(mse)),
            "median_mse": float(np.median(mse)),
            "mean_loglik_nats": float(np.mean(loglik)),
            "median_loglik_nats": float(np.median(loglik)),
            "mse_improved_fraction": float(np.mean(mse < columns["mse_vae"])),
            "loglik_improved_fraction": float(np.mean(loglik > columns["loglik_vae"])),
        },
        "baselines": baselines,
    }


def data_provenance(dataset, run_data_path: Path | None) -> dict[str, Any]:
    """Where the evaluated images came from: the file, its attributes and provenance record."""
    path = Path(dataset.path)
    stat = path.stat()
    keep = ("source", "pixel_units", "pixel_scale_arcsec", "sky_subtracted", "seed", "created",
            "galaxyvae_version", "command", "n_images", "n_held_out", "format_version")
    return {
        "path": str(path.resolve()),
        "bytes": stat.st_size,
        "is_the_runs_own_data": run_data_path is not None and _same_file(path, Path(run_data_path)),
        "attrs": {k: dataset.attrs[k] for k in keep if k in dataset.attrs},
        "provenance": dataset.provenance,
    }


# --- outputs ---------------------------------------------------------------------------------

def write_outputs(result: EvaluationResult) -> dict[str, Path]:
    """Write per_image.csv, table.md, then evaluation.json (last: it marks a finished evaluation)."""
    paths = {name: result.output_dir / name for name in OUTPUT_NAMES}
    write_text_atomic(paths["per_image.csv"], per_image_csv(result.per_image))
    write_text_atomic(paths["table.md"], result.table_markdown())
    write_json_atomic(paths["evaluation.json"], _finite_or_none(result.summary))
    return paths


def per_image_csv(columns: dict[str, np.ndarray]) -> str:
    """The per-image columns as CSV text; floats are written so they read back exactly."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(columns)
    writer.writerow(names)
    for row in zip(*(columns[name] for name in names)):
        writer.writerow([_csv_value(v) for v in row])
    return buffer.getvalue()


def _csv_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _finite_or_none(obj):
    """JSON has no NaN or Infinity: write them as null."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- the Markdown table ----------------------------------------------------------------------

def render_table(summary: dict[str, Any]) -> str:
    """table.md: the paper's two claims for each baseline with 95% intervals and the paper's
    numbers beside them, then the model's own scores (ELBO, log p(x), calibration). With a
    "refined" block, the refined reconstruction's claims stand beside the amortised ones."""
    comparison = refined_comparison_lines(summary) if summary.get("refined") else comparison_lines(summary)
    return "\n".join(comparison + [""] + model_table_lines(summary)) + "\n"


def comparison_lines(summary: dict[str, Any]) -> list[str]:
    """The paper's table for the amortised reconstruction f_mu(g_mu(x)), one column per baseline."""
    baselines = summary["baselines"]
    paper = summary.get("paper", PAPER)
    n = summary["n_images"]
    units = summary.get("pixel_units") or "data units"
    labels = [BASELINE_LABELS.get(b, b) for b in baselines]
    lines = [
        "## Held-out comparison with per-image parametric fits",
        "",
        f"{n} held-out images of `{summary['data']}`. x̂ is the fitted profile evaluated at each pixel; "
        "f_μ(g_μ(x)) is the VAE's reconstruction. Brackets: 95% percentile-bootstrap interval "
        f"({summary.get('bootstrap', {}).get('resamples', BOOTSTRAP_RESAMPLES)} resamples). "
        "The paper compares with the Gaussian fit only.",
        "",
        "| On X% of held-out images… | paper (Gaussian x̂) | " + " | ".join(f"{l} x̂" for l in labels) + " |",
        "|---|---:|" + "---:|" * len(labels),
        "| f_μ(g_μ(x)) has lower MSE than x̂ | " + _percent(paper["mse_win_fraction"]) + " | "
        + " | ".join(_with_interval(s["mse_win_fraction"], s["mse_win_ci95"]) for s in baselines.values()) + " |",
        "| x has higher probability under N(f_μ(g_μ(x)), f_σ(g_μ(x))) than under N(x̂, σ²I) for every σ > 0 | "
        + _percent(paper["likelihood_win_fraction"]) + " | "
        + " | ".join(_with_interval(s["likelihood_win_fraction"], s["likelihood_win_ci95"])
                     for s in baselines.values()) + " |",
        f"| mean MSE of x̂ ({units}²) | — | " + " | ".join(_number(s["mean_mse"]) for s in baselines.values()) + " |",
        f"| median MSE of x̂ ({units}²) | — | "
        + " | ".join(_number(s["median_mse"]) for s in baselines.values()) + " |",
        "| fits converged | — | " + " | ".join(_percent(s["fit_converged_fraction"]) for s in baselines.values())
        + " |",
        "",
    ]
    for name, label in zip(baselines, labels):
        s = baselines[name]
        lines.append(f"- On {_percent(s['mse_win_fraction'])} of held-out images, f_μ(g_μ(x)) has lower MSE than "
                     f"the {label} fit x̂ (paper, Gaussian: {_percent(paper['mse_win_fraction'])}); on "
                     f"{_percent(s['likelihood_win_fraction'])} the pixels are more probable under the VAE "
                     f"than under N(x̂, σ²I) for every σ > 0 (paper: {_percent(paper['likelihood_win_fraction'])}).")
    return lines


def refined_label(refined: dict[str, Any]) -> str:
    """How z* was found, for captions: 'N steps of Adam (learning rate r) on log p(x | z) + log p(z)'."""
    return (f"{refined['steps']} steps of Adam (learning rate {refined['learning_rate']:g}) on "
            "log N(x; f_μ(z), f_σ(z)) + log N(z; 0, I) from z = g_μ(x)")


def refined_comparison_lines(summary: dict[str, Any]) -> list[str]:
    """The paper's table with two columns per baseline: amortised f_mu(g_mu(x)) (the paper's
    definition, the headline) and refined f_mu(z*)."""
    baselines, refined = summary["baselines"], summary["refined"]
    paper = summary.get("paper", PAPER)
    units = summary.get("pixel_units") or "data units"
    labels = [BASELINE_LABELS.get(b, b) for b in baselines]
    pairs = [(baselines[b], refined["baselines"][b]) for b in baselines]

    def row(label: str, paper_value: float, kind: str) -> str:
        cells = [_with_interval(s[f"{kind}_win_fraction"], s[f"{kind}_win_ci95"]) for pair in pairs for s in pair]
        return f"| {label} | {_percent(paper_value)} | " + " | ".join(cells) + " |"

    lines = [
        "## Held-out comparison with per-image parametric fits",
        "",
        f"{summary['n_images']} held-out images of `{summary['data']}`. x̂ is the fitted profile evaluated at each "
        "pixel. Two reconstructions of the VAE: **amortised**, f_μ(g_μ(x)), the paper's definition and the "
        f"headline; and **refined**, f_μ(z*), z* from {refined_label(refined)}, keeping per image the best z seen. "
        "Brackets: 95% percentile-bootstrap interval "
        f"({summary.get('bootstrap', {}).get('resamples', BOOTSTRAP_RESAMPLES)} resamples). "
        "The paper compares with the Gaussian fit only.",
        "",
        "| On X% of held-out images… | paper (Gaussian x̂) | "
        + " | ".join(f"{l} x̂: amortised f_μ(g_μ(x)) | {l} x̂: refined f_μ(z*)" for l in labels) + " |",
        "|---|---:|" + "---:|---:|" * len(labels),
        row("the VAE's reconstruction has lower MSE than x̂", paper["mse_win_fraction"], "mse"),
        row("x has higher probability under N(f_μ(z), f_σ(z)), z = g_μ(x) or z*, than under N(x̂, σ²I) "
            "for every σ > 0", paper["likelihood_win_fraction"], "likelihood"),
    ]
    for key, label, show in (("mean_mse", f"mean MSE of x̂ ({units}²)", _number),
                             ("median_mse", f"median MSE of x̂ ({units}²)", _number),
                             ("fit_converged_fraction", "fits converged", _percent)):
        lines.append(f"| {label} | — | " + " | ".join(f"{show(a[key])} | (same fit)" for a, _ in pairs) + " |")
    lines.append("")
    for label, (amortised, better) in zip(labels, pairs):
        lines.append(f"- Against the {label} fit, amortised f_μ(g_μ(x)) wins on "
                     f"{_percent(amortised['mse_win_fraction'])} of held-out images on MSE and on "
                     f"{_percent(amortised['likelihood_win_fraction'])} on likelihood (paper, Gaussian: "
                     f"{_percent(paper['mse_win_fraction'])} and {_percent(paper['likelihood_win_fraction'])}); "
                     f"refined f_μ(z*) on {_percent(better['mse_win_fraction'])} and "
                     f"{_percent(better['likelihood_win_fraction'])}.")
    return lines


def model_table_lines(summary: dict[str, Any]) -> list[str]:
    """The second table of table.md: the VAE's own scores."""
    vae = summary["vae"]
    k = summary.get("importance_samples", "?")
    units = summary.get("pixel_units") or "data units"
    return [
        "## The model's own scores on the held-out images",
        "",
        "| quantity | nats per image | bits per pixel |",
        "|---|---:|---:|",
        f"| ELBO (mean; {summary.get('elbo_samples', k)} samples of z) | {_number(vae['elbo_nats'])} | "
        f"{_number(vae['elbo_bits_per_pixel'])} |",
        f"| log p(x), importance-weighted (k = {k}) | {_number(vae['log_px_iw_nats'])} | "
        f"{_number(vae['log_px_iw_bits_per_pixel'])} |",
        f"| −log p(x) (the customary negative log-likelihood) | {_number(-vae['log_px_iw_nats'])} | "
        f"{_number(vae['negative_log_px_iw_bits_per_pixel'])} |",
        f"| log N(x; f_μ(g_μ(x)), f_σ(g_μ(x))) | {_number(vae['mean_loglik_nats'])} | "
        f"{_number(float(bits_per_pixel(vae['mean_loglik_nats'], summary['n_pixels'])))} |",
        "",
        "| quantity | VAE | a calibrated Gaussian |",
        "|---|---:|---:|",
        f"| mean / median MSE of f_μ(g_μ(x)) ({units}²) | {_number(vae['mean_mse'])} / "
        f"{_number(vae['median_mse'])} | — |",
        f"| pixels whose residual x − f_μ lies within ±1 √f_σ | {_percent(vae['calibration_within_1sigma'], 1)} | "
        f"{_percent(calibrated_fraction(1), 1)} |",
        f"| pixels whose residual x − f_μ lies within ±2 √f_σ | {_percent(vae['calibration_within_2sigma'], 1)} | "
        f"{_percent(calibrated_fraction(2), 1)} |",
        "",
        f"Pixel values are in {units}; densities, and so nats and bits, depend on those units. "
        "Higher log p(x) is better; lower −log p(x) is better.",
    ] + refined_model_lines(summary)


def refined_model_lines(summary: dict[str, Any]) -> list[str]:
    """With a "refined" block: the refined reconstruction's MSE and likelihood beside the amortised ones."""
    refined = summary.get("refined")
    if not refined:
        return []
    vae, better = summary["vae"], refined["vae"]
    units = summary.get("pixel_units") or "data units"
    return [
        "",
        f"Refined f_μ(z*): {refined_label(refined)}.",
        "",
        "| quantity | amortised f_μ(g_μ(x)) | refined f_μ(z*) |",
        "|---|---:|---:|",
        f"| mean / median MSE ({units}²) | {_number(vae['mean_mse'])} / {_number(vae['median_mse'])} | "
        f"{_number(better['mean_mse'])} / {_number(better['median_mse'])} |",
        f"| log N(x; f_μ(z), f_σ(z)), mean nats per image | {_number(vae['mean_loglik_nats'])} | "
        f"{_number(better['mean_loglik_nats'])} |",
        f"| images whose MSE refinement lowered | — | {_percent(better['mse_improved_fraction'])} |",
        f"| images whose log-likelihood refinement raised | — | {_percent(better['loglik_improved_fraction'])} |",
    ]


def _percent(value, digits: int = 1) -> str:
    if value is None or value != value:
        return "?"
    return f"{100 * float(value):.{digits}f}%"


def _with_interval(value, interval) -> str:
    low, high = interval
    return f"{_percent(value)} [{_percent(low)}, {_percent(high)}]"


def _number(value) -> str:
    if value is None or value != value:
        return "?"
    return f"{float(value):.4g}"
