"""Galaxies in a large image: sep background subtraction, detection, selection, one stamp per galaxy.

Steps (the numbers are ``DetectionConfig`` fields):

1. Background: a smooth sky map on ``background_box``-pixel meshes (median-filtered over
   3 x 3 meshes) is subtracted, so stamps are sky-subtracted. Non-finite pixels are masked.
2. Detection: pixels ``threshold_sigma`` times the global background r.m.s. above the sky,
   after sep's default 3 x 3 smoothing, in connected groups of ``min_area`` pixels or more,
   deblended with ``deblend_nthresh`` levels and a minimum contrast ``deblend_cont``.
3. Measurement (neighbours' pixels masked with the segmentation map): Kron flux in an
   elliptical aperture of 2.5 Kron radii; half-light radius r_half = radius of the circle
   holding half that flux; ellipticity 1 - b/a from the second moments.
4. Selection, every rejection counted by reason:
   ``truncated``   the detection touches the image edge or masked pixels;
   ``unmeasured``  r_half or the Kron flux could not be measured;
   ``faint``       isophotal signal-to-noise below ``min_snr``: mostly noise at 69 x 69;
   ``tiny``        r_half < ``min_half_light_radius`` px: too few pixels to show structure;
   ``point-like``  r_half < ``point_source_factor`` x the PSF's r_half (stars and other
                   unresolved sources);
   ``edge``        the stamp would reach beyond the image or onto masked pixels;
   ``crowded``     other detections put more light into the stamp than ``max_neighbour_light``
                   times the galaxy's own flux: the stamp's galaxy must be the prominent one
                   (this also drops fragments of shredded large galaxies).
5. Stamp: a square of side ``stamp_size_factor`` x r_half (at least ``min_stamp_side`` px)
   centred exactly on the detection's centroid, resampled to 69 x 69 (imaging.resample).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from galaxyvae import STAMP_SIZE
from galaxyvae.imaging import Box, box_around, box_inside, enclosing_integer_box, resample

REJECTION_REASONS = ("truncated", "unmeasured", "faint", "tiny", "point-like", "edge", "crowded")


@dataclass
class DetectionConfig:
    """Settings of ``--detect``; the defaults were tuned on the Hubble Deep Field image (docs/ingest.md)."""

    background_box: int = 64
    """Side of the background meshes in pixels; larger than the galaxies, smaller than sky gradients."""
    threshold_sigma: float = 3.0
    """Detection threshold in units of the global background r.m.s."""
    min_area: int = 20
    """Fewest connected pixels above the threshold for a detection."""
    deblend_nthresh: int = 32
    """Number of deblending levels."""
    deblend_cont: float = 0.005
    """Minimum flux fraction for a branch to become a separate object (SExtractor's DEBLEND_MINCONT)."""
    min_snr: float = 100.0
    """Smallest isophotal signal-to-noise kept: fainter galaxies are mostly noise at 69 x 69."""
    min_half_light_radius: float = 3.0
    """Smallest half-light radius kept, in source pixels."""
    psf_fwhm: float | None = None
    """PSF full width at half maximum in source pixels; None estimates it from the image (see
    ``estimate_psf_half_light_radius``)."""
    point_source_factor: float = 1.5
    """Sources with r_half below this multiple of the PSF's r_half count as point-like."""
    stamp_size_factor: float = 10.0
    """Stamp side in units of r_half: 10 puts the stamp edge at 5 r_half, where a disc galaxy
    (r_90 ~ 2.3 r_half) has faded into the sky, much as in the Galaxy Zoo 207-pixel crops."""
    min_stamp_side: float = 24.0
    """Smallest stamp side in source pixels."""
    max_neighbour_light: float = 1.0
    """Largest flux of other detections inside the stamp, as a fraction of the galaxy's own flux."""


@dataclass
class MeasuredField:
    """A sky-subtracted field with its detections: what the selection rules look at."""

    image: np.ndarray
    segmap: np.ndarray
    mask: np.ndarray
    measured: dict[str, np.ndarray]
    psf_r_half: float


@dataclass
class DetectedStamp:
    """One galaxy cut from a field: the 69 x 69 stamp and what was measured."""

    image: np.ndarray
    metadata: dict[str, Any]


@dataclass
class FieldResult:
    """What detection made of one field: stamps kept and how many detections each rule rejected."""

    stamps: list[DetectedStamp]
    n_detections: int
    rejected: dict[str, int] = field(default_factory=dict)
    background_rms: float = float("nan")
    psf_half_light_radius: float = float("nan")

    def counts(self) -> dict[str, Any]:
        """Detection counts as a JSON-ready dict."""
        return {"detections": self.n_detections, "kept": len(self.stamps), "rejected": dict(self.rejected),
                "background_rms": self.background_rms, "psf_half_light_radius_px": self.psf_half_light_radius}


def detect_galaxies(field_image: np.ndarray, config: DetectionConfig | None = None) -> FieldResult:
    """Detect resolved galaxies in ``field_image`` (H, W) and cut a 69 x 69 stamp around each.

    Non-finite pixels are masked. Stamps are in the field's units minus the sep background.
    Raises ValueError if the field has no finite pixels or is blank.
    """
    import sep

    config = config or DetectionConfig()
    data = np.ascontiguousarray(field_image, dtype=np.float64)
    mask = ~np.isfinite(data)
    if mask.all():
        raise ValueError("holds no finite pixels")
    data = np.where(mask, 0.0, data)
    if np.ptp(data[~mask]) == 0:
        raise ValueError("is blank (every pixel has the same value)")

    background = sep.Background(data, mask=mask, bw=config.background_box, bh=config.background_box, fw=3, fh=3)
    sky_subtracted = data - background.back()
    rms = float(background.globalrms)
    sep.set_extract_pixstack(max(300_000, data.size))
    sep.set_sub_object_limit(4096)
    objects, segmap = sep.extract(sky_subtracted, config.threshold_sigma, err=rms, mask=mask,
                                  minarea=config.min_area, deblend_nthresh=config.deblend_nthresh,
                                  deblend_cont=config.deblend_cont, segmentation_map=True)
    result = FieldResult(stamps=[], n_detections=len(objects), rejected=dict.fromkeys(REJECTION_REASONS, 0),
                         background_rms=rms)
    if len(objects) == 0:
        return result
    measured = measure(sky_subtracted, objects, segmap, mask, rms)
    psf_r_half = (config.psf_fwhm / 2 if config.psf_fwhm else estimate_psf_half_light_radius(measured))
    result.psf_half_light_radius = float(psf_r_half)
    measured_field = MeasuredField(sky_subtracted, segmap, mask, measured, psf_r_half)
    for index in range(len(objects)):
        reason, box = select(index, measured_field, config)
        if reason:
            result.rejected[reason] += 1
            continue
        stamp, scale, upsampled = resample(sky_subtracted, box, STAMP_SIZE)
        result.stamps.append(DetectedStamp(stamp.astype(np.float32),
                                           stamp_metadata(index, measured, box, scale, upsampled, config)))
    return result


def measure(image: np.ndarray, objects: np.ndarray, segmap: np.ndarray, mask: np.ndarray,
            background_rms: float) -> dict[str, np.ndarray]:
    """Kron flux, half-light radius and shape of each sep detection, neighbours masked.

    Returns columns (one row per detection): x, y (sep's pixel coordinates, 0 at the first
    pixel's centre), flux (Kron), r_half (px), a, b, theta, ellipticity, npix, snr, flag,
    peak, truncated (bool). ``snr`` is the isophotal flux over its background noise.
    """
    import sep

    x, y = objects["x"], objects["y"]
    a, b, theta = objects["a"], objects["b"], objects["theta"]
    seg_id = np.arange(1, len(objects) + 1, dtype=np.int32)
    segmap = segmap.astype(np.int32)
    kron, _ = sep.kron_radius(image, x, y, a, b, theta, 6.0, seg_id=seg_id, segmap=segmap)
    kron = np.where(np.isfinite(kron) & (kron > 0), kron, 1.0)
    flux, flux_err, aper_flag = sep.sum_ellipse(image, x, y, a, b, theta, 2.5 * np.maximum(kron, 1.0), subpix=1,
                                                err=None, seg_id=seg_id, segmap=segmap, mask=mask)
    r_half, _ = sep.flux_radius(image, x, y, 2.5 * kron * a, 0.5,
                                normflux=np.where(flux > 0, flux, np.nan), seg_id=seg_id, segmap=segmap,
                                mask=mask, subpix=5)
    return {
        "x": x, "y": y, "flux": flux, "r_half": r_half, "a": a, "b": b, "theta": theta,
        "ellipticity": 1.0 - b / np.maximum(a, 1e-12), "npix": objects["npix"],
        "snr": objects["flux"] / (background_rms * np.sqrt(np.maximum(objects["npix"], 1))),
        "flag": objects["flag"] | aper_flag, "peak": objects["peak"],
        "truncated": (objects["flag"] & sep.OBJ_TRUNC) != 0,
    }


def estimate_psf_half_light_radius(measured: dict[str, np.ndarray]) -> float:
    """The PSF's half-light radius, estimated as the 5th percentile of r_half among confident
    detections (signal-to-noise over 20): the most compact well-measured sources are
    unresolved. Falls back to 1 px when there are fewer than 10 such detections."""
    good = np.isfinite(measured["r_half"]) & (measured["snr"] > 20) & (measured["r_half"] > 0)
    if good.sum() < 10:
        return 1.0
    return float(np.percentile(measured["r_half"][good], 5))


def select(index: int, field: "MeasuredField", config: DetectionConfig) -> tuple[str | None, Box | None]:
    """Apply the selection rules to detection ``index``; return (rejection reason or None, stamp box)."""
    measured = field.measured
    if measured["truncated"][index]:
        return "truncated", None
    r_half, flux = measured["r_half"][index], measured["flux"][index]
    if not (np.isfinite(r_half) and r_half > 0 and np.isfinite(flux) and flux > 0):
        return "unmeasured", None
    if measured["snr"][index] < config.min_snr:
        return "faint", None
    if r_half < config.min_half_light_radius:
        return "tiny", None
    if r_half < config.point_source_factor * field.psf_r_half:
        return "point-like", None
    side = max(config.stamp_size_factor * r_half, config.min_stamp_side)
    box = box_around(measured["x"][index] + 0.5, measured["y"][index] + 0.5, side)
    if not box_inside(box, field.mask.shape):
        return "edge", None
    y0, x0, y1, x1 = enclosing_integer_box(box)
    if field.mask[y0:y1, x0:x1].any():
        return "edge", None
    if neighbour_light_fraction(index, field, box) > config.max_neighbour_light:
        return "crowded", None
    return None, box


def neighbour_light_fraction(index: int, field: "MeasuredField", box: Box) -> float:
    """Flux in other detections' pixels inside ``box``, as a fraction of detection ``index``'s flux."""
    y0, x0, y1, x1 = enclosing_integer_box(box)
    labels = field.segmap[y0:y1, x0:x1]
    others = (labels != 0) & (labels != index + 1)
    light = np.clip(field.image[y0:y1, x0:x1][others], 0, None).sum()
    return float(light / field.measured["flux"][index])


def stamp_metadata(index: int, measured: dict[str, np.ndarray], box, scale: float, upsampled: bool,
                   config: DetectionConfig) -> dict[str, Any]:
    """The metadata columns of one detected stamp (positions in the field's array coordinates)."""
    return {
        "crop_box": np.array(enclosing_integer_box(box), dtype=np.int64),
        "crop_box_exact": np.array(box, dtype=np.float64),
        "scale_factor": float(scale),
        "upsampled": bool(upsampled),
        "detect_x": float(measured["x"][index]),
        "detect_y": float(measured["y"][index]),
        "detect_flux": float(measured["flux"][index]),
        "half_light_radius_px": float(measured["r_half"][index]),
        "ellipticity": float(measured["ellipticity"][index]),
        "position_angle_rad": float(measured["theta"][index]),
        "detect_npix": int(measured["npix"][index]),
        "detect_snr": float(measured["snr"][index]),
    }


def config_record(config: DetectionConfig) -> dict[str, Any]:
    """The detection settings as a JSON-ready dict."""
    return asdict(config)
