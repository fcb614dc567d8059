"""The ``galaxyvae`` command: a thin shell over the library.

``main(argv)`` parses and dispatches and returns an exit status, so the command line is
tested by calling ``main([...])``. Library modules are imported inside each command, so
``galaxyvae info`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from galaxyvae import __version__
from galaxyvae.errors import GalaxyVAEError

log = logging.getLogger("galaxyvae")


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: sys.argv[1:]); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return args.run(args) or 0
    except GalaxyVAEError as err:
        print(f"galaxyvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"galaxyvae {args.command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())


def show_progress(args) -> bool:
    """Progress bars go to a terminal only, and not with -q: in a log file they are noise."""
    return args.quiet == 0 and sys.stderr.isatty()


def configure_logging(verbosity: int) -> None:
    """-q -> warnings only, default -> info, -v -> debug."""
    level = logging.INFO if verbosity == 0 else (logging.DEBUG if verbosity > 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", force=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per step of the pipeline."""
    parser = argparse.ArgumentParser(
        prog="galaxyvae",
        description="A deep generative model of galaxy images (Regier, McAuliffe & Prabhat).",
    )
    parser.add_argument("--version", action="version", version=f"galaxyvae {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output (repeatable)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less output (repeatable)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_simulate, add_ingest, add_info, add_show, add_train, add_evaluate, add_figures,
                add_report, add_reproduce, add_morphology):
        add(commands)
    return parser


def _overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


# --- data ------------------------------------------------------------------------------------

def add_simulate(commands) -> None:
    p = commands.add_parser("simulate", help="simulate a survey of SDSS-like galaxy stamps with GalSim")
    p.add_argument("--n", type=int, default=44_444, help="stamps in all (default 44,444 as in the paper)")
    p.add_argument("--held-out", type=int, default=None,
                   help="how many of them to hold out (default 1,000 as in the paper, or a fifth of the stamps "
                        "if fewer than 5,000)")
    p.add_argument("--out", type=Path, required=True, help="output data set (.h5)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--preset", default="sdss",
                   help="sdss (default: the paper's SDSS-like survey in nanomaggies) or deep-field (Hubble-Deep-"
                        "Field-like display cutouts for pretraining; see docs/simulation.md)")
    _overwrite_flag(p)
    p.set_defaults(run=run_simulate)


def run_simulate(args) -> int:
    from galaxyvae.simulation import simulate_survey

    simulate_survey(args.out, n_images=args.n, n_held_out=args.held_out, seed=args.seed,
                    workers=args.workers, overwrite=args.overwrite, progress=show_progress(args), preset=args.preset)
    return 0


def add_ingest(commands) -> None:
    p = commands.add_parser("ingest", help="turn real images on disk into a galaxyvae data set")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="image files or folders: Galaxy Zoo JPEG folders, Galaxy10 .h5, FITS, PNG/JPEG, "
                        "or skimage:hubble_deep_field (scikit-image's Hubble Deep Field picture)")
    p.add_argument("--out", type=Path, required=True, help="output data set (.h5)")
    p.add_argument("--held-out", type=int, default=None,
                   help="how many to hold out (default: 1,000 as in the paper, or a fifth of the images "
                        "when fewer than 5,000 are kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split")
    p.add_argument("--band", default=None,
                   help="FITS cube plane index, or colour channel (r, g or b) for colour images; "
                        "default: luminance for colour images")
    p.add_argument("--detect", action="store_true",
                   help="treat each image as a field of many galaxies: detect and cut a stamp around each")
    p.add_argument("--labels", type=Path, default=None,
                   help="Galaxy Zoo training_solutions_rev1.csv to join as metadata")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    _overwrite_flag(p)
    p.set_defaults(run=run_ingest)


def run_ingest(args) -> int:
    from galaxyvae.ingest import ingest

    report = ingest(args.paths, args.out, n_held_out=args.held_out, seed=args.seed, band=args.band,
                    detect=args.detect, labels_csv=args.labels, strict=args.strict, overwrite=args.overwrite,
                    progress=show_progress(args))
    print(report.summary())
    return 0


def add_info(commands) -> None:
    p = commands.add_parser("info", help="summarise a data set")
    p.add_argument("file", type=Path, help="data set (.h5)")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from galaxyvae.dataset import read_dataset, summarize

    print(summarize(read_dataset(args.file)))
    return 0


def add_show(commands) -> None:
    p = commands.add_parser("show", help="draw a contact sheet of a data set (asinh stretch)")
    p.add_argument("file", type=Path, help="data set (.h5)")
    p.add_argument("--out", type=Path, required=True, help="output image (.png)")
    p.add_argument("--n", type=int, default=64, help="images to draw (per family with --by-family)")
    p.add_argument("--seed", type=int, default=0, help="seed choosing which images")
    p.add_argument("--by-family", action="store_true", help="one row per family")
    p.set_defaults(run=run_show)


def run_show(args) -> int:
    from galaxyvae.dataset import read_dataset
    from galaxyvae.figures import dataset_sheet

    out = dataset_sheet(read_dataset(args.file), args.out, n=args.n, seed=args.seed, by_family=args.by_family)
    log.info("wrote %s", out)
    return 0


# --- model -----------------------------------------------------------------------------------

def add_train(commands) -> None:
    from galaxyvae.config import TrainConfig, add_config_arguments

    p = commands.add_parser("train", help="fit the VAE to a data set's training split")
    p.add_argument("data", type=Path, help="data set (.h5)")
    p.add_argument("--out", type=Path, required=True, help="run directory to create (or resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--init", type=Path, default=None, help="start from the weights of an earlier run directory")
    add_config_arguments(p, TrainConfig)
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from dataclasses import replace

    from galaxyvae.config import ModelConfig, TrainConfig, config_from_arguments, given_arguments
    from galaxyvae.runs import RunPaths, read_run_config
    from galaxyvae.training import resumed_config, train

    if args.resume:
        config = resumed_config(args.out, **given_arguments(args, TrainConfig))
    else:
        config = config_from_arguments(args, TrainConfig)
    model_settings = given_arguments(args, ModelConfig)
    if args.init is not None and not args.resume and model_settings:
        # Model options given with --init amend the init run's model (train() refuses shape changes).
        init_model = read_run_config(RunPaths(args.init))[0].model
        config = replace(config, model=replace(init_model, **model_settings))
    run_dir = train(args.data, args.out, config, resume=args.resume,
                    init=args.init, progress=show_progress(args))
    log.info("trained: %s", run_dir)
    return 0


# --- evaluation ------------------------------------------------------------------------------

def add_evaluate(commands) -> None:
    p = commands.add_parser("evaluate", help="held-out metrics against per-image Gaussian and Sersic fits")
    p.add_argument("run_dir", type=Path, help="run directory made by `galaxyvae train`")
    p.add_argument("data", type=Path, nargs="?", default=None,
                   help="data set whose held-out split to use (default: the run's own); the results "
                        "for another data set go to RUN_DIR/evaluations/<its stem>/")
    p.add_argument("--importance-samples", type=int, default=64,
                   help="samples k of the importance-weighted estimate of log p(x)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo estimates and bootstrap")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="weights to evaluate (default: best validation ELBO)")
    p.add_argument("--refine-steps", type=int, default=0, metavar="N",
                   help="also optimise each image's z for its posterior, N Adam steps from g_mu(x), and report "
                        "the refined f_mu(z*) beside the amortised f_mu(g_mu(x)) (default 0: off; 200 suffice)")
    p.add_argument("--refine-lr", type=float, default=None, metavar="RATE",
                   help="Adam step size of --refine-steps, in units of z (default 0.2, tuned)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    _overwrite_flag(p)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from galaxyvae.errors import InputError
    from galaxyvae.evaluation import evaluate
    from galaxyvae.runs import REFINE_LEARNING_RATE, check_refine_settings

    rate = REFINE_LEARNING_RATE if args.refine_lr is None else args.refine_lr
    steps, rate = check_refine_settings(args.refine_steps, rate, names=("--refine-steps", "--refine-lr"))
    if args.refine_lr is not None and steps == 0:
        raise InputError("--refine-lr only applies with --refine-steps N (N > 0)")
    result = evaluate(args.run_dir, args.data, importance_samples=args.importance_samples, seed=args.seed,
                      overwrite=args.overwrite, progress=args.progress and show_progress(args), checkpoint=args.checkpoint,
                      refine_steps=steps, refine_learning_rate=rate)
    print(result.table_markdown())
    log.info("wrote %s", ", ".join(str(p) for p in result.paths.values()))
    return 0


def add_figures(commands) -> None:
    p = commands.add_parser("figures", help="draw the paper's figures for a trained run")
    p.add_argument("run_dir", type=Path, help="run directory made by `galaxyvae train`")
    p.add_argument("--seed", type=int, default=0, help="seed choosing examples and latent draws")
    _overwrite_flag(p)
    p.set_defaults(run=run_figures)


def run_figures(args) -> int:
    from galaxyvae.figures import make_run_figures

    paths = make_run_figures(args.run_dir, seed=args.seed, overwrite=args.overwrite)
    log.info("wrote %d figures into %s", len(paths), args.run_dir / "figures")
    return 0


def add_report(commands) -> None:
    p = commands.add_parser("report", help="gather a run's table and figures into one offline HTML page")
    p.add_argument("run_dir", type=Path, help="run directory (evaluated)")
    p.add_argument("--seed", type=int, default=0, help="seed of any figures that still have to be drawn")
    _overwrite_flag(p)
    p.set_defaults(run=run_report)


def run_report(args) -> int:
    from galaxyvae.report import write_report

    log.info("wrote %s", write_report(args.run_dir, overwrite=args.overwrite, seed=args.seed))
    return 0


def add_reproduce(commands) -> None:
    p = commands.add_parser("reproduce",
                            help="simulate -> train -> evaluate -> figures -> report, resumable")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the data set (OUT/survey.h5), the run (OUT/run/) and OUT/reproduce.json; "
                        "run the same command again to resume an interrupted reproduction")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast version (600 stamps, 20 epochs of batch 32; about a minute) for tests and CI")
    p.add_argument("--seed", type=int, default=0, help="seed of every step")
    p.add_argument("--latent-dim", type=int, default=None, metavar="N",
                   help="dimension of z (default: the paper's 8; 16 is the documented step beyond it, "
                        "docs/model.md)")
    p.set_defaults(run=run_reproduce)


def run_reproduce(args) -> int:
    from galaxyvae.pipeline import reproduce

    report = reproduce(args.out, quick=args.quick, seed=args.seed, progress=show_progress(args),
                       latent_dim=args.latent_dim)
    print(f"report: {report}")
    return 0


# --- realism ---------------------------------------------------------------------------------

def add_morphology(commands) -> None:
    p = commands.add_parser("morphology",
                            help="compare the non-parametric morphology (C, A, S, Gini, M20) of data sets and "
                                 "of samples from trained runs")
    p.add_argument("data", nargs="*", type=str, metavar="DATA.h5",
                   help="data sets, each PATH (named by its stem) or NAME=PATH; up to --n random images of each")
    p.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN_DIR",
                   help="a run directory (or NAME=RUN_DIR) whose model draws --n noisy samples; repeatable")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for morphology.png, morphology.md, morphology.csv, morphology_per_image.csv")
    p.add_argument("--n", type=int, default=300, help="images per data set and samples per run (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the images and drawing the model samples")
    p.add_argument("--latents", choices=("prior", "aggregate"), default="prior",
                   help="draw the runs' z from the prior N(0, I) (default) or from the aggregate posterior, "
                        "q(z|x) of random training images of each run")
    p.add_argument("--reference", default=None,
                   help="sample name the KS distances are taken against (default: the first data set)")
    p.add_argument("--no-families", dest="by_family", action="store_false",
                   help="no per-family rows and figure for a data set with a family column")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="weights of the runs")
    _overwrite_flag(p)
    p.set_defaults(run=run_morphology)


def run_morphology(args) -> int:
    from galaxyvae.morphology import morphology_report

    comparison = morphology_report(args.data, args.runs, args.out, n=args.n, seed=args.seed, overwrite=args.overwrite,
                                   reference=args.reference, by_family=args.by_family, checkpoint=args.checkpoint,
                                   progress=show_progress(args), latents=args.latents)
    print(comparison.paths["morphology.md"].read_text(encoding="utf-8"))
    log.info("wrote %s", ", ".join(str(p) for p in comparison.paths.values()))
    return 0


if __name__ == "__main__":
    entry_point()
