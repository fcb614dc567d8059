"""Training throughput of the paper's model (and of the conv architecture) against the machine's
matrix-multiply limit, and the validation ELBO each speed-up reaches, all measured in one run.

    python benchmarks/bench_training.py                  # simulates 10,000 stamps first (about a minute)
    python benchmarks/bench_training.py --data survey.h5 --epochs 4
    python benchmarks/bench_training.py --quick          # 3,000 stamps, 2 epochs: a smoke test
    python benchmarks/bench_training.py --data survey.h5 --arch mlp conv --variants eager,default
                                                         # both architectures, ratios from one run

What it prints:

1. fp32 and bf16 matrix-multiply rates (GFLOP/s) of torch on this machine, measured before and
   after every training run, so that each throughput is compared with the rate of its own moment
   (other processes sharing the CPU slow both alike).
2. The floating-point work of one training step per image, counted as 3 x the forward pass's
   matrix products and convolutions (the usual convention; the input gradient of the first layer,
   which is not needed, makes it 10 % more than the work actually done for the MLP), and so the
   fp32 limit in images/s (convolutions with few channels run well below the rate of a square
   matrix product, so the conv's fraction of that limit is low by nature).
3. For each variant, images/s (median over epochs after the first, which includes compilation),
   its fraction of the fp32 limit, iterations/s, and the validation ELBO after the same epochs with
   the same seed: a "straightforward" loop (DataLoader, torch.optim.Adam defaults, eager), then
   ``galaxyvae.training.train`` with compilation off, the default (compiled fp32), bf16 autocast,
   and other batch sizes (64: iterations/s beside the paper's ~200/s on a Tesla K20X).
   ``--variants`` picks some of them (loop, eager, default, bf16, batch256, batch64).
4. With ``--arch mlp conv``, the variants for each architecture (``--arch-settings`` are passed to
   the conv's ModelConfig, e.g. ``conv_channels=8``) and the conv/MLP ratios of each variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from galaxyvae.config import ModelConfig, TrainConfig
from galaxyvae.dataset import read_dataset
from galaxyvae.model import GalaxyVAE, ResizeConvolution, count_parameters
from galaxyvae.runs import read_log
from galaxyvae.training import DistributedContext, configure_threads, train, validation_split

PAPER_ITERATIONS_PER_S = 200.0


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """Best of several timings of an n x n x n matrix product, in GFLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def forward_macs(model: GalaxyVAE) -> int:
    """Multiply-adds of one image's forward pass through the products and convolutions of the model
    (a ``ResizeConvolution`` counted as the 4x4 stride-2 transposed convolution it runs)."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            macs.append(module.in_features * module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            macs.append(output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        elif isinstance(module, ResizeConvolution):
            macs.append(inputs[0][0].numel() * module.weight.shape[0] * 16)

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        mean, _ = model.encode(torch.zeros(1, model.n_pixels))
        model.decode(mean)
    for hook in hooks:
        hook.remove()
    return sum(macs)


def flops_per_image(model: GalaxyVAE) -> float:
    """3 x the forward pass's multiply-adds x 2 (FLOP per image per training step)."""
    return 3 * 2 * forward_macs(model)


def straightforward_loop(data: Path, config: TrainConfig) -> tuple[float, float]:
    """The textbook loop: DataLoader over a TensorDataset, torch.optim.Adam defaults, eager mode.
    Returns (median images/s over epochs after the first, final validation ELBO in data units)."""
    from torch.utils.data import DataLoader, TensorDataset

    from galaxyvae.model import PixelScaling

    dataset = read_dataset(data)
    fitted, validation = validation_split(dataset.train_index, config.validation_fraction, config.seed)
    train_images = torch.from_numpy(dataset.images[fitted])
    validation_images = torch.from_numpy(dataset.images[validation])
    torch.manual_seed(config.seed)
    model = GalaxyVAE(config.model, PixelScaling.fit(train_images.numpy()))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loader = DataLoader(TensorDataset(train_images), batch_size=config.batch_size, shuffle=True, drop_last=True)
    rates = []
    for _ in range(config.epochs):
        start, seen = time.perf_counter(), 0
        for (x,) in loader:
            x = model.scale(x)
            loss = model(x, torch.randn(1, len(x), config.model.latent_dim)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(x)
        rates.append(seen / (time.perf_counter() - start))
    with torch.no_grad():
        scaled = model.scale(validation_images)
        noise = torch.randn(1, len(scaled), config.model.latent_dim, generator=torch.Generator().manual_seed(0))
        elbo = -model(scaled, noise).double().mean().item() + model.log_jacobian()
    return statistics.median(rates[1:] or rates), elbo


def galaxyvae_run(data: Path, config: TrainConfig, folder: Path, name: str) -> tuple[float, float, float]:
    """``train`` as the CLI runs it. Returns (median images/s after epoch 1, final validation ELBO,
    seconds of the first epoch, which include compilation)."""
    run = train(data, folder / name, config, progress=False)
    log = read_log(run / "log.csv")
    rates = list(log["images_per_s"])
    return statistics.median(rates[1:] or rates), float(log["validation_elbo"][-1]), float(log["seconds"][0])


def simulate(folder: Path, n_images: int) -> Path:
    from galaxyvae.simulation import simulate_survey

    print(f"simulating {n_images} stamps ...", flush=True)
    return simulate_survey(folder / "survey.h5", n_images=n_images, n_held_out=max(200, n_images // 20),
                           seed=0, progress=False)


VARIANTS = ("loop", "eager", "default", "bf16", "batch256", "batch64")
VARIANT_NAMES = {"loop": "straightforward loop, batch 128", "eager": "galaxyvae, eager fp32, batch 128",
                 "default": "galaxyvae default: compiled fp32, batch 128",
                 "bf16": "galaxyvae compiled + bf16 autocast, batch 128",
                 "batch256": "galaxyvae compiled fp32, batch 256", "batch64": "galaxyvae compiled fp32, batch 64"}


def variant_config(variant: str, base: TrainConfig) -> TrainConfig:
    """The TrainConfig of a variant (the straightforward loop uses the eager one's settings)."""
    changes = {"loop": {"compile": "off"}, "eager": {"compile": "off"}, "default": {},
               "bf16": {"precision": "bf16"}, "batch256": {"batch_size": 256}, "batch64": {"batch_size": 64}}
    return replace(base, **changes[variant])


def parse_settings(pairs: list[str]) -> dict:
    """``name=value`` strings -> ModelConfig settings of the field's type."""
    types = {name: type(value) for name, value in ModelConfig().__dict__.items()}
    settings = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types:
            raise SystemExit(f"--arch-settings: {name!r} is not a ModelConfig setting")
        settings[name] = types[name](value)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data set (default: simulate one)")
    parser.add_argument("--n-images", type=int, default=10_000, help="stamps to simulate without --data")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every variant (>= 2)")
    parser.add_argument("--quick", action="store_true", help="3,000 stamps, 2 epochs")
    parser.add_argument("--arch", nargs="+", choices=["mlp", "conv"], default=["mlp"],
                        help="architectures to measure, in this order (default: mlp)")
    parser.add_argument("--arch-settings", nargs="*", default=[], metavar="NAME=VALUE",
                        help="ModelConfig settings of the conv architecture, e.g. conv_channels=8")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.epochs = 3000, 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    conv_settings = parse_settings(args.arch_settings)
    threads = configure_threads(0, DistributedContext())
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        folder = Path(tmp)
        data = args.data or simulate(folder, args.n_images)
        n_train = int((~read_dataset(data).held_out).sum())
        print(f"torch {torch.__version__}, {threads} threads; data {data} ({n_train} training images), "
              f"{args.epochs} epochs per variant")
        results = []
        for arch in args.arch:
            model = ModelConfig(arch=arch, **(conv_settings if arch == "conv" else {}))
            # constant step size, as the straightforward loop's Adam, so their ELBOs compare
            base = TrainConfig(epochs=args.epochs, device="cpu", compile="on", lr_schedule="constant", model=model)
            network = GalaxyVAE(model)
            work = flops_per_image(network)
            print(f"{arch}: {count_parameters(network):,} parameters, work per image per step: "
                  f"{work / 1e6:.2f} MFLOP (3 x forward)")
            for variant in variants:
                results.append(measure(arch, variant, variant_config(variant, base), data, folder, work, len(results)))
                print(f"  {arch} {VARIANT_NAMES[variant]}: {results[-1]['images_per_s']:,.0f} images/s", flush=True)
        report(results)
        if len(args.arch) > 1:
            compare_archs(results, args.arch)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(arch: str, variant: str, config: TrainConfig, data: Path, folder: Path, work: float, number: int) -> dict:
    """Run one variant between two pairs of matrix-multiply timings; its figures as a dict."""
    before = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    if variant == "loop":
        rate, elbo = straightforward_loop(data, config)
        first = float("nan")
    else:
        rate, elbo, first = galaxyvae_run(data, config, folder, f"run{number}")
    after = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    fp32, bf16 = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    return {"arch": arch, "variant": variant, "name": VARIANT_NAMES[variant], "images_per_s": rate,
            "iterations_per_s": rate / config.batch_size, "validation_elbo": elbo, "first_epoch_s": first,
            "matmul_fp32_gflops": fp32, "matmul_bf16_gflops": bf16, "mflop_per_image": work / 1e6,
            "fp32_limit_images_per_s": fp32 * 1e9 / work, "fraction_of_fp32_limit": rate * work / (fp32 * 1e9)}


def report(results: list[dict]) -> None:
    """The table of all variants, with ratios to each architecture's straightforward loop and
    ELBO differences to its default, where those were measured."""
    print()
    print(f"{'arch':4s} {'variant':46s} {'images/s':>9s} {'it/s':>7s} {'of fp32 limit':>13s} {'vs loop':>8s} "
          f"{'validation ELBO':>14s} {'ELBO - default':>14s} {'matmul fp32/bf16':>17s}")
    for r in results:
        own = {o["variant"]: o for o in results if o["arch"] == r["arch"]}
        vs_loop = f"{r['images_per_s'] / own['loop']['images_per_s']:7.2f}x" if "loop" in own else f"{'-':>8s}"
        vs_default = (f"{r['validation_elbo'] - own['default']['validation_elbo']:+14.1f}" if "default" in own
                      else f"{'-':>14s}")
        print(f"{r['arch']:4s} {r['name']:46s} {r['images_per_s']:9,.0f} {r['iterations_per_s']:7.1f} "
              f"{r['fraction_of_fp32_limit']:12.0%} {vs_loop} {r['validation_elbo']:14.1f} {vs_default} "
              f"{r['matmul_fp32_gflops']:7.0f}/{r['matmul_bf16_gflops']:<7.0f}")
    for arch in dict.fromkeys(r["arch"] for r in results):
        own = {o["variant"]: o for o in results if o["arch"] == arch}
        if "batch64" in own:
            it = own["batch64"]["iterations_per_s"]
            print(f"\n{arch} batch 64: {it:.0f} iterations/s here vs the paper's ~{PAPER_ITERATIONS_PER_S:.0f}/s "
                  f"on a Tesla K20X ({it / PAPER_ITERATIONS_PER_S:.2f}x)")
        if "default" in own:
            default = own["default"]
            if "loop" in own:
                print(f"{arch} default vs straightforward loop: "
                      f"{default['images_per_s'] / own['loop']['images_per_s']:.2f}x")
            print(f"{arch} default at {default['fraction_of_fp32_limit']:.0%} of the fp32 limit "
                  f"({default['fp32_limit_images_per_s']:,.0f} images/s at {default['matmul_fp32_gflops']:.0f} "
                  f"GFLOP/s, {default['mflop_per_image']:.2f} MFLOP per image); first epoch (includes "
                  f"torch.compile): {default['first_epoch_s']:.1f} s")
    print("validation ELBO: eager and compiled fp32 should agree to about 0.1 nats; bf16 and other batch sizes "
          "change the arithmetic or the number of steps, and early in training the validation ELBO moves by "
          "hundreds of nats from epoch to epoch")


def compare_archs(results: list[dict], archs: list[str]) -> None:
    """Each variant's images/s and validation ELBO of the later architectures against the first."""
    first = {r["variant"]: r for r in results if r["arch"] == archs[0]}
    print()
    for arch in archs[1:]:
        for r in (r for r in results if r["arch"] == arch and r["variant"] in first):
            other = first[r["variant"]]
            print(f"{arch} / {archs[0]}, {r['name']}: {r['images_per_s'] / other['images_per_s']:.2f}x the "
                  f"images/s, validation ELBO {r['validation_elbo'] - other['validation_elbo']:+.1f} nats per image")


if __name__ == "__main__":
    sys.exit(main())
