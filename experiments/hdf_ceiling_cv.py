"""Cross-validation inside the Hubble Deep Field training cutouts: which pretrained run fine-tunes best?

The transfer experiment (``hdf_transfer.py``) scores on a fixed held-out fifth of the cutouts, 21
images. Choosing a setting by those scores would make them optimistic, so settings are compared
here on the other 85 only: they are split into ``--folds`` folds; for each pretrained run and each
fold the run is fine-tuned (the experiment's ``FINETUNE`` settings) on the other folds and scored on
that fold, amortised (MSE and likelihood wins), against per-image Gaussian and Sérsic fits. The
held-out cutouts are never read. With ``--diagnose`` it also scores the MAP z* (200 steps of
refinement) and the z that minimises the MSE itself (``mse_ceiling.py``), which separate the
decoder's reach from inference.

    python experiments/hdf_ceiling_cv.py --out runs/ceiling_cv --hdf runs/transfer/hdf.h5 \\
        --pretrained PRETRAINED_RUN [PRETRAINED_RUN ...] --diagnose

Each pretrained run carries its own variance ceiling (``pixel_variance_max``), so this compares
ceilings by comparing runs pretrained with them; ``--finetune-ceiling`` replaces it while
fine-tuning, ``--finetune SETTING=VALUE`` replaces fine-tuning settings, and ``--refit-sigma C``
also scores each fine-tuned run after its f_sigma alone is refitted under ceiling C (the
experiment's ``refit_sigma``). Fine-tuned runs and fits are kept in OUT and
reused when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hdf_transfer import FINETUNE, check_same_settings, refit_sigma  # noqa: E402
from mse_ceiling import mse_optimal_latents  # noqa: E402

from galaxyvae._io import write_json_atomic  # noqa: E402
from galaxyvae.config import TrainConfig  # noqa: E402
from galaxyvae.baselines import fit_gaussian, fit_sersic, max_gaussian_log_likelihood  # noqa: E402
from galaxyvae.dataset import read_dataset, write_dataset  # noqa: E402
from galaxyvae.runs import SUGGESTED_REFINE_STEPS, load_run  # noqa: E402
from galaxyvae.training import train  # noqa: E402

log = logging.getLogger("hdf_ceiling_cv")
KEPT_ATTRS = ("source", "pixel_units", "pixel_scale_arcsec", "sky_subtracted", "seed")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the folds, fits and fine-tuned runs")
    p.add_argument("--hdf", type=Path, required=True, help="the cutouts (hdf.h5 of hdf_transfer.py)")
    p.add_argument("--pretrained", type=Path, nargs="+", required=True, help="pretrained run directories to compare")
    p.add_argument("--folds", type=int, default=5, help="folds of the training cutouts")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of fine-tuning")
    p.add_argument("--diagnose", action="store_true", help="also score the MAP z* and the MSE-optimal z")
    p.add_argument("--checkpoint-metric", choices=("elbo", "mse"), default="elbo",
                   help="what picks each fine-tuned run's best.pt on its validation cutouts")
    p.add_argument("--finetune-ceiling", type=float, default=None,
                   help="f_sigma ceiling while fine-tuning (default: the pretrained run's)")
    p.add_argument("--finetune", nargs="*", default=[], metavar="SETTING=VALUE",
                   help="fine-tuning settings that replace the experiment's FINETUNE ones, e.g. epochs=300")
    p.add_argument("--refit-sigma", type=float, nargs="*", default=[],
                   help="after fine-tuning, refit f_sigma alone (--freeze mean) under each of these ceilings "
                        "and score its likelihood (the MSE cannot change)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_arguments(argv)
    args.finetune = finetune_settings(args.finetune)
    args.out.mkdir(parents=True, exist_ok=True)
    cutouts = read_dataset(args.hdf, split="train")
    folds = np.random.default_rng(args.seed).permutation(len(cutouts.images)) % args.folds
    fits = baseline_scores(cutouts.images, args.out / "baselines.npz")
    results = {}
    for pretrained in args.pretrained:
        ceiling = args.finetune_ceiling or load_run(pretrained).model.config.pixel_variance_max
        for refit_ceiling in [None, *args.refit_sigma]:
            mse, log_likelihood = cross_validated_scores(pretrained, cutouts, folds, args, refit_ceiling)
            label = str(pretrained) + (f" → f_σ refitted under {refit_ceiling:g}" if refit_ceiling else "")
            results[label] = {"pixel_variance_max": ceiling,
                              "likelihood": likelihood_win_fractions(log_likelihood, fits),
                              **{kind: mse_win_fractions(values, fits) for kind, values in mse.items()},
                              "amortised_mse_per_cutout": mse["amortised"].tolist()}
    suffix = f"-ceiling{args.finetune_ceiling:g}" if args.finetune_ceiling else ""
    suffix += "".join(f"-{key}{value}" for key, value in args.finetune.items())
    write_json_atomic(args.out / f"results-{args.checkpoint_metric}{suffix}.json",
                      {"hdf": str(args.hdf), "n_cutouts": len(folds), "folds": args.folds, "seed": args.seed,
                       "checkpoint_metric": args.checkpoint_metric, "finetune_ceiling": args.finetune_ceiling,
                       "finetune": args.finetune,
                       "runs": results})
    print(render(results, len(folds), args.folds))
    return 0


def baseline_scores(images: np.ndarray, cache: Path) -> dict[str, np.ndarray]:
    """Per-cutout MSE ("gaussian", "sersic") and best log N(x; x̂, σ²I) ("gaussian_loglik", ...) of the
    two fits, (N,) each, fitted once and cached."""
    if not cache.exists():
        fits = {"gaussian": fit_gaussian(images), "sersic": fit_sersic(images)}
        log_likelihoods = {f"{name}_loglik": max_gaussian_log_likelihood(images, fit.model_images)
                           for name, fit in fits.items()}
        np.savez(cache, **{name: fit.mse for name, fit in fits.items()}, **log_likelihoods)
    with np.load(cache) as stored:
        return dict(stored)


def cross_validated_scores(pretrained: Path, cutouts, folds: np.ndarray, args,
                           refit_ceiling: float | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each cutout scored by the run fine-tuned without its fold (and, with ``refit_ceiling``, its
    f_sigma then refitted under that ceiling): the MSE of f_mu(z) by kind of z ("amortised", and
    with --diagnose "map", "mse_optimal") -> (N,), and the amortised
    log N(x; f_mu(g_mu(x)), f_sigma(g_mu(x))) in nats, (N,)."""
    kinds = ("amortised", "map", "mse_optimal") if args.diagnose else ("amortised",)
    mse = {kind: np.full(len(folds), np.nan) for kind in kinds}
    log_likelihood = np.full(len(folds), np.nan)
    for k in range(args.folds):
        run_dir = fine_tuned(pretrained, cutouts, folds, k, args)
        if refit_ceiling is not None:
            data = Path(json.loads((run_dir / "config.json").read_text())["data"])
            run_dir = refit_sigma(run_dir, data, run_dir.with_name(f"{run_dir.name}-sigma{refit_ceiling:g}"),
                                  args.seed, refit_ceiling)
        model = load_run(run_dir)
        for parameter in model.model.parameters():
            parameter.requires_grad_(False)
        scored = folds == k
        x = cutouts.images[scored]
        z = model.encode(x)[0]
        mse["amortised"][scored] = pixel_mse(model.decode(z)[0], x)
        log_likelihood[scored] = model.log_likelihood(x)
        if args.diagnose:
            mse["map"][scored] = pixel_mse(model.decode(model.refine_latents(x, SUGGESTED_REFINE_STEPS))[0], x)
            mse["mse_optimal"][scored] = mse_optimal_latents(model, x, z, steps=400)
    return mse, log_likelihood


def fine_tuned(pretrained: Path, cutouts, folds: np.ndarray, k: int, args) -> Path:
    """The run fine-tuned from ``pretrained`` on every fold but ``k`` (trained once, then reused)."""
    metric = "" if args.checkpoint_metric == "elbo" else f"-{args.checkpoint_metric}"
    ceiling = f"-ceiling{args.finetune_ceiling:g}" if args.finetune_ceiling else ""
    settings = "".join(f"-{key}{value}" for key, value in args.finetune.items())
    run_dir = args.out / pretrained.parent.name / f"{pretrained.name}{metric}{ceiling}{settings}" / f"fold{k}"
    config = replace(FINETUNE, seed=args.seed, checkpoint_metric=args.checkpoint_metric, **args.finetune)
    if args.finetune_ceiling:
        config = replace(config, model=replace(load_run(pretrained).model.config,
                                               pixel_variance_max=args.finetune_ceiling))
    check_same_settings(run_dir, config)
    if (run_dir / "checkpoints" / "best.pt").exists():
        return run_dir
    data = args.out / f"fold{k}.h5"
    if not data.exists():
        attrs = {key: cutouts.attrs[key] for key in KEPT_ATTRS if key in cutouts.attrs}
        write_dataset(data, cutouts.images, folds == k, attrs, provenance={"folds_of": str(args.hdf), "fold": k})
    log.info("fine-tuning %s on the cutouts outside fold %d", pretrained, k)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return train(data, run_dir, config, init=pretrained, progress=False)


def finetune_settings(pairs: list[str]) -> dict[str, object]:
    """``["epochs=300", ...]`` -> ``{"epochs": 300, ...}``, each value of its TrainConfig field's type."""
    defaults = TrainConfig().to_dict()
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in defaults or key == "model" or not value:
            raise SystemExit(f"--finetune {pair!r}: expected SETTING=VALUE with a TrainConfig setting")
        kind = type(defaults[key])
        settings[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return settings


def pixel_mse(model_images: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Mean squared residual over pixels, (N,), in squared data units."""
    return np.square(model_images.astype(np.float64) - images).reshape(len(images), -1).mean(1)


def mse_win_fractions(mse: np.ndarray, fits: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of cutouts on which ``mse`` is below each fit's, and the mean over cutouts of
    log(mse / fit's MSE), which also counts by how much each cutout is won or lost."""
    scores = {}
    for name in ("gaussian", "sersic"):
        scores[f"mse_win_{name}"] = float(np.mean(mse < fits[name]))
        scores[f"mean_log_mse_ratio_{name}"] = float(np.mean(np.log(mse / fits[name])))
    return scores


def likelihood_win_fractions(log_likelihood: np.ndarray, fits: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of cutouts more probable under the VAE than under N(x̂, σ²I) for every σ, per fit."""
    return {f"likelihood_win_{name}": float(np.mean(log_likelihood > fits[f"{name}_loglik"]))
            for name in ("gaussian", "sersic")}


def render(results: dict, n: int, folds: int) -> str:
    """A Markdown table of the cross-validated likelihood and MSE wins."""
    lines = [f"{folds}-fold cross-validation over the {n} training cutouts (held-out cutouts not used). "
             "Wins against the Gaussian / Sérsic fits:", "",
             "| pretrained run | f_σ ceiling | likelihood, amortised | MSE, amortised f_μ(g_μ(x)) "
             "| mean log MSE ratio, amortised | MSE, MAP z* | MSE, MSE-optimal z |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run, row in results.items():
        likelihood = row["likelihood"]
        cells = [f"{likelihood['likelihood_win_gaussian']:.1%} / {likelihood['likelihood_win_sersic']:.1%}"]
        cells += [f"{row[kind]['mse_win_gaussian']:.1%} / {row[kind]['mse_win_sersic']:.1%}" if kind in row else "—"
                  for kind in ("amortised", "map", "mse_optimal")]
        amortised = row["amortised"]
        cells.insert(2, f"{amortised['mean_log_mse_ratio_gaussian']:.3f} / "
                        f"{amortised['mean_log_mse_ratio_sersic']:.3f}")
        lines.append(f"| `{run}` | {row['pixel_variance_max']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
