"""Small synthetic data shared by the tests: made here, never downloaded."""

from __future__ import annotations

import csv

import numpy as np

from galaxyvae.dataset import choose_held_out, write_dataset


def gaussian_blobs(n: int, seed: int = 0, size: int = 69, noise: float = 0.05) -> np.ndarray:
    """(n, size, size) float32 images of elliptical Gaussian blobs with random shape plus white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    images = np.empty((n, size, size), np.float32)
    for i in range(n):
        sx, sy = rng.uniform(2, 8, 2)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u, v = c * x + s * y, -s * x + c * y
        images[i] = rng.uniform(0.5, 2) * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return images + rng.normal(0, noise, images.shape).astype(np.float32)


def write_blob_dataset(path, n: int = 40, n_held_out: int = 8, seed: int = 0, attrs_units: str = "arbitrary",
                       **kwargs):
    """Write a small valid data set of Gaussian blobs (pixel units ``attrs_units``) to ``path``; return the path."""
    images = gaussian_blobs(n, seed)
    families = np.array(["blob-a", "blob-b"] * (n // 2) + ["blob-a"] * (n % 2))
    return write_dataset(
        path, images, choose_held_out(n, n_held_out, seed),
        attrs={"source": "test-blobs", "pixel_units": attrs_units, "pixel_scale_arcsec": 0.396,
               "sky_subtracted": True, "seed": seed},
        metadata={"family": families}, provenance={"made_by": "tests.helpers"}, **kwargs,
    )


def read_csv_columns(path) -> dict[str, list[str]]:
    """A CSV file with a header row as column name -> list of cell strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {name: [row[name] for row in rows] for name in rows[0]}
