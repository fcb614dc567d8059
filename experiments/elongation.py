"""How elongated are the central galaxies of a data set? The deep-field preset's check against the
Hubble Deep Field cutouts (docs/simulation.md, "thin disks").

For each stamp: the sky level and noise are the model's pixel scaling fitted on that stamp alone
(``PixelScaling.fit``: median and 1.4826 x MAD of the border pixels); SEP detects sources 3 sigma
above it (at least 10 pixels), and the one nearest the stamp centre is the central galaxy; its
ellipticity is 1 - b/a from SEP's isophotal second moments. Prints, per data set, the
10/25/50/75/90th percentiles and the fractions above 0.5, 0.6 and 0.7::

    python experiments/elongation.py hdf=runs/transfer_v/hdf.h5 deep=runs/transfer_thin/survey.h5 --n 3000
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from galaxyvae.dataset import read_dataset
from galaxyvae.model import PixelScaling


def central_ellipticity(image: np.ndarray) -> float:
    """1 - b/a of the source nearest the centre of a (H, W) stamp; NaN if none is detected."""
    import sep

    image = np.ascontiguousarray(image, dtype=np.float64)
    sky = PixelScaling.fit(image[None])
    objects = sep.extract(image - sky.offset, 3.0, err=sky.scale, minarea=10)
    if len(objects) == 0:
        return float("nan")
    centre_y, centre_x = (np.array(image.shape) - 1) / 2
    nearest = np.argmin((objects["x"] - centre_x) ** 2 + (objects["y"] - centre_y) ** 2)
    return float(1.0 - objects["b"][nearest] / objects["a"][nearest])


def summary(ellipticities: np.ndarray) -> str:
    """One line: how many were measured, percentiles and tail fractions."""
    e = ellipticities[np.isfinite(ellipticities)]
    percentiles = " ".join(f"{q:.2f}" for q in np.quantile(e, [0.1, 0.25, 0.5, 0.75, 0.9]))
    tails = ", ".join(f"e > {t}: {100 * np.mean(e > t):.1f}%" for t in (0.5, 0.6, 0.7))
    return f"{len(e)} measured; percentiles 10/25/50/75/90: {percentiles}; {tails}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", metavar="NAME=FILE.h5", help="data sets to measure")
    p.add_argument("--n", type=int, default=3000, help="stamps per data set at most (the first N)")
    args = p.parse_args(argv)
    for item in args.data:
        name, _, path = item.rpartition("=")
        images = read_dataset(path).images[: args.n]
        print(f"{name or path}: {summary(np.array([central_ellipticity(x) for x in images]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
