"""How far is the decoder from winning on MSE? The MSE wins of the best z for each image.

The paper's MSE criterion compares f_mu(g_mu(x)) with a per-image fit x̂. A loss can come from
the decoder f (no z gives a close image) or from the encoder g (a close z exists, g_mu(x) is not
it). This script separates the two on a run's evaluated held-out images: for each image it
searches for the z that minimises the MSE of f_mu(z) itself (Adam, from g_mu(x) and from the MAP
z*), and reports the fraction of images on which that z beats each baseline, next to the
amortised and MAP fractions of the run's evaluation. It is a diagnostic, not a method: the
MSE-optimal z uses the pixels being scored.

    python experiments/mse_ceiling.py RUN_DIR [--n 300] [--steps 400]

RUN_DIR must have been evaluated (`galaxyvae evaluate RUN_DIR`), whose per_image.csv holds the
baselines' MSEs.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from galaxyvae.dataset import read_dataset
from galaxyvae.runs import SUGGESTED_REFINE_STEPS, load_run


def mse_optimal_latents(model, images: np.ndarray, start: np.ndarray, steps: int, learning_rate: float = 0.1):
    """Per image, the z (from ``start``, (N, d)) with the lowest MSE of f_mu(z) seen in ``steps`` Adam
    steps on the MSE itself; returns that MSE in data units², (N,)."""
    network = model.model
    x = network.scale(torch.from_numpy(images))
    z = torch.from_numpy(start.copy()).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=learning_rate)
    best = torch.full((len(images),), float("inf"), dtype=torch.float64)
    for step in range(steps + 1):
        mse = (network.decode(z)[0] - x).square().double().mean(-1)
        best = torch.minimum(best, mse.detach())
        if step == steps:
            break
        optimizer.zero_grad()
        mse.sum().backward()
        optimizer.step()
    return best.numpy() * float(network.pixel_scale) ** 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="an evaluated run directory")
    p.add_argument("--n", type=int, default=300, help="held-out images to use (the first n of per_image.csv)")
    p.add_argument("--steps", type=int, default=400, help="Adam steps on the MSE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_run(args.run_dir, device="cpu")
    with (args.run_dir / "per_image.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:args.n]
    dataset = read_dataset(model.data_path)
    images = dataset.images[[int(r["index"]) for r in rows]]
    for parameter in model.model.parameters():
        parameter.requires_grad_(False)
    starts = {"g_mu(x)": model.encode(images)[0], "z* (MAP)": model.refine_latents(images, SUGGESTED_REFINE_STEPS)}
    best = {name: mse_optimal_latents(model, images, start, args.steps) for name, start in starts.items()}
    print(f"{args.run_dir}: {len(images)} held-out images")
    for baseline in ("gaussian", "sersic"):
        fitted = np.array([float(r[f"mse_{baseline}"]) for r in rows])
        amortised = np.mean([r[f"mse_win_{baseline}"] == "True" for r in rows])
        print(f"  vs {baseline}: amortised f_mu(g_mu(x)) wins {amortised:.1%}")
        for name, mse in best.items():
            print(f"  vs {baseline}: MSE-optimal z from {name} wins {np.mean(mse < fitted):.1%} "
                  f"(mean MSE {mse.mean():.4g}; fit {fitted.mean():.4g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
