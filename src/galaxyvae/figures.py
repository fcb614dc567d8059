"""Figures: contact sheets of data sets and the paper's figures for a trained run.

All images are shown with an asinh stretch, the astronomer's compromise between a
linear scale (faint outskirts vanish) and a log scale (noise dominates).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from galaxyvae._io import atomic_path


def asinh_stretch(images: np.ndarray, softening: float | None = None, lower_percentile: float = 1.0,
                  upper_percentile: float = 99.8) -> np.ndarray:
    """Map pixel values to [0, 1] by asinh((x - lo) / softening), clipped at percentiles.

    images:    any shape, in data units
    softening: where the scale turns from linear to logarithmic, in data units; by default
               a tenth of the range between the percentiles
    Returns an array of the same shape, float32 in [0, 1].
    """
    images = np.asarray(images, dtype=np.float32)
    lo, hi = np.percentile(images, [lower_percentile, upper_percentile])
    if hi <= lo:
        return np.zeros_like(images)
    softening = softening if softening is not None else 0.1 * (hi - lo)
    stretched = np.arcsinh((np.clip(images, lo, hi) - lo) / softening) / np.arcsinh((hi - lo) / softening)
    return stretched.astype(np.float32)


def save_figure(fig, out: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure to ``out`` (PNG) atomically and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


def contact_sheet(images: np.ndarray, out: str | Path, labels=None, title: str = "", columns: int = 8,
                  per_image_stretch: bool = True) -> Path:
    """Draw ``images`` (N, H, W) as a grid of asinh-stretched thumbnails into the PNG ``out``.

    labels: optional N strings drawn under each thumbnail (e.g. family or object id).
    per_image_stretch: stretch each image on its own percentiles (True) or on the sheet's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ValueError("contact sheet: no images to draw")
    columns = min(columns, n)
    rows = -(-n // columns)
    shown = [asinh_stretch(im) for im in images] if per_image_stretch else asinh_stretch(images)
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.55 * rows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:n]):
        ax.imshow(shown[i], cmap="gray", origin="lower", vmin=0, vmax=1)
        if labels is not None:
            ax.set_title(str(labels[i])[:18], fontsize=6, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def dataset_sheet(dataset, out: str | Path, n: int = 64, seed: int = 0, by_family: bool = False) -> Path:
    """A contact sheet of ``n`` random images of a GalaxyDataset (or ``n`` per family with ``by_family``)."""
    rng = np.random.default_rng(seed)
    families = np.asarray(dataset.metadata.get("family", np.full(len(dataset), "")), dtype=str)
    if by_family:
        index = np.concatenate([
            rng.permutation(np.flatnonzero(families == fam))[:n] for fam in sorted(set(families))
        ])
        columns = n
    else:
        index = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
        columns = 8
    labels = [fam or oid for fam, oid in zip(families[index], np.asarray(dataset.metadata["object_id"])[index])]
    title = f"{dataset.path.name if dataset.path else 'data set'}: {len(index)} of {len(dataset)} images (asinh stretch)"
    return contact_sheet(dataset.images[index], out, labels=labels, title=title, columns=columns)
