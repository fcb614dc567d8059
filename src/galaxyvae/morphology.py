"""Non-parametric morphology of galaxy stamps: concentration, asymmetry, smoothness, Gini, M20.

Used to judge how realistic a data set is (the simulated survey against real cutouts, model
samples against their training data). The statistics are measured by statmorph
(Rodriguez-Gomez et al. 2019) on the central galaxy of each stamp:

1. **Scaling.** Each stack is put into the units the model sees, ``(x - offset) / scale``
   with ``galaxyvae.model.PixelScaling.fit`` (median and 1.4826 x MAD of the pixels within 5 of
   the edge), fitted on the whole stack (``MorphologyConfig.scaling="sample"``) or on each image.
   The noise of an empty pixel is then 1, whatever the data set's pixel units.
2. **Segmentation of the central galaxy.** The scaled image is smoothed by a Gaussian
   (``smoothing_px``); connected pixels (8-connectivity) above ``threshold_sigma`` times the
   smoothed noise (measured on the border, so correlated noise is allowed for) form segments of at
   least ``min_pixels`` pixels, split by photutils' deblending (``deblend_contrast``, as
   SExtractor does). A segment is *significant* if its smoothed peak exceeds ``detection_sigma``
   times the smoothed noise. The central galaxy is
   the segment holding the stamp's centre pixel, or else the significant segment reaching
   closest to it, within ``max_centre_distance_px``. Other significant segments are neighbours:
   they are masked (dilated by ``mask_dilation_px``) and counted.
3. **statmorph** measures the segment with a constant weight map (the sky noise, 1 in scaled
   units; it matters only to statmorph's S/N and Sersic fit, not to C, A, S, Gini or M20).
   A measurement fails if no central segment is found, statmorph's flag exceeds ``max_flag``
   (statmorph: 0 good, 1 suspect, 2 bad, 4 catastrophic), or a value is not finite. Failed
   values are NaN and counted; nothing is dropped.

The module also records simple size and brightness facts in the same scaled units: the peak of
the central segment in noise sigmas, statmorph's circular half-light radius in pixels, the
fraction of the stamp's pixels above 2 sigma, and whether a neighbour is present.

``compare_morphology`` measures several samples and writes a figure and tables (docs/realism.md).
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import ndimage, stats

from galaxyvae._io import check_writable, write_text_atomic
from galaxyvae.errors import InputError

log = logging.getLogger(__name__)

STATISTICS = ("concentration", "asymmetry", "smoothness", "gini", "m20")
"""The non-parametric statistics measured by statmorph, in table order."""
SIZE_FACTS = ("rhalf_px", "peak_snr", "area_above_2sigma", "has_neighbour")
"""Size and brightness facts in scaled units: half-light radius (pixels), peak of the central
galaxy in sky sigmas, fraction of the stamp's pixels above 2 sigma, neighbour present (0/1)."""
QUANTITIES = STATISTICS + SIZE_FACTS
LABELS = {
    "concentration": "concentration C", "asymmetry": "asymmetry A", "smoothness": "smoothness S",
    "gini": "Gini G", "m20": "M$_{20}$", "rhalf_px": "half-light radius (pixels)",
    "peak_snr": "peak / sky $\\sigma$", "area_above_2sigma": "fraction of stamp above 2$\\sigma$",
    "has_neighbour": "has a neighbour",
}
MAX_PIXEL_SNR_FOR_LOG = 10.0
"""The peak-S/N histogram uses a logarithmic axis when the largest peak exceeds this."""


class MorphologyError(InputError):
    """Images or samples given to the morphology measurement are unusable."""


@dataclass(frozen=True)
class MorphologyConfig:
    """Settings of the segmentation and of statmorph (defaults used throughout docs/realism.md)."""

    scaling: str = "sample"
    """"sample": one PixelScaling fitted on the whole stack (the model's units); "image": one per image."""
    smoothing_px: float = 1.0
    """Gaussian sigma (pixels) of the smoothing before thresholding."""
    threshold_sigma: float = 1.5
    """Segment pixels lie above this many sigma of the smoothed noise."""
    detection_sigma: float = 5.0
    """A segment is a real source if its smoothed peak exceeds this many sigma of the smoothed noise."""
    min_pixels: int = 10
    """Smallest segment (pixels)."""
    deblend_contrast: float | None = 0.01
    """photutils deblending (32 levels): a sub-peak holding at least this fraction of its segment's
    flux becomes its own source. None: no deblending (touching neighbours then join the galaxy)."""
    max_centre_distance_px: float = 6.0
    """How far from the stamp centre the central galaxy's segment may begin if it misses the centre."""
    mask_dilation_px: int = 2
    """Neighbours' segments are grown by this many pixels before masking."""
    skybox_size: int = 16
    """statmorph's first try at an empty sky box (it halves it until one fits); 69-pixel stamps are small."""
    max_flag: int = 1
    """Largest statmorph flag still accepted (0 good, 1 suspect, 2 bad, 4 catastrophic)."""
    outlier_sigma: float = 0.0
    """statmorph's cosmic-ray rejection (Lotz et al. 2004: a pixel this many sigma of its 8 neighbours
    away from their mean is masked); 0 turns it off. Off by default: these stamps have no cosmic rays,
    and at high S/N it masks the peak pixel of a cuspy galaxy (then statmorph flags it 2)."""

    def __post_init__(self):
        if self.scaling not in ("sample", "image"):
            raise MorphologyError(f"scaling must be 'sample' or 'image', not {self.scaling!r}")


@dataclass
class MorphologyResult:
    """Per-image measurements of one stack of N images.

    values:  quantity name (QUANTITIES) -> (N,) float64; NaN where the measurement failed
    flag:    (N,) int, statmorph's flag; -1 where statmorph was not run (no central segment)
    failed:  (N,) bool, True where the statistics are NaN
    reason:  (N,) str, why a measurement failed ("" where it did not)
    scaling: (offset, scale) of each image in data units: (N, 2)
    """

    values: dict[str, np.ndarray]
    flag: np.ndarray
    failed: np.ndarray
    reason: np.ndarray
    scaling: np.ndarray

    def __len__(self) -> int:
        return len(self.flag)

    @property
    def n_failed(self) -> int:
        return int(self.failed.sum())

    @property
    def failure_fraction(self) -> float:
        return self.n_failed / len(self) if len(self) else float("nan")

    def subset(self, index) -> "MorphologyResult":
        """The measurements of the images selected by ``index`` (boolean mask or integer array)."""
        return MorphologyResult({k: v[index] for k, v in self.values.items()}, self.flag[index],
                                self.failed[index], self.reason[index], self.scaling[index])


# --- measuring --------------------------------------------------------------------------------------

def scale_images(images: np.ndarray, scaling: str = "sample") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S) in data units -> (scaled images (N, S, S) float64, (N, 2) offset and scale).

    The scaled images are ``(x - offset) / scale`` with ``PixelScaling.fit`` on the whole stack
    ("sample") or on each image alone ("image"), so an empty pixel has noise ~1.
    """
    from galaxyvae.model import PixelScaling

    images = np.asarray(images, dtype=np.float64)
    if scaling == "sample":
        fits = [PixelScaling.fit(images)] * len(images)
    else:
        fits = [PixelScaling.fit(image[None]) for image in images]
    scaling_table = np.array([(fit.offset, fit.scale) for fit in fits], dtype=np.float64).reshape(-1, 2)
    scaled = (images - scaling_table[:, :1, None]) / scaling_table[:, 1:, None]
    return scaled, scaling_table


@dataclass
class Segmentation:
    """The central galaxy's pixels, the neighbours' mask and how many neighbours there are."""

    central: np.ndarray      # (S, S) bool
    neighbours: np.ndarray   # (S, S) bool, dilated neighbour segments outside the central one
    n_neighbours: int


def smooth_images(scaled: np.ndarray, config: MorphologyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Scaled images (N, S, S) -> (Gaussian-smoothed images (N, S, S), (N,) noise of the smoothed images).

    The smoothed noise is measured (1.4826 x MAD of the border pixels, pooled over the stack or per
    image as ``config.scaling``), not assumed, because resampled or JPEG images have correlated
    noise that smoothing reduces less than it does white noise; if the border is constant the
    white-noise value 1 / (2 sqrt(pi) smoothing_px) is used.
    """
    sigma = (0, config.smoothing_px, config.smoothing_px)
    smoothed = ndimage.gaussian_filter(scaled, sigma, mode="nearest") if config.smoothing_px > 0 else scaled.copy()
    white = 1.0 / (2.0 * np.sqrt(np.pi) * config.smoothing_px) if config.smoothing_px > 0 else 1.0
    if config.scaling == "sample":
        noise = np.full(len(scaled), _border_noise(smoothed, white))
    else:
        noise = np.array([_border_noise(image[None], white) for image in smoothed])
    return smoothed, noise


def _border_noise(images: np.ndarray, fallback: float) -> float:
    """1.4826 x MAD of the pixels within BORDER_WIDTH of the edge of a stack (N, S, S); ``fallback`` if 0."""
    from galaxyvae.model import BORDER_WIDTH, MAD_TO_SIGMA

    border = np.ones(images.shape[1:], bool)
    border[BORDER_WIDTH:-BORDER_WIDTH, BORDER_WIDTH:-BORDER_WIDTH] = False
    values = images[:, border]
    mad = float(np.median(np.abs(values - np.median(values))))
    return MAD_TO_SIGMA * mad if mad > 0 else fallback


def segment_central_galaxy(smoothed: np.ndarray, noise: float, config: MorphologyConfig) -> Segmentation | None:
    """Segment the central galaxy of one smoothed scaled image (S, S) whose noise is ``noise``;
    None if there is none. See the module docstring for the rule. Deterministic."""
    labels, n = ndimage.label(smoothed > config.threshold_sigma * noise, structure=np.ones((3, 3)))
    if n == 0:
        return None
    if config.deblend_contrast is not None:
        labels = _deblend(smoothed, labels, config)
    index = np.unique(labels[labels > 0])
    sizes = ndimage.sum_labels(np.ones_like(smoothed), labels, index)
    peaks = ndimage.maximum(smoothed, labels, index)
    real = index[(sizes >= config.min_pixels) & (peaks > config.detection_sigma * noise)]
    central = _central_label(labels, real, config.max_centre_distance_px)
    if central is None:
        return None
    others = real[real != central]
    neighbours = np.isin(labels, others)
    if config.mask_dilation_px > 0 and others.size:
        neighbours = ndimage.binary_dilation(neighbours, iterations=config.mask_dilation_px)
    central_pixels = labels == central
    return Segmentation(central_pixels, neighbours & ~central_pixels, int(others.size))


def _deblend(smoothed: np.ndarray, labels: np.ndarray, config: MorphologyConfig) -> np.ndarray:
    from photutils.segmentation import SegmentationImage, deblend_sources

    with warnings.catch_warnings():
        # photutils warns when a segment is too small to deblend; such a segment is kept whole.
        warnings.simplefilter("ignore")
        deblended = deblend_sources(smoothed, SegmentationImage(labels), npixels=config.min_pixels, nlevels=32,
                                    contrast=config.deblend_contrast, progress_bar=False)
    return np.asarray(deblended.data)


def _central_label(labels: np.ndarray, real: np.ndarray, max_distance: float) -> int | None:
    centre = (np.array(labels.shape) - 1) / 2
    at_centre = labels[int(round(centre[0])), int(round(centre[1]))]
    if at_centre in real:
        return int(at_centre)
    rows, cols = np.nonzero(np.isin(labels, real))
    if rows.size == 0:
        return None
    distance = np.hypot(rows - centre[0], cols - centre[1])
    nearest = int(np.argmin(distance))
    return int(labels[rows[nearest], cols[nearest]]) if distance[nearest] <= max_distance else None


def measure_image(scaled: np.ndarray, smoothed: np.ndarray, smoothed_noise: float,
                  config: MorphologyConfig) -> tuple[dict[str, float], int, str]:
    """Measure one scaled image (S, S) (sky noise 1), given its smoothed version and that one's noise:
    (quantities, statmorph flag, failure reason).

    Quantities are NaN and the reason non-empty where the measurement fails. The size facts
    peak_snr, area_above_2sigma and has_neighbour are kept when statmorph fails.
    """
    values = dict.fromkeys(QUANTITIES, float("nan"))
    values["area_above_2sigma"] = float(np.mean(scaled > 2.0))
    segmentation = segment_central_galaxy(smoothed, smoothed_noise, config)
    if segmentation is None:
        return values, -1, "no significant source at the centre"
    values["peak_snr"] = float(scaled[segmentation.central].max())
    values["has_neighbour"] = float(segmentation.n_neighbours > 0)
    morph, messages = _statmorph(scaled, segmentation, config)
    measured = {"concentration": morph.concentration, "asymmetry": morph.asymmetry,
                "smoothness": morph.smoothness, "gini": morph.gini, "m20": morph.m20,
                "rhalf_px": morph.rhalf_circ}
    flag = int(morph.flag)
    if flag > config.max_flag:
        return values, flag, f"statmorph flag {flag}" + (f" ({'; '.join(messages)})" if messages else "")
    bad = [name for name, value in measured.items() if not np.isfinite(value) or value == -99.0]
    if bad:
        return values, flag, f"statmorph gave no finite {', '.join(bad)}"
    values.update({name: float(value) for name, value in measured.items()})
    return values, flag, ""


def _statmorph(scaled: np.ndarray, segmentation: Segmentation, config: MorphologyConfig):
    """statmorph's SourceMorphology of the central segment, and the distinct warnings it gave."""
    import statmorph
    from astropy.utils.exceptions import AstropyUserWarning

    with warnings.catch_warnings(record=True) as caught:
        # statmorph warns about every odd stamp; its flag carries the verdict and the messages say why.
        warnings.simplefilter("always", AstropyUserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        morph = statmorph.SourceMorphology(
            np.ascontiguousarray(scaled), segmentation.central.astype(np.int32), 1,
            mask=segmentation.neighbours, weightmap=np.ones_like(scaled), skybox_size=config.skybox_size,
            n_sigma_outlier=config.outlier_sigma)
    messages = [str(w.message) for w in caught if issubclass(w.category, AstropyUserWarning)]
    return morph, list(dict.fromkeys(messages))


def measure_morphology(images: np.ndarray, config: MorphologyConfig | None = None,
                       progress: bool = False) -> MorphologyResult:
    """Measure C, A, S, Gini, M20 and the size facts of the central galaxy of each image.

    images: (N, S, S) in any pixel units, sky-subtracted (an offset is removed by the scaling);
            the galaxy of interest near the centre.
    Returns a MorphologyResult with NaN for failed images (counted in ``.n_failed``).
    Raises MorphologyError for a wrong shape or non-finite pixels. Deterministic.
    """
    config = config or MorphologyConfig()
    images = _checked_images(images, "images")
    scaled, scaling = scale_images(images, config.scaling)
    smoothed, smoothed_noise = smooth_images(scaled, config)
    rows = [measure_image(scaled[i], smoothed[i], smoothed_noise[i], config)
            for i in _progress(range(len(scaled)), progress)]
    values = {name: np.array([row[0][name] for row in rows], dtype=np.float64) for name in QUANTITIES}
    flag = np.array([row[1] for row in rows], dtype=np.int64)
    reason = np.array([row[2] for row in rows], dtype=object)
    failed = reason != ""
    if failed.any():
        log.info("morphology: %d of %d measurements failed", failed.sum(), len(images))
    return MorphologyResult(values, flag, failed, reason, scaling)


def _checked_images(images, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] < 8:
        raise MorphologyError(f"{what}: expected a stack of square images (N, S, S), got shape {images.shape}")
    if images.dtype.kind not in "fiu":
        raise MorphologyError(f"{what}: expected numeric pixels, got dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise MorphologyError(f"{what}: holds NaN or infinite pixels")
    return images


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="morphology", unit="image", leave=False)


# --- summaries and distances ----------------------------------------------------------------------

@dataclass
class SampleSummary:
    """Per-quantity median, 16th and 84th percentiles over the measured images of one sample, the
    failure count, and the two-sample KS statistic (and p-value) against the reference sample and,
    if it has one, against its paired sample (a model's samples against its training data)."""

    name: str
    n_images: int
    n_failed: int
    median: dict[str, float] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)
    p16: dict[str, float] = field(default_factory=dict)
    p84: dict[str, float] = field(default_factory=dict)
    ks: dict[str, float] = field(default_factory=dict)
    ks_p: dict[str, float] = field(default_factory=dict)
    paired_with: str = ""
    ks_pair: dict[str, float] = field(default_factory=dict)
    ks_pair_p: dict[str, float] = field(default_factory=dict)

    @property
    def failure_fraction(self) -> float:
        return self.n_failed / self.n_images if self.n_images else float("nan")


def summarize_sample(name: str, result: MorphologyResult, reference: MorphologyResult | None,
                     pair: tuple[str, MorphologyResult] | None = None) -> SampleSummary:
    """Median and 16-84% range of each quantity over the finite values; KS distance to ``reference``
    and to the paired sample ``pair`` = (name, result) if given."""
    summary = SampleSummary(name, len(result), result.n_failed, paired_with=pair[0] if pair else "")
    for quantity in QUANTITIES:
        values = _finite(result.values[quantity])
        low, mid, high = np.percentile(values, [16, 50, 84]) if values.size else (np.nan,) * 3
        summary.median[quantity], summary.p16[quantity], summary.p84[quantity] = float(mid), float(low), float(high)
        summary.mean[quantity] = float(values.mean()) if values.size else float("nan")
        summary.ks[quantity], summary.ks_p[quantity] = ks_distance(result.values[quantity],
                                                                  None if reference is None else reference.values[quantity])
        summary.ks_pair[quantity], summary.ks_pair_p[quantity] = ks_distance(
            result.values[quantity], pair[1].values[quantity] if pair else None)
    return summary


def ks_distance(values: np.ndarray, reference: np.ndarray | None) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its p-value over the finite values (NaN, NaN if
    either side has none or no reference is given)."""
    if reference is None:
        return float("nan"), float("nan")
    values, reference = _finite(values), _finite(reference)
    if values.size == 0 or reference.size == 0:
        return float("nan"), float("nan")
    test = stats.ks_2samp(values, reference)
    return float(test.statistic), float(test.pvalue)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


# --- the comparison: measure, summarise, draw, write ----------------------------------------------

OUTPUT_NAMES = ("morphology.png", "morphology.md", "morphology.csv", "morphology_per_image.csv")
FAMILY_FIGURE = "morphology_families.png"


@dataclass
class Comparison:
    """What ``compare_morphology`` measured and wrote."""

    results: dict[str, MorphologyResult]
    summaries: list[SampleSummary]
    reference: str
    paths: dict[str, Path]


def compare_morphology(samples: dict[str, np.ndarray], out_dir: str | Path, overwrite: bool = False,
                       reference: str | None = None, families: dict[str, np.ndarray] | None = None,
                       pairs: dict[str, str] | None = None, config: MorphologyConfig | None = None,
                       progress: bool = False, notes: dict[str, str] | None = None) -> Comparison:
    """Measure each sample and write a figure and tables comparing them.

    samples:   name -> images (N, S, S) in that sample's own pixel units (each is scaled alone)
    out_dir:   folder for morphology.png (Gini-M20 and C-A planes, histograms), morphology.md and
               morphology.csv (per sample: median and 16-84% range of each quantity, failure
               fraction, KS statistic against the reference), morphology_per_image.csv, and
               morphology_families.png when ``families`` is given; created if missing
    reference: the sample the KS distances are taken against (default: the first)
    families:  optional sample name -> (N,) labels; adds a row per label to the tables and a
               figure of the labelled sample's families against the reference
    pairs:     optional sample name -> another sample it is also compared with (KS), e.g. a trained
               model's samples -> the data set it was trained on
    notes:     optional sample name -> one line saying where it came from (written in the .md)
    Raises MorphologyError for empty or malformed samples, OutputExistsError if an output exists
    and ``overwrite`` is false (checked before anything is measured).
    """
    if not samples:
        raise MorphologyError("compare_morphology: no samples given")
    reference = reference if reference is not None else next(iter(samples))
    if reference not in samples:
        raise MorphologyError(f"reference {reference!r} is not one of the samples {sorted(samples)}")
    families, pairs = families or {}, pairs or {}
    for name, other in pairs.items():
        if name not in samples or other not in samples:
            raise MorphologyError(f"pairs: {name!r} -> {other!r} names a sample that was not given")
    for name, labels in families.items():
        if name not in samples or len(labels) != len(samples[name]):
            raise MorphologyError(f"families[{name!r}] must label every image of a sample of that name")
    paths = output_paths(out_dir, bool(families), overwrite)
    images = {name: _checked_images(stack, f"sample {name!r}") for name, stack in samples.items()}
    if any(len(stack) == 0 for stack in images.values()):
        raise MorphologyError("compare_morphology: every sample needs at least one image")

    results = {}
    for name, stack in images.items():
        log.info("morphology: measuring %d images of %s", len(stack), name)
        results[name] = measure_morphology(stack, config, progress=progress)
    summaries = _summaries(results, reference, families, pairs)

    _write_figure(plot_morphology(results, reference), paths["morphology.png"])
    if families:
        name, labels = next(iter(families.items()))
        _write_figure(plot_families(results[name], np.asarray(labels, dtype=str), results[reference],
                                    name, reference), paths[FAMILY_FIGURE])
    write_text_atomic(paths["morphology.md"], summary_markdown(summaries, reference, config or MorphologyConfig(),
                                                                notes or {}))
    write_text_atomic(paths["morphology.csv"], summary_csv(summaries))
    write_text_atomic(paths["morphology_per_image.csv"], per_image_csv(results))
    return Comparison(results, summaries, reference, paths)


def output_paths(out_dir: str | Path, with_families: bool, overwrite: bool) -> dict[str, Path]:
    """The files ``compare_morphology`` writes, by name, after creating ``out_dir`` and checking that
    none exists unless ``overwrite`` (OutputExistsError)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MorphologyError(f"cannot create the output folder {out_dir} ({err.strerror or err})") from None
    names = OUTPUT_NAMES + ((FAMILY_FIGURE,) if with_families else ())
    return {name: check_writable(out_dir / name, overwrite) for name in names}


def _summaries(results: dict[str, MorphologyResult], reference: str, families: dict[str, np.ndarray],
               pairs: dict[str, str]) -> list[SampleSummary]:
    summaries = []
    for name, result in results.items():
        pair = (pairs[name], results[pairs[name]]) if name in pairs else None
        summaries.append(summarize_sample(name, result, results[reference], pair))
        if name in families:
            labels = np.asarray(families[name], dtype=str)
            for label in sorted(set(labels)):
                summaries.append(summarize_sample(f"{name} / {label}", result.subset(labels == label),
                                                  results[reference]))
    return summaries


def _write_figure(fig, path: Path) -> None:
    from galaxyvae.figures import save_figure

    save_figure(fig, path)


# --- tables -----------------------------------------------------------------------------------------

def summary_csv(summaries: Iterable[SampleSummary]) -> str:
    """One row per sample: n, failures, its paired sample, and per quantity the median, p16, p84, mean,
    and the KS statistic and p-value against the reference and against the paired sample."""
    parts = ("median", "p16", "p84", "mean", "ks", "ks_p", "ks_pair", "ks_pair_p")
    header = ["sample", "n_images", "n_failed", "failure_fraction", "paired_with"]
    for quantity in QUANTITIES:
        header += [f"{quantity}_{part}" for part in parts]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for s in summaries:
        row = [s.name, s.n_images, s.n_failed, _number(s.failure_fraction), s.paired_with]
        for quantity in QUANTITIES:
            row += [_number(d[quantity]) for d in (s.median, s.p16, s.p84, s.mean, s.ks, s.ks_p, s.ks_pair,
                                                   s.ks_pair_p)]
        writer.writerow(row)
    return buffer.getvalue()


def per_image_csv(results: dict[str, MorphologyResult]) -> str:
    """One row per measured image: sample, index in the sample, every quantity, flag, failure reason."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample", "index", *QUANTITIES, "statmorph_flag", "failure", "offset", "scale"])
    for name, result in results.items():
        for i in range(len(result)):
            writer.writerow([name, i, *(_number(result.values[q][i]) for q in QUANTITIES), int(result.flag[i]),
                             result.reason[i], _number(result.scaling[i, 0]), _number(result.scaling[i, 1])])
    return buffer.getvalue()


def _number(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.6g}"


def summary_markdown(summaries: list[SampleSummary], reference: str, config: MorphologyConfig,
                     notes: dict[str, str]) -> str:
    """Two Markdown tables: medians with 16-84% ranges, and KS statistics against the reference."""
    lines = ["# Morphology of the samples", ""]
    lines += [f"- **{name}**: {note}" for name, note in notes.items()]
    lines += ([""] if notes else []) + ["Median [16th, 84th percentile] over the images measured; failed: statmorph flag > "
              f"{config.max_flag} or no central source (NaN, counted). r_half, peak/σ and area > 2σ are in the "
              "model's scaled units (sky noise 1); neighbour: the fraction of stamps with another significant "
              "source.", ""]
    header = ["sample", "n", "failed"] + [_plain_label(q) for q in QUANTITIES]
    lines += _markdown_row(header) + [_markdown_row(["---"] * len(header))[0]]
    for s in summaries:
        cells = [s.name, str(s.n_images), f"{s.n_failed} ({100 * s.failure_fraction:.0f}%)"]
        cells += [_range_cell(s, q) for q in QUANTITIES]
        lines += _markdown_row(cells)
    lines += ["", f"Two-sample Kolmogorov-Smirnov statistic D against **{reference}** (0: same distribution, "
              "1: disjoint; p-value in brackets).", ""]
    header = ["sample"] + [_plain_label(q) for q in QUANTITIES]
    lines += _markdown_row(header) + [_markdown_row(["---"] * len(header))[0]]
    for s in summaries:
        if s.name == reference:
            continue
        lines += _markdown_row([s.name] + [_ks_cell(s.ks[q], s.ks_p[q]) for q in QUANTITIES])
    paired = [s for s in summaries if s.paired_with]
    if paired:
        lines += ["", "Kolmogorov-Smirnov statistic D of each sample against its paired sample (a model's samples "
                  "against its training data).", ""]
        header = ["sample", "against"] + [_plain_label(q) for q in QUANTITIES]
        lines += _markdown_row(header) + [_markdown_row(["---"] * len(header))[0]]
        for s in paired:
            lines += _markdown_row([s.name, s.paired_with] + [_ks_cell(s.ks_pair[q], s.ks_pair_p[q]) for q in QUANTITIES])
    return "\n".join(lines) + "\n"


def _markdown_row(cells: list[str]) -> list[str]:
    return ["| " + " | ".join(cells) + " |"]


def _plain_label(quantity: str) -> str:
    return {"concentration": "C", "asymmetry": "A", "smoothness": "S", "gini": "Gini", "m20": "M20",
            "rhalf_px": "r_half (px)", "peak_snr": "peak/σ", "area_above_2sigma": "area > 2σ",
            "has_neighbour": "neighbour"}[quantity]


def _range_cell(s: SampleSummary, quantity: str) -> str:
    if not np.isfinite(s.median[quantity]):
        return "–"
    if quantity == "has_neighbour":
        # A 0/1 quantity: its mean, the fraction of stamps with a neighbour, says more than its median.
        return f"{s.mean[quantity]:.0%}"
    digits = 0 if quantity == "peak_snr" else (1 if quantity == "rhalf_px" else 2)
    return f"{s.median[quantity]:.{digits}f} [{s.p16[quantity]:.{digits}f}, {s.p84[quantity]:.{digits}f}]"


def _ks_cell(d: float, p: float) -> str:
    if not np.isfinite(d):
        return "–"
    return f"{d:.2f} ({p:.0e})" if p < 0.01 else f"{d:.2f} ({p:.2f})"


# --- samples from data sets and trained runs ---------------------------------------------------------

@dataclass
class Sample:
    """Images to measure, with their labels and a line saying where they came from.

    images:   (n, S, S) float32 in the source's pixel units
    families: (n,) str labels from the data set's ``family`` column, or None
    """

    name: str
    images: np.ndarray
    families: np.ndarray | None
    note: str
    data_path: Path | None = None
    """The data-set file the images come from, or a run's training data."""


def named_path(argument: str | Path) -> tuple[str | None, Path]:
    """``"name=path"`` -> (name, Path(path)); a plain path -> (None, Path(path))."""
    text = str(argument)
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        if not name or not path:
            raise MorphologyError(f"{text!r}: expected PATH or NAME=PATH")
        return name, Path(path)
    return None, Path(text)


def read_data_sample(path: str | Path, n: int, seed: int = 0, name: str | None = None) -> Sample:
    """Up to ``n`` images drawn without replacement (seeded) from a galaxyvae data set, train and
    held-out splits alike, read without loading the rest of the file.

    Raises DatasetError naming the file if it is missing or not a galaxyvae data set.
    """
    from galaxyvae.dataset import DatasetError, open_dataset_file, validate_images

    path = Path(path)
    if n < 1:
        raise MorphologyError(f"n must be at least 1, not {n}")
    with open_dataset_file(path) as handle:
        if "images" not in handle:
            raise DatasetError(f"{path}: missing 'images'")
        total = handle["images"].shape[0]
        index = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        images = validate_images(handle["images"][index], what=str(path))
        families = None
        if "metadata/family" in handle:
            labels = np.asarray(handle["metadata/family"].asstr()[()], dtype=str)[index]
            families = labels if (labels != "").any() else None
        units = handle.attrs.get("pixel_units", "unknown units")
    units = units.decode() if isinstance(units, bytes) else str(units)
    note = f"{len(index)} of the {total} images of {path} (seed {seed}), {units}"
    return Sample(name or path.stem, images, families, note, path)


LATENT_SOURCES = ("prior", "aggregate")
"""Where ``model_sample`` draws z from: the prior N(0, I), or the aggregate posterior (the mixture
of q(z|x) over the run's training images)."""


def model_sample(run_dir: str | Path, n: int, seed: int = 0, name: str | None = None, checkpoint: str = "best",
                 device=None, latents: str = "prior") -> Sample:
    """``n`` noisy images from a trained run's generative model: z, then x ~ N(f_mu(z), diag f_sigma(z)),
    every draw from one numpy generator seeded by ``seed``.

    latents: "prior" draws z ~ N(0, I) (n x d standard normals); "aggregate" draws z from the
             aggregate posterior: n training images of the run's data set, chosen with
             ``rng.choice`` (with replacement only if there are fewer than n), then
             z = g_mu(x) + sqrt(g_sigma(x)) * eps. A VAE whose q(z|x) covers only part of the prior
             (as a large latent dimension trained on few images does) draws faint averages from the
             prior; the aggregate posterior shows what it learned of its training images.

    Drawing the pixel noise makes model samples comparable with (noisy) data; f_mu(z) alone is a
    noiseless mean image whose statistics differ. Images are in the run's data-set units.
    Raises InputError if the run directory, its checkpoint or (for "aggregate") its training data is unusable.
    """
    from galaxyvae.runs import load_run

    if n < 1:
        raise MorphologyError(f"n must be at least 1, not {n}")
    if latents not in LATENT_SOURCES:
        raise MorphologyError(f"latents must be one of {', '.join(LATENT_SOURCES)}, not {latents!r}")
    model = load_run(run_dir, device=device, checkpoint=checkpoint)
    rng = np.random.default_rng(seed)
    if latents == "prior":
        z = rng.standard_normal((n, model.latent_dim)).astype(np.float32)
        source = "z ~ N(0, I)"
    else:
        z = _aggregate_posterior_draws(model, run_dir, n, rng)
        source = f"z ~ q(z|x) of training images of {model.data_path}"
    mean, variance = model.decode(z)
    images = mean + np.sqrt(variance) * rng.standard_normal(mean.shape).astype(np.float32)
    run_dir = Path(run_dir)
    note = (f"{n} draws x ~ N(f_mu(z), f_sigma(z)), {source} (seed {seed}) from {run_dir} "
            f"({checkpoint} checkpoint, epoch {model.epoch}), trained on {model.data_path}")
    return Sample(name or run_dir.name, images.astype(np.float32), None, note, model.data_path)


def _aggregate_posterior_draws(model, run_dir: str | Path, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, d) float32 draws z ~ q(z|x), x chosen among the training split of the run's data set."""
    from galaxyvae.dataset import read_dataset

    data_path = model.data_path
    if data_path is None or not Path(data_path).exists():
        raise MorphologyError(f"{run_dir}: --latents aggregate needs the run's training data, and {data_path} "
                              "is not there")
    images = read_dataset(data_path, split="train").images
    index = rng.choice(len(images), size=n, replace=n > len(images))
    q_mean, q_variance = model.encode(images[index])
    return (q_mean + np.sqrt(q_variance) * rng.standard_normal(q_mean.shape)).astype(np.float32)


def morphology_report(data: list[str | Path], runs: list[str | Path], out_dir: str | Path, n: int = 300,
                      seed: int = 0, overwrite: bool = False, reference: str | None = None,
                      by_family: bool = True, checkpoint: str = "best", config: MorphologyConfig | None = None,
                      progress: bool = False, latents: str = "prior") -> Comparison:
    """Compare data sets and trained runs' samples: the ``galaxyvae morphology`` command.

    data: data-set files, each ``PATH`` (named by its stem) or ``NAME=PATH``; up to ``n`` images each
    runs: run directories, each ``PATH`` (named by its folder) or ``NAME=PATH``; ``n`` samples each,
          also compared with their training data where that file is among ``data``
    reference: the sample name KS distances are taken against (default: the first data set, else the first run)
    latents: where the runs' z come from, "prior" or "aggregate" (see ``model_sample``)
    by_family: add per-family rows and a family figure for the first data set that has a family column
    Writes what ``compare_morphology`` writes into ``out_dir``; seeds make every draw repeatable.
    """
    if not data and not runs:
        raise MorphologyError("give at least one data set or run to measure")
    output_paths(out_dir, False, overwrite)  # fail before the slow part if the outputs exist
    samples: list[Sample] = []
    for argument in data:
        name, path = named_path(argument)
        samples.append(read_data_sample(path, n, seed, name))
    for argument in runs:
        name, path = named_path(argument)
        samples.append(model_sample(path, n, seed, name, checkpoint=checkpoint, latents=latents))
    names = [sample.name for sample in samples]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MorphologyError(f"two samples are named {duplicates[0]!r}; name them with NAME=PATH")
    families = {}
    if by_family:
        labelled = [sample for sample in samples if sample.families is not None]
        families = {labelled[0].name: labelled[0].families} if labelled else {}
    return compare_morphology({s.name: s.images for s in samples}, out_dir, overwrite=overwrite, reference=reference,
                              families=families, pairs=_training_data_pairs(samples[len(data):], samples[:len(data)]),
                              config=config, progress=progress, notes={s.name: s.note for s in samples})


def _training_data_pairs(model_samples: list[Sample], data_samples: list[Sample]) -> dict[str, str]:
    """Model sample name -> name of the data sample read from the file the model was trained on."""
    by_file = {_resolved(s.data_path): s.name for s in data_samples}
    return {s.name: by_file[_resolved(s.data_path)] for s in model_samples if _resolved(s.data_path) in by_file}


def _resolved(path: Path | None) -> Path | None:
    return Path(path).resolve() if path is not None else None


# --- figures ------------------------------------------------------------------------------------------

REFERENCE_COLOUR = "black"
HISTOGRAM_BINS = 30
LOTZ_MERGER_LINE = (-0.14, 0.33)
"""Gini = a M20 + b above which Lotz, Pritchard et al. (2008) call a galaxy a merger candidate."""
LOTZ_BULGE_LINE = (0.14, 0.80)
"""Gini = a M20 + b separating E/S0/Sa (above) from Sb-Irr (below), Lotz et al. (2008)."""


def sample_colours(names: list[str], reference: str) -> dict[str, str]:
    """Black for the reference sample, the figures module's palette for the others, in order."""
    from galaxyvae.figures import FAMILY_COLOURS

    others = [name for name in names if name != reference]
    colours = {name: FAMILY_COLOURS[i % len(FAMILY_COLOURS)] for i, name in enumerate(others)}
    colours[reference] = REFERENCE_COLOUR
    return colours


def plot_morphology(results: dict[str, MorphologyResult], reference: str):
    """The comparison figure: Gini-M20 and C-A planes, and one histogram per quantity.

    results: sample name -> MorphologyResult; the reference is drawn in black.
    Returns the matplotlib Figure.
    """
    from galaxyvae.figures import _pyplot

    plt = _pyplot()
    colours = sample_colours(list(results), reference)
    mosaic = [["gm", "gm", "ca", "ca"], ["gm", "gm", "ca", "ca"],
              ["concentration", "asymmetry", "smoothness", "gini"],
              ["m20", "rhalf_px", "peak_snr", "area_above_2sigma"]]
    fig, axes = plt.subplot_mosaic(mosaic, figsize=(15, 14.5), gridspec_kw={"hspace": 0.45, "wspace": 0.28})
    order = [reference] + [name for name in results if name != reference]
    for name in order:
        result = results[name]
        label = f"{name} (n = {len(result)}, failed {result.n_failed})"
        _scatter_planes(axes["gm"], axes["ca"], result, colours[name], label, reference_style=name == reference)
    _decorate_planes(axes["gm"], axes["ca"])
    axes["gm"].legend(loc="lower left", fontsize=8, framealpha=0.9, markerscale=1.5)
    for quantity in QUANTITIES[:-1]:
        _histograms(axes[quantity], {name: results[name].values[quantity] for name in order}, colours, quantity)
    fig.suptitle("Non-parametric morphology of the central galaxy (statmorph), per sample\n"
                 "(colours as in the legend; histograms are normalised to unit area; failed measurements are left "
                 "out and counted in the legend)", fontsize=12)
    return fig


def _scatter_planes(ax_gm, ax_ca, result: MorphologyResult, colour: str, label: str, reference_style: bool) -> None:
    style = dict(s=16 if reference_style else 9, alpha=0.85 if reference_style else 0.6, color=colour,
                 marker="o", linewidths=0, zorder=3 if reference_style else 2)
    ax_gm.scatter(result.values["m20"], result.values["gini"], label=label, **style)
    ax_ca.scatter(result.values["asymmetry"], result.values["concentration"], label=label, **style)


def _decorate_planes(ax_gm, ax_ca) -> None:
    m20 = np.array([-3.2, 0.0])
    ax_gm.plot(m20, LOTZ_MERGER_LINE[0] * m20 + LOTZ_MERGER_LINE[1], "--", color="grey", lw=1,
               label="Lotz+08 merger line")
    ax_gm.plot(m20, LOTZ_BULGE_LINE[0] * m20 + LOTZ_BULGE_LINE[1], ":", color="grey", lw=1,
               label="Lotz+08 E/S0/Sa | Sb-Irr")
    ax_gm.set_xlim(0.0, -3.2)  # M20 conventionally runs from right (diffuse) to left (concentrated)
    ax_gm.set_xlabel("M$_{20}$ (log of the brightest 20%'s second moment / total)")
    ax_gm.set_ylabel("Gini coefficient G")
    ax_gm.set_title("Gini–M$_{20}$ plane")
    ax_ca.set_xlabel("asymmetry A (180° rotation, background-corrected)")
    ax_ca.set_ylabel("concentration C = 5 log$_{10}$(r$_{80}$ / r$_{20}$)")
    ax_ca.set_title("Concentration–asymmetry plane")
    for ax in (ax_gm, ax_ca):
        ax.grid(alpha=0.3)


def _histograms(ax, values: dict[str, np.ndarray], colours: dict[str, str], quantity: str) -> None:
    pooled = np.concatenate([_finite(v) for v in values.values()])
    ax.set_title(f"{LABELS[quantity]}")
    if pooled.size == 0:
        ax.text(0.5, 0.5, "no measurement", ha="center", va="center", transform=ax.transAxes)
        return
    bins = _bins(pooled, quantity)
    for name, v in values.items():
        v = _finite(v)
        if v.size:
            ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, histtype="step", color=colours[name],
                    lw=1.8 if colours[name] == REFERENCE_COLOUR else 1.2)
    if quantity == "peak_snr" and bins[-1] / max(bins[0], 1e-12) > MAX_PIXEL_SNR_FOR_LOG:
        ax.set_xscale("log")
    ax.set_yticks([])
    ax.set_xlabel(LABELS[quantity] + (" (clipped to the 0.5–99.5% range)" if quantity != "peak_snr" else ""),
                  fontsize=8)


def _bins(pooled: np.ndarray, quantity: str) -> np.ndarray:
    low, high = np.percentile(pooled, [0.5, 99.5])
    if quantity == "peak_snr" and low > 0 and high / low > MAX_PIXEL_SNR_FOR_LOG:
        return np.geomspace(low, high, HISTOGRAM_BINS + 1)
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, HISTOGRAM_BINS + 1)


def plot_families(result: MorphologyResult, labels: np.ndarray, reference: MorphologyResult,
                  name: str, reference_name: str):
    """The labelled sample's families in the Gini-M20 and C-A planes over the reference (grey), and
    per statistic the families' medians and 16-84% ranges against the reference's range (band)."""
    from galaxyvae.figures import FAMILY_COLOURS, _pyplot

    plt = _pyplot()
    families = sorted(set(labels))
    mosaic = [["gm", "gm", "gm", "ca", "ca"], ["gm", "gm", "gm", "ca", "ca"], list(STATISTICS)]
    fig, axes = plt.subplot_mosaic(mosaic, figsize=(16, 12), gridspec_kw={"hspace": 0.5, "wspace": 0.3})
    _scatter_planes(axes["gm"], axes["ca"], reference, "0.6", f"{reference_name} (n = {len(reference)})", True)
    for i, family in enumerate(families):
        member = result.subset(labels == family)
        _scatter_planes(axes["gm"], axes["ca"], member, FAMILY_COLOURS[i % len(FAMILY_COLOURS)],
                        f"{family} (n = {len(member)})", False)
    _decorate_planes(axes["gm"], axes["ca"])
    axes["gm"].legend(loc="lower left", fontsize=8, framealpha=0.9, markerscale=2)
    for quantity in STATISTICS:
        _family_ranges(axes[quantity], result, labels, families, reference, quantity)
    fig.suptitle(f"Morphology of the families of {name} (colours) against {reference_name} (grey)\n"
                 f"bottom: each family's median and 16–84% range; grey band and line: {reference_name}'s 16–84% "
                 f"range and median", fontsize=12)
    return fig


def _family_ranges(ax, result: MorphologyResult, labels: np.ndarray, families: list[str],
                   reference: MorphologyResult, quantity: str) -> None:
    from galaxyvae.figures import FAMILY_COLOURS

    ref = _finite(reference.values[quantity])
    if ref.size:
        low, mid, high = np.percentile(ref, [16, 50, 84])
        ax.axhspan(low, high, color="0.85", zorder=0)
        ax.axhline(mid, color="0.5", lw=1, zorder=1)
    for i, family in enumerate(families):
        v = _finite(result.values[quantity][labels == family])
        if v.size:
            low, mid, high = np.percentile(v, [16, 50, 84])
            ax.errorbar([i], [mid], yerr=[[mid - low], [high - mid]], fmt="o", capsize=3,
                        color=FAMILY_COLOURS[i % len(FAMILY_COLOURS)])
    ax.set_xticks(range(len(families)))
    ax.set_xticklabels(families, rotation=60, ha="right", fontsize=8)
    ax.set_title(LABELS[quantity])
    ax.grid(axis="y", alpha=0.3)
