"""Figures: contact sheets of data sets and the paper's figures for a trained run.

All images are shown with an asinh stretch, the astronomer's compromise between a
linear scale (faint outskirts vanish) and a log scale (noise dominates).

The module has two layers. ``plot_*`` functions take plain arrays and return a matplotlib
Figure (tested on synthetic arrays); ``make_run_figures`` loads a trained run, computes
the arrays and writes RUN_DIR/figures/*.png. What each figure shows is in ``FIGURES``
(also used as captions by the HTML report) and in docs/figures.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from galaxyvae._io import atomic_path
from galaxyvae.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

IMAGE_CMAP = "gray"
SIGMA_CMAP = "viridis"
FAMILY_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                  "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
BASELINE_NAMES = ("gaussian", "sersic")
BASELINE_LABELS = {"gaussian": "Gaussian", "sersic": "S\u00e9rsic"}
SYMLOG_DYNAMIC_RANGE = 30.0
"""Difference histograms use a symmetric-log axis when the largest |difference| exceeds the
5th percentile of |difference| by this factor, and a linear axis otherwise."""


@dataclass(frozen=True)
class FigureSpec:
    """A figure of a run: its file name under RUN_DIR/figures, its title and its caption."""

    name: str
    title: str
    caption: str


FIGURES = (
    FigureSpec(
        "conditional.png", "Conditional distributions of held-out galaxies",
        "Each row is a held-out galaxy. Left to right: the input image x; the mean f\u03bc(z) of the model's "
        "conditional distribution p(x|z) for one z drawn from the approximate posterior q(z|x); the paper's "
        "baseline, a scaled bivariate Gaussian density fitted to x (x\u0302); and the per-pixel standard "
        "deviation \u221af\u03c3(z) for the same z (f\u03c3 is a variance). The first three panels of a row "
        "share one asinh colour scale in data units, so brightness can be compared directly."),
    FigureSpec(
        "tsne.png", "t-SNE embedding of the latent means of held-out galaxies",
        "A two-dimensional t-SNE embedding of the latent means g\u03bc(x) of the held-out galaxies. Every "
        "galaxy is a dot; galaxies whose thumbnails do not overlap are drawn as their own image (each with "
        "its own asinh stretch) at their position. Dot and frame colours give the morphological family "
        "where the data set has labels. Nearby galaxies have similar latent codes; t-SNE preserves "
        "neighbourhoods, not distances between far-apart groups."),
    FigureSpec(
        "traversals.png", "Latent traversals",
        "f\u03bc(z) for z on a one-at-a-time design: in row i, latent dimension z\u1d62 steps from \u22123 to +3 "
        "prior standard deviations while the others stay at zero; the centre column (framed) is f\u03bc(0) in "
        "every row. All panels share one asinh colour scale, so changes in brightness show as well as "
        "changes in shape."),
    FigureSpec(
        "samples.png", "New galaxies sampled from the prior",
        "f\u03bc(z) for z drawn from the prior N(0, I): galaxies the model generates that are in no data set. "
        "All panels share one asinh colour scale."),
    FigureSpec(
        "training.png", "Training curves",
        "Left: the training loss (negative ELBO averaged over the epoch's mini-batches, mean nats per image) "
        "per epoch. Right: the ELBO of the validation images per epoch (higher is better; a subset of the "
        "training split set aside, never fitted), with the training ELBO (minus the loss) dashed for "
        "comparison; the starred epoch has the best validation ELBO (or, for a run trained with "
        "--checkpoint-metric mse, the lowest validation MSE), whose weights (best.pt) the evaluation "
        "and figures use. The held-out images are not used in training."),
    FigureSpec(
        "differences.png", "Per-image differences, VAE against the parametric fits",
        "Histograms over held-out images of the VAE's advantage over each baseline fit. Top: MSE(VAE) \u2212 "
        "MSE(fit), where the VAE's image is the reconstruction f\u03bc(g\u03bc(x)) (negative: the VAE fits "
        "better). Bottom: log N(x; f\u03bc, f\u03c3) \u2212 max over \u03c3 of log N(x; x\u0302, \u03c3\u00b2I), in nats "
        "(positive: the VAE gives the image higher probability than the fit with any noise level). The "
        "shaded side is where the VAE wins; the title gives the win fraction. Wide ranges are drawn on a "
        "symmetric-logarithmic axis (linear near zero, logarithmic beyond)."),
)


# --- colour scales ---------------------------------------------------------------------------

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


def asinh_norm(images: np.ndarray, softening: float | None = None, lower_percentile: float = 10.0,
               upper_percentile: float = 99.8):
    """A matplotlib AsinhNorm for ``images`` (any shape, data units), so colour bars read in data units.

    The colour scale runs from the ``lower_percentile`` to the ``upper_percentile`` of the pixels
    and is linear within +-``softening`` of zero (the sky level of sky-subtracted images),
    logarithmic beyond. The default lower end, the 10th percentile, sits about one noise sigma
    below the sky in a stamp that is mostly sky, so the sky looks dark but its noise stays
    visible. Default softening: a fiftieth of the range between the percentiles, which keeps
    faint outskirts visible next to a bright core.
    """
    from matplotlib.colors import AsinhNorm

    lo, hi = (float(v) for v in np.percentile(np.asarray(images, dtype=np.float64), [lower_percentile,
                                                                                      upper_percentile]))
    if hi <= lo:
        hi = lo + max(abs(lo), 1e-12)
    softening = softening if softening is not None else 0.02 * (hi - lo)
    return AsinhNorm(linear_width=softening, vmin=lo, vmax=hi)


def sigma_norm(sigma: np.ndarray):
    """An AsinhNorm for a map of standard deviations (any shape, >= 0): from zero to the maximum,
    linear up to the median (about the sky noise in a stamp that is mostly sky), logarithmic
    beyond, so both the noise floor and the rise over a bright galaxy are visible."""
    from matplotlib.colors import AsinhNorm

    sigma = np.asarray(sigma, dtype=np.float64)
    top = max(float(sigma.max()), 1e-30)
    median = float(np.median(sigma))
    return AsinhNorm(linear_width=median if median > 0 else top / 10, vmin=0.0, vmax=top)


def asinh_ticks(norm, per_side: int = 3, min_gap: float = 0.07) -> list[float]:
    """Readable colour-bar ticks for an AsinhNorm: zero (if inside the range), up to ``per_side``
    round values half a decade apart below the upper end, and the rounded lower end; any tick closer than ``min_gap`` (in colour-bar fractions) to one already kept is
    dropped, so labels never collide."""
    lo, hi = norm.vmin, norm.vmax
    candidates = [0.0] if lo <= 0 <= hi else []
    for end, count in ((hi, per_side), (lo, 1)):
        value = _round_towards_zero(end) if end != 0 else 0.0
        for _ in range(count if value != 0 else 0):
            candidates.append(value)
            value = _round_towards_zero(value / np.sqrt(10))
    if lo > 0:
        candidates.append(_round_away_from_zero(lo))
    kept: list[float] = []
    for value in candidates:
        position = float(norm(value))
        if 0 <= position <= 1 and all(abs(position - float(norm(k))) >= min_gap for k in kept):
            kept.append(value)
    return sorted(kept)


def _round_away_from_zero(value: float) -> float:
    """``value`` rounded away from zero to two significant figures."""
    scale = 10 ** (np.floor(np.log10(abs(value))) - 1)
    return float(np.sign(value) * np.ceil(abs(value) / scale - 1e-9) * scale)


def _round_towards_zero(value: float) -> float:
    """``value`` rounded towards zero to two significant figures."""
    scale = 10 ** (np.floor(np.log10(abs(value))) - 1)
    return float(np.trunc(value / scale) * scale)


def _colour_bar(fig, mappable, ax, label: str, **kwargs):
    bar = fig.colorbar(mappable, ax=ax, pad=0.01, label=label, **kwargs)
    bar.set_ticks(asinh_ticks(mappable.norm), labels=[f"{t:.2g}" for t in asinh_ticks(mappable.norm)])
    bar.ax.minorticks_off()
    return bar


# --- saving ----------------------------------------------------------------------------------

def save_figure(fig, out: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure to ``out`` (PNG) atomically and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _show(ax, image: np.ndarray, norm, cmap: str = IMAGE_CMAP):
    """Draw one (H, W) image with north up (origin lower) and no ticks; return the AxesImage."""
    _bare(ax)
    return ax.imshow(image, cmap=cmap, norm=norm, origin="lower", interpolation="nearest")


# --- data-set contact sheets -----------------------------------------------------------------

def contact_sheet(images: np.ndarray, out: str | Path, labels=None, title: str = "", columns: int = 8,
                  per_image_stretch: bool = True) -> Path:
    """Draw ``images`` (N, H, W) as a grid of asinh-stretched thumbnails into the PNG ``out``.

    labels: optional N strings drawn under each thumbnail (e.g. family or object id).
    per_image_stretch: stretch each image on its own percentiles (True) or on the sheet's.
    """
    plt = _pyplot()

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


# --- the paper's figures, from arrays --------------------------------------------------------

def plot_conditional(inputs: np.ndarray, means: np.ndarray, variances: np.ndarray, fits: np.ndarray,
                     labels=None, units: str = "data units", fit_name: str = "Gaussian fit"):
    """Rows of held-out galaxies: x, f_mu(z), the baseline fit x-hat, and sqrt(f_sigma(z)).

    inputs, means, fits: (N, H, W) in data units (x, f_mu(z) for one z ~ q(z|x), x-hat)
    variances:           (N, H, W) per-pixel variance f_sigma(z), data units squared;
                         drawn as its square root, the standard deviation, on a linear scale
    labels:              optional N strings naming each row (object id, family)
    Returns the Figure: per row four image axes and two colour-bar axes.
    """
    plt = _pyplot()
    inputs, means, variances, fits = (np.asarray(a, dtype=np.float32) for a in (inputs, means, variances, fits))
    if not inputs.shape == means.shape == variances.shape == fits.shape or inputs.ndim != 3:
        raise ValueError("plot_conditional: inputs, means, variances and fits must share one (N, H, W) shape")
    n = len(inputs)
    fig, axes = plt.subplots(n, 4, figsize=(10.2, 2.25 * n + 0.6), squeeze=False, layout="constrained")
    column_titles = ("input x", "$f_\\mu(z)$,  $z \\sim q(z|x)$", f"{fit_name} $\\hat{{x}}$",
                     "$\\sqrt{f_\\sigma(z)}$: per-pixel s.d.")
    for row in range(n):
        norm = asinh_norm(inputs[row])
        for col, image in enumerate((inputs[row], means[row], fits[row])):
            shown = _show(axes[row, col], image, norm)
        _colour_bar(fig, shown, axes[row, :3], units, shrink=0.9)
        sigma = np.sqrt(np.clip(variances[row], 0, None))
        sigma_shown = _show(axes[row, 3], sigma, sigma_norm(sigma), cmap=SIGMA_CMAP)
        _colour_bar(fig, sigma_shown, axes[row, 3], f"s.d., {units}", shrink=0.9)
        if labels is not None:
            axes[row, 0].set_ylabel(str(labels[row]), fontsize=8)
    for col, title in enumerate(column_titles):
        axes[0, col].set_title(title, fontsize=10)
    fig.suptitle("Conditional distributions $p(x|z) = \\mathrm{N}(f_\\mu(z), f_\\sigma(z))$ of held-out "
                 "galaxies (asinh stretch)", fontsize=11)
    return fig


def tsne_embedding(latent_means: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE embedding (sklearn, seeded) of latent means (N, d); returns (N, 2) float64.

    Perplexity is 30 as usual, lowered to (N - 1) / 3 for small N. Runs on one thread: next to
    torch's OpenMP runtime, scikit-learn's threads spin against it and t-SNE runs several times
    slower (about 4 s instead of 24 s for 1,000 galaxies on 2 busy cores).
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    latent_means = np.asarray(latent_means, dtype=np.float64)
    n = len(latent_means)
    if n < 4:
        raise InputError(f"t-SNE needs at least 4 galaxies, got {n}")
    perplexity = min(30.0, (n - 1) / 3)
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(latent_means)


def non_overlapping(points: np.ndarray, size: float, seed: int = 0) -> np.ndarray:
    """Indices of a subset of ``points`` (N, 2) no two of which are closer than ``size`` in both
    coordinates (squares of side ``size`` centred there do not overlap), chosen greedily in a
    seeded random order. Returns sorted int indices."""
    points = np.asarray(points, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(points))
    kept: list[int] = []
    for i in order:
        if not kept or np.abs(points[kept] - points[i]).max(axis=1).min() >= size:
            kept.append(i)
    return np.sort(np.asarray(kept, dtype=int))


def plot_tsne(embedding: np.ndarray, thumbnails: np.ndarray, families=None, thumbnails_across: int = 20,
              seed: int = 0, title: str = ""):
    """Galaxies at their t-SNE positions, drawn as their own asinh-stretched thumbnails.

    embedding:  (N, 2) t-SNE coordinates (arbitrary units)
    thumbnails: (N, H, W) the galaxies' images (data units)
    families:   optional N labels; dots and thumbnail frames are coloured by label, with a legend
    thumbnails_across: thumbnail size as a fraction of the plot's width (1 / thumbnails_across);
                only galaxies whose thumbnails would not overlap are drawn as thumbnails
    Returns the Figure (one axes).
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    embedding = np.asarray(embedding, dtype=np.float64)
    thumbnails = np.asarray(thumbnails)
    n = len(embedding)
    if embedding.shape != (n, 2) or len(thumbnails) != n:
        raise ValueError("plot_tsne: embedding must be (N, 2) and thumbnails (N, H, W) for the same N")
    labels = np.asarray(families if families is not None else np.full(n, ""), dtype=str)
    names = sorted(set(labels))
    labelled = names != [""]
    colour_of = {name: FAMILY_COLOURS[i % len(FAMILY_COLOURS)] if labelled else "0.3"
                 for i, name in enumerate(names)}
    colours = [colour_of[label] for label in labels]

    fig, ax = plt.subplots(figsize=(12, 12), layout="constrained")
    ax.scatter(embedding[:, 0], embedding[:, 1], s=8, c=colours, alpha=0.7, linewidths=0)
    span = np.ptp(embedding, axis=0)
    span[span == 0] = 1.0
    thumb_inches = 11.0 / thumbnails_across
    zoom = thumb_inches * 72 / thumbnails.shape[-1]
    # 1.1: room for each thumbnail's frame and padding
    shown = non_overlapping(embedding / span, 1.1 / thumbnails_across, seed)
    for i in shown:
        image = OffsetImage(asinh_stretch(thumbnails[i]), cmap=IMAGE_CMAP, zoom=zoom, origin="lower",
                            interpolation="nearest")
        ax.add_artist(AnnotationBbox(image, embedding[i], frameon=True, pad=0.08,
                                     bboxprops={"edgecolor": colour_of[labels[i]],
                                                "linewidth": 2.0 if labelled else 0.5}))
    margin = 0.04 * np.ptp(embedding, axis=0).max()
    ax.set_xlim(embedding[:, 0].min() - margin, embedding[:, 0].max() + margin)
    ax.set_ylim(embedding[:, 1].min() - margin, embedding[:, 1].max() + margin)
    _bare(ax)
    ax.set_xlabel("t-SNE 1 (arbitrary units)")
    ax.set_ylabel("t-SNE 2 (arbitrary units)")
    if labelled:
        handles = [Line2D([], [], marker="s", linestyle="", markersize=10, markerfacecolor="white",
                          markeredgewidth=2.5, markeredgecolor=colour_of[name],
                          label=f"{name.replace('_', ' ') or 'unlabelled'} ({(labels == name).sum()})")
                   for name in names]
        ax.legend(handles=handles, title="family (galaxies)", loc="best", framealpha=0.9)
    ax.set_title(title or f"t-SNE of the latent means $g_\\mu(x)$ of {n} held-out galaxies "
                          f"({len(shown)} drawn as thumbnails, each with its own asinh stretch)", fontsize=11)
    return fig


def traversal_grid(latent_dim: int, steps: np.ndarray) -> np.ndarray:
    """Latent points of the one-at-a-time design: (latent_dim, len(steps), latent_dim), row i
    setting z_i = steps[j] in column j and every other dimension to zero."""
    steps = np.asarray(steps, dtype=np.float32)
    grid = np.zeros((latent_dim, len(steps), latent_dim), np.float32)
    for dim in range(latent_dim):
        grid[dim, :, dim] = steps
    return grid


def plot_traversals(images: np.ndarray, steps: np.ndarray, units: str = "data units"):
    """Latent traversals: ``images`` (d, k, H, W), row i stepping z_i through ``steps`` (k,) in prior
    standard deviations with the other dimensions at zero. One shared asinh colour scale.

    Returns the Figure: d * k image axes and one colour-bar axes.
    """
    plt = _pyplot()
    images = np.asarray(images, dtype=np.float32)
    steps = np.asarray(steps, dtype=np.float32)
    d, k = images.shape[:2]
    if len(steps) != k:
        raise ValueError(f"plot_traversals: {k} columns of images but {len(steps)} steps")
    norm = asinh_norm(images)
    fig, axes = plt.subplots(d, k, figsize=(1.35 * k + 1.2, 1.35 * d + 0.8), squeeze=False,
                             layout="constrained")
    centre = int(np.argmin(np.abs(steps)))
    for row in range(d):
        for col in range(k):
            shown = _show(axes[row, col], images[row, col], norm)
        axes[row, 0].set_ylabel(f"$z_{{{row + 1}}}$", fontsize=11, rotation=0, labelpad=14, va="center")
        for spine in axes[row, centre].spines.values():
            spine.set(edgecolor="tab:orange", linewidth=2.5)
    for col in range(k):
        axes[0, col].set_title(f"{steps[col]:+g}$\\sigma$" if steps[col] else "0", fontsize=10)
    _colour_bar(fig, shown, axes, units, shrink=0.6)
    fig.suptitle("Latent traversals: $f_\\mu(z)$ with one dimension of $z$ stepped by one prior s.d. per "
                 "column,\nthe others at zero; centre column (framed) is $f_\\mu(0)$ (shared asinh stretch)",
                 fontsize=11)
    return fig


def plot_samples(images: np.ndarray, units: str = "data units", columns: int = 8):
    """New galaxies f_mu(z), z ~ N(0, I): ``images`` (n, H, W) on one shared asinh colour scale.

    Returns the Figure: rows * columns image axes and one colour-bar axes.
    """
    plt = _pyplot()
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    columns = min(columns, n)
    rows = -(-n // columns)
    norm = asinh_norm(images)
    fig, axes = plt.subplots(rows, columns, figsize=(1.35 * columns + 1.2, 1.35 * rows + 0.6),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.ravel()):
        if i < n:
            shown = _show(ax, images[i], norm)
        else:
            ax.axis("off")
    _colour_bar(fig, shown, axes, units, shrink=0.7)
    fig.suptitle(f"{n} new galaxies $f_\\mu(z)$, $z \\sim \\mathrm{{N}}(0, I)$, sampled from the prior "
                 "(shared asinh stretch)", fontsize=11)
    return fig


def plot_training(history: dict, checkpoint_metric: str = "elbo") -> "object":
    """Training curves from a run's log.csv columns (``TrainedModel.history()``).

    history:           "epoch", "train_loss" (negative ELBO, mean nats per image) and "validation_elbo"
                       (mean nats per image; "held_out_elbo" in runs older than the validation
                       subset), each (E,); with checkpoint_metric "mse" also "validation_mse"
    checkpoint_metric: what chose best.pt (TrainConfig.checkpoint_metric); the star marks that epoch
    Returns the Figure with two axes: training loss, and validation ELBO with the training ELBO.
    """
    from galaxyvae.runs import selection_elbo

    plt = _pyplot()
    missing = {"epoch", "train_loss"} - set(history)
    if missing:
        raise InputError(f"training history lacks column(s) {', '.join(sorted(missing))}")
    epoch = np.asarray(history["epoch"], dtype=float)
    loss = np.asarray(history["train_loss"], dtype=float)
    elbo, split = selection_elbo(history)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    left.plot(epoch, loss, "o-", color="tab:blue", markersize=3)
    left.set(xlabel="epoch", ylabel="nats per image", title="training loss (negative ELBO)")
    right.plot(epoch, elbo, "o-", color="tab:green", markersize=3, label=f"{split} ELBO")
    right.plot(epoch, -loss, "--", color="tab:blue", label="training ELBO (= -loss)")
    by_mse = checkpoint_metric == "mse"
    score = -_history_column(history, "validation_mse") if by_mse else elbo
    finite = np.isfinite(score)
    if finite.any():
        best = np.flatnonzero(finite)[np.argmax(score[finite])]
        right.axvline(epoch[best], color="0.5", linestyle=":", linewidth=1)
        label = (f"best.pt, lowest validation MSE: epoch {epoch[best]:g} ({-score[best]:.4g})" if by_mse
                 else f"best {split}: epoch {epoch[best]:g}, {elbo[best]:,.1f} nats")
        right.plot(epoch[best], elbo[best], "*", color="tab:red", markersize=12, label=label)
    _zoom_on_late_epochs(right, [elbo, -loss])
    _zoom_on_late_epochs(left, [loss])
    right.set(xlabel="epoch", ylabel="nats per image (higher is better)", title="ELBO per image")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("Training by stochastic variational inference", fontsize=11)
    return fig


def _history_column(history: dict, name: str) -> np.ndarray:
    if name not in history:
        raise InputError(f"training history lacks column {name}")
    return np.asarray(history[name], dtype=float)


def _zoom_on_late_epochs(ax, curves: list[np.ndarray]) -> None:
    """Keep the first epochs' far-off values from flattening the rest of the curves: if the whole
    range is more than three times the range after the first fifth of the epochs, show the latter."""
    late = np.concatenate([c[len(c) // 5:] for c in curves])
    every = np.concatenate(curves)
    late, every = late[np.isfinite(late)], every[np.isfinite(every)]
    if len(late) < 2 or np.ptp(every) <= 3 * np.ptp(late):
        return
    pad = 0.3 * np.ptp(late) if np.ptp(late) > 0 else 1.0
    ax.set_ylim(late.min() - pad, late.max() + pad)
    ax.annotate("earlier epochs off scale", xy=(0.02, 0.02), xycoords="axes fraction", fontsize=8, color="0.4")


def win_fraction(wins: np.ndarray) -> float:
    """Fraction of True among ``wins`` (N,) (NaN for N = 0)."""
    wins = np.asarray(wins, dtype=bool)
    return float(wins.mean()) if len(wins) else float("nan")


def symlog_bins(values: np.ndarray, linthresh: float, per_decade: int = 6) -> np.ndarray:
    """Histogram bin edges equally spaced on a symmetric-log axis covering ``values``."""
    top = max(float(np.max(np.abs(values))) if len(values) else 0.0, linthresh) * 1.01
    decades = max(np.log10(top / linthresh), 0.1)
    outer = np.logspace(np.log10(linthresh), np.log10(top), max(int(np.ceil(decades * per_decade)), 2) + 1)
    inner = np.linspace(-linthresh, linthresh, 5)[1:-1]
    return np.concatenate([-outer[::-1], inner, outer])


def plot_differences(per_image: dict, baselines=BASELINE_NAMES, summary: dict | None = None,
                     units: str = "data units"):
    """Histograms of per-image differences, VAE against each baseline present in ``per_image``.

    per_image: columns of per_image.csv: "mse_vae", "loglik_vae", and per baseline B "mse_B",
               "loglik_B" (and optionally "mse_win_B", "likelihood_win_B"), each (N,)
    summary:   optional evaluation.json dict; its 95% intervals are printed with the win fractions
    Returns the Figure: two rows (MSE, log-likelihood) and one column per baseline.
    """
    plt = _pyplot()
    present = [b for b in baselines if f"mse_{b}" in per_image and f"loglik_{b}" in per_image]
    if not present:
        raise InputError("per-image results hold no baseline columns (mse_<baseline>, loglik_<baseline>)")
    fig, axes = plt.subplots(2, len(present), figsize=(6.2 * len(present), 8), squeeze=False,
                             layout="constrained")
    for col, name in enumerate(present):
        stats = (summary or {}).get("baselines", {}).get(name, {})
        label = BASELINE_LABELS.get(name, name)
        mse_diff = np.asarray(per_image["mse_vae"], float) - np.asarray(per_image[f"mse_{name}"], float)
        ll_diff = np.asarray(per_image["loglik_vae"], float) - np.asarray(per_image[f"loglik_{name}"], float)
        mse_wins = per_image.get(f"mse_win_{name}", mse_diff < 0)
        ll_wins = per_image.get(f"likelihood_win_{name}", ll_diff > 0)
        _difference_panel(axes[0, col], mse_diff, win_below_zero=True, wins=mse_wins,
                          interval=stats.get("mse_win_ci95"),
                          xlabel=f"MSE(VAE) - MSE({label} fit)  [({units})$^2$]",
                          title=f"pixel MSE: VAE vs {label} fit")
        _difference_panel(axes[1, col], ll_diff, win_below_zero=False, wins=ll_wins,
                          interval=stats.get("likelihood_win_ci95"),
                          xlabel=f"log-likelihood(VAE) - max$_\\sigma$ log-likelihood({label} fit)  [nats]",
                          title=f"log-likelihood: VAE vs {label} fit")
    fig.suptitle("Per-image differences on the held-out galaxies (shaded: the side where the VAE wins)",
                 fontsize=11)
    return fig


def _difference_panel(ax, diff: np.ndarray, win_below_zero: bool, wins, interval, xlabel: str,
                      title: str) -> None:
    from matplotlib.ticker import MaxNLocator, NullLocator

    wins = np.asarray(wins).astype(bool)
    finite = np.isfinite(diff)
    values = diff[finite]
    magnitudes = np.abs(values[values != 0])
    linthresh = float(np.percentile(magnitudes, 5)) if len(magnitudes) else 1.0
    largest = float(magnitudes.max()) if len(magnitudes) else 1.0
    if largest > SYMLOG_DYNAMIC_RANGE * linthresh:
        top = largest * 1.5
        counts, _, _ = ax.hist(values, bins=symlog_bins(values, linthresh), color="tab:blue",
                               edgecolor="white", linewidth=0.3)
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
        ticks = symlog_ticks(linthresh, top)
        ax.set_xticks(ticks, labels=[_power_label(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        top = largest * 1.05
        counts, _, _ = ax.hist(values, bins=np.linspace(-top, top, 41), color="tab:blue", edgecolor="white",
                               linewidth=0.3)
    ax.set_xlim(-top, top)
    ax.set_ylim(0, 1.18 * max(counts.max(), 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axvspan(-top if win_below_zero else 0, 0 if win_below_zero else top, color="tab:green", alpha=0.12)
    ax.axvline(0, color="black", linewidth=1.2)
    x, align = (0.02, "left") if win_below_zero else (0.98, "right")
    ax.text(x, 0.97, "\u2190 VAE better" if win_below_zero else "VAE better \u2192", transform=ax.transAxes,
            ha=align, va="top", color="darkgreen", fontsize=10, weight="bold")
    summary = f"VAE better on {100 * win_fraction(wins):.1f}% of {len(wins)} images"
    if interval is not None and len(interval) == 2:
        summary += f" (95% interval {100 * interval[0]:.1f}-{100 * interval[1]:.1f}%)"
    if not finite.all():
        summary += f"; {(~finite).sum()} non-finite not drawn"
    ax.set_title(f"{title}\n{summary}", fontsize=10)
    ax.set(xlabel=xlabel, ylabel="held-out images")


def symlog_ticks(linthresh: float, top: float, per_side: int = 4) -> list[float]:
    """Zero and round values of both signs between 3 * linthresh and ``top``: powers of ten,
    thinned to at most ``per_side`` per sign so labels never collide, or 1-2-5 steps where the
    range holds fewer than two powers of ten."""
    low = 3 * linthresh
    first, last = int(np.floor(np.log10(low))), int(np.floor(np.log10(top)))
    powers = [10.0 ** p for p in range(first, last + 1) if low <= 10.0 ** p <= top]
    if len(powers) < 2:
        powers = [m * 10.0 ** p for p in range(first, last + 1) for m in (1, 2, 5) if low <= m * 10.0 ** p <= top]
    stride = max(1, -(-len(powers) // per_side))
    powers = powers[::-1][::stride][::-1]
    return [-p for p in reversed(powers)] + [0.0] + powers


def _power_label(value: float) -> str:
    if value == 0:
        return "0"
    exponent = int(np.floor(np.log10(abs(value)) + 1e-9))
    mantissa = abs(value) / 10.0 ** exponent
    sign = "-" if value < 0 else ""
    if round(mantissa) == 1:
        return f"${sign}10^{{{exponent}}}$"
    return f"${sign}{mantissa:.0f}\\times10^{{{exponent}}}$"




# --- a trained run's figures -----------------------------------------------------------------

TRAVERSAL_STEPS = np.arange(-3, 4, dtype=np.float32)
"""Columns of the traversal figure, in prior standard deviations (the prior is N(0, I))."""


def planned_figures(run_dir: str | Path) -> list[str]:
    """File names of the figures ``make_run_figures`` writes for ``run_dir``: all of FIGURES, less
    differences.png when the run has not been evaluated (no per_image.csv)."""
    names = [spec.name for spec in FIGURES]
    if not (Path(run_dir) / "per_image.csv").is_file():
        names.remove("differences.png")
    return names


def missing_figures(run_dir: str | Path) -> list[str]:
    """The planned figures of ``run_dir`` that are not yet in RUN_DIR/figures."""
    folder = Path(run_dir) / "figures"
    return [name for name in planned_figures(run_dir) if not (folder / name).is_file()]


def out_of_date_figures(run_dir: str | Path) -> list[str]:
    """The planned figures of ``run_dir`` that are missing or older than what they are drawn from
    (the model's best.pt and log.csv; for differences.png also per_image.csv and evaluation.json)."""
    run_dir = Path(run_dir)
    model_inputs = [run_dir / "checkpoints" / "best.pt", run_dir / "log.csv"]
    evaluation_inputs = [run_dir / "per_image.csv", run_dir / "evaluation.json"]
    stale = []
    for name in planned_figures(run_dir):
        figure = run_dir / "figures" / name
        inputs = model_inputs + (evaluation_inputs if name == "differences.png" else [])
        newest = max((p.stat().st_mtime for p in inputs if p.is_file()), default=0.0)
        if not figure.is_file() or figure.stat().st_mtime < newest:
            stale.append(name)
    return stale


def make_run_figures(run_dir: str | Path, seed: int = 0, overwrite: bool = False, only=None,
                     n_conditional: int = 6, n_samples: int = 32, max_tsne: int = 2000) -> list[Path]:
    """Draw the figures of a trained run into RUN_DIR/figures/*.png; return their paths.

    seed:          chooses the example galaxies, the z drawn from q(z|x), the prior samples and
                   the t-SNE initialisation; the same seed gives the same figures
    overwrite:     replace figures that exist (otherwise an existing one raises OutputExistsError
                   before anything is drawn)
    only:          file names (a subset of ``planned_figures``) to draw; default all
    n_conditional: rows of the conditional figure; n_samples: galaxies drawn from the prior
    max_tsne:      at most this many held-out galaxies (a seeded random subset) enter the t-SNE
    """
    run_dir = Path(run_dir)
    names = planned_figures(run_dir) if only is None else list(only)
    unknown = set(names) - set(planned_figures(run_dir))
    if unknown:
        raise InputError(f"{run_dir}: cannot draw {', '.join(sorted(unknown))} "
                         f"(figures of this run: {', '.join(planned_figures(run_dir))})")
    folder = run_dir / "figures"
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{folder}: {', '.join(existing)} already exist(s); pass --overwrite "
                                "(overwrite=True) to replace")
    context = _RunContext.load(run_dir, seed)
    folder.mkdir(exist_ok=True)
    draw = {
        "conditional.png": lambda: _conditional_for_run(context, n_conditional),
        "tsne.png": lambda: _tsne_for_run(context, max_tsne),
        "traversals.png": lambda: _traversals_for_run(context),
        "samples.png": lambda: plot_samples(context.model.sample(n_samples, seed=seed), units=context.units),
        "training.png": lambda: plot_training(context.model.history(), context.model.config.checkpoint_metric),
        "differences.png": lambda: _differences_for_run(context),
    }
    written = []
    for name in names:
        start = time.perf_counter()
        written.append(save_figure(draw[name](), folder / name))
        log.info("figures: wrote %s (%.1f s)", folder / name, time.perf_counter() - start)
    return written


@dataclass
class _RunContext:
    """What the figures of one run are drawn from: the model, its held-out galaxies, a seed."""

    run_dir: Path
    model: object
    held_out: object
    seed: int

    @classmethod
    def load(cls, run_dir: Path, seed: int) -> "_RunContext":
        from galaxyvae.dataset import read_dataset
        from galaxyvae.runs import load_run

        model = load_run(run_dir)
        data_path = model.data_path or _evaluated_data(run_dir)
        if data_path is None:
            raise InputError(f"{run_dir}: config.json names no data set and the run has not been evaluated; "
                             "cannot find held-out images to draw")
        return cls(run_dir=run_dir, model=model, held_out=read_dataset(data_path, split="held_out"), seed=seed)

    @property
    def units(self) -> str:
        return str(self.held_out.attrs.get("pixel_units", "data units"))

    @property
    def families(self) -> np.ndarray:
        return np.asarray(self.held_out.metadata.get("family", np.full(len(self.held_out), "")), dtype=str)


def _evaluated_data(run_dir: Path) -> Path | None:
    import json

    path = run_dir / "evaluation.json"
    data = json.loads(path.read_text(encoding="utf-8")).get("data") if path.is_file() else None
    return Path(data) if data else None


def choose_examples(families: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` examples taking families in turn (round robin, random within each), so every
    family appears before any appears twice; plain random choice where there are no labels."""
    families = np.asarray(families, dtype=str)
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(families == name))) for name in sorted(set(families))]
    chosen: list[int] = []
    while len(chosen) < min(n, len(families)):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(int(pool.pop()))
    return np.asarray(chosen, dtype=int)


def _conditional_for_run(context: _RunContext, n_rows: int):
    from galaxyvae.baselines import fit_gaussian

    index = choose_examples(context.families, n_rows, context.seed)
    images = context.held_out.images[index]
    mean, variance = context.model.encode(images)
    rng = np.random.default_rng(context.seed)
    z = (mean + np.sqrt(variance) * rng.standard_normal(mean.shape)).astype(np.float32)
    decoded_mean, decoded_variance = context.model.decode(z)
    fit = fit_gaussian(images, fit_sky=not bool(context.held_out.attrs.get("sky_subtracted", True)))
    ids = np.asarray(context.held_out.metadata.get("object_id", index), dtype=str)[index]
    labels = [f"{oid}\n{fam}" if fam else oid for oid, fam in zip(ids, context.families[index])]
    return plot_conditional(images, decoded_mean, decoded_variance, fit.model_images, labels=labels,
                            units=context.units)


def _tsne_for_run(context: _RunContext, max_galaxies: int):
    n = len(context.held_out)
    index = np.arange(n)
    if n > max_galaxies:
        index = np.sort(np.random.default_rng(context.seed).choice(n, max_galaxies, replace=False))
    images = context.held_out.images[index]
    means, _ = context.model.encode(images)
    embedding = tsne_embedding(means, seed=context.seed)
    families = context.families[index]
    return plot_tsne(embedding, images, families=families if set(families) != {""} else None,
                     seed=context.seed)


def _traversals_for_run(context: _RunContext):
    latent_dim = context.model.config.model.latent_dim
    grid = traversal_grid(latent_dim, TRAVERSAL_STEPS)
    means, _ = context.model.decode(grid.reshape(-1, latent_dim))
    return plot_traversals(means.reshape(latent_dim, len(TRAVERSAL_STEPS), *means.shape[1:]), TRAVERSAL_STEPS,
                           units=context.units)


def _differences_for_run(context: _RunContext):
    import json

    summary_path = context.run_dir / "evaluation.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return plot_differences(read_per_image(context.run_dir / "per_image.csv"), summary=summary,
                            units=context.units)


def read_per_image(path: str | Path) -> dict[str, np.ndarray]:
    """Read per_image.csv into columns: numbers as float arrays, True/False as bool, the rest as str."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise InputError(f"{path}: cannot read the per-image results ({err.strerror})") from None
    if not rows:
        raise InputError(f"{path}: holds no per-image rows")
    return {name: _column([row[name] for row in rows]) for name in rows[0]}


def _column(values: list[str]) -> np.ndarray:
    lowered = {v.strip().lower() for v in values}
    if lowered <= {"true", "false"}:
        return np.array([v.strip().lower() == "true" for v in values])
    try:
        return np.array([float(v) for v in values])
    except ValueError:
        return np.array(values, dtype=str)
