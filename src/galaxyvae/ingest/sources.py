"""Reading each kind of input into 69 x 69 stamps: Galaxy Zoo JPEGs, Galaxy10 HDF5 files,
FITS cutouts and cubes, PNG/JPEG pictures, and (with --detect) fields of many galaxies.

Every reader yields ``Stamp`` objects and, for single bad images inside a multi-image file,
``BadInput`` records; a problem with a whole file raises ``UnusableFile`` whose message is
the one-line reason.

Orientation: every image is stored with its first row at the *bottom* (the FITS
convention, which is how ``galaxyvae show`` draws it). FITS data are used as read; PNG and
JPEG pictures, whose first row is the top, are flipped vertically on reading. Crop boxes
and detected positions are given in these y-up array coordinates.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from galaxyvae import STAMP_SIZE
from galaxyvae.imaging import centre_box, is_blank, resample, square_box_on_light, to_single_channel
from galaxyvae.ingest.detect import DetectionConfig, detect_galaxies
from galaxyvae.ingest.labels import GalaxyZooLabels

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
SAMPLE_PREFIX = "skimage:"
"""``skimage:NAME`` reads scikit-image's sample image ``skimage.data.NAME()`` (offline), e.g.
``skimage:hubble_deep_field``, the Hubble eXtreme Deep Field picture used in the docs."""

GALAXY_ZOO_SIZE = 424
GALAXY_ZOO_CROP = 207
"""Galaxy Zoo preprocessing: the central 207 x 207 of a 424 x 424 JPEG, averaged over 3 x 3 blocks to 69 x 69."""

MIN_SOURCE_SIDE = 16
"""Smallest image side accepted, in pixels: enlarging fewer pixels to 69 would only show the interpolation."""

GALAXY10_SDSS_CLASSES = (
    "Disk, Face-on, No Spiral", "Smooth, Completely round", "Smooth, in-between round", "Smooth, Cigar shaped",
    "Disk, Edge-on, Rounded Bulge", "Disk, Edge-on, Boxy Bulge", "Disk, Edge-on, No Bulge",
    "Disk, Face-on, Tight Spiral", "Disk, Face-on, Medium Spiral", "Disk, Face-on, Loose Spiral",
)
GALAXY10_DECALS_CLASSES = (
    "Disturbed", "Merging", "Round Smooth", "In-between Round Smooth", "Cigar Shaped Smooth", "Barred Spiral",
    "Unbarred Tight Spiral", "Unbarred Loose Spiral", "Edge-on without Bulge", "Edge-on with Bulge",
)
GALAXY10_DECALS_EXTRAS = ("ra", "dec", "redshift", "pxscale")
GALAXY10_CHUNK = 256


class UnusableFile(Exception):
    """A whole input cannot be used; the message is the one-line reason (without the file name)."""


@dataclass
class Stamp:
    """One ingested galaxy: a (69, 69) float32 image, its kind, units and metadata columns."""

    image: np.ndarray
    kind: str
    pixel_units: str
    sky_subtracted: bool
    metadata: dict[str, Any]


@dataclass
class BadInput:
    """An input (a file, a folder, or ``file[index]`` inside a multi-image file) that was skipped, and why."""

    file: str
    reason: str


@dataclass
class FieldSummary:
    """What ``--detect`` made of one field: detections, stamps kept, rejections by reason."""

    file: str
    counts: dict[str, Any]


@dataclass
class IngestOptions:
    """How to read the inputs: colour rule, detection, labels."""

    band: int | str | None = None
    detect: bool = False
    progress: bool = False
    labels: GalaxyZooLabels | None = None
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    @property
    def colour_rule(self) -> str:
        """How colour images become one channel, in words."""
        if self.band is None:
            return "colour as luminance 0.2126 R + 0.7152 G + 0.0722 B"
        if isinstance(self.band, str):
            return f"colour as its {dict(r='red', g='green', b='blue')[self.band]} channel"
        return f"colour as channel {self.band}"


def input_kind(path: Path) -> str | None:
    """"picture", "fits", "hdf5" or "sample" from the name, or None if the type is not supported."""
    if str(path).startswith(SAMPLE_PREFIX):
        return "sample"
    name = path.name.lower()
    for kind, suffixes in (("picture", PICTURE_SUFFIXES), ("fits", FITS_SUFFIXES), ("hdf5", HDF5_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def read_input(path: Path, options: IngestOptions) -> Iterator[Stamp | BadInput | FieldSummary]:
    """All stamps of one input file (and, with --detect, a FieldSummary first);
    raises UnusableFile when the whole file is unusable."""
    kind = input_kind(path)
    if kind is None:
        raise UnusableFile("is not a supported file type (PNG, JPEG, FITS or Galaxy10 HDF5)")
    if kind == "hdf5":
        if options.detect:
            raise UnusableFile("is an HDF5 file; --detect works on single large images (FITS, PNG, JPEG)")
        yield from read_galaxy10(path, options)
        return
    if kind == "fits":
        image, units, scale = load_fits(path, options.band)
    else:
        pixels, units = load_sample(path) if kind == "sample" else load_picture(path)
        image, _ = single_channel(pixels, options.band)
        units = f"{units}, {options.colour_rule}, not calibrated"
        scale = math.nan
    check_size(image)
    if options.detect:  # detection masks non-finite pixels instead of refusing the field
        yield from detected_stamps(path, image, units, scale, options.detection)
        return
    check_values(image)
    if kind == "picture" and is_galaxy_zoo(path, image.shape):
        yield galaxy_zoo_stamp(path, image, units, options.labels)
    else:
        yield cutout_stamp(path, image, units, scale, "fits" if kind == "fits" else "picture")


# --- loading ---------------------------------------------------------------------------------

def load_picture(path: Path) -> tuple[np.ndarray, str]:
    """Pixels of a PNG/JPEG as (H, W) or (H, W, C), first row at the bottom, and their units."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            picture.load()
            picture = normalise_mode(picture)
            pixels = np.asarray(picture)
    except UnidentifiedImageError:
        raise UnusableFile("is empty or not a readable PNG/JPEG image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnusableFile(f"cannot be decoded ({err})") from None
    return pixels[::-1], display_units(pixels.dtype)


def normalise_mode(picture):
    """Pillow image in a mode numpy understands: L, RGB, RGBA, I;16, I or F."""
    if picture.mode in ("L", "RGB", "RGBA", "I;16", "I", "F"):
        return picture
    if picture.mode in ("1", "LA", "I;16B", "I;16L"):
        return picture.convert("I" if picture.mode.startswith("I;16") else "L")
    return picture.convert("RGBA" if "A" in picture.getbands() else "RGB")


def display_units(dtype: np.dtype) -> str:
    """Units of stored picture values: their bit depth and range."""
    if dtype == np.uint8:
        return "8-bit display level (0-255)"
    if dtype in (np.uint16, np.int32):
        return "16-bit display level (0-65535)"
    return f"{np.dtype(dtype).name} display level"


def load_sample(name: Path) -> tuple[np.ndarray, str]:
    """A scikit-image sample image (``skimage:NAME``), first row at the bottom, and its units."""
    from skimage import data

    attribute = str(name)[len(SAMPLE_PREFIX):]
    loader = getattr(data, attribute, None)
    if attribute.startswith("_") or not callable(loader):
        raise UnusableFile(f"names no scikit-image sample image (skimage.data.{attribute} does not exist)")
    try:
        pixels = np.asarray(loader())
    except Exception as err:  # a sample that must be downloaded fails offline in many ways
        raise UnusableFile(f"could not be loaded ({err})") from None
    return pixels[::-1], display_units(pixels.dtype)


def load_fits(path: Path, band: int | str | None) -> tuple[np.ndarray, str, float]:
    """The 2-D image (or cube plane ``band``) of the first image HDU, its units (BUNIT) and
    pixel scale in arcsec (from the WCS, NaN if none)."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, memmap=False) as hdus:
                hdu = next((h for h in hdus if h.is_image and h.data is not None and h.data.ndim >= 1), None)
                if hdu is None:
                    raise UnusableFile("holds no image data (no image HDU with pixels)")
                data, header = np.asarray(hdu.data), hdu.header.copy()
        if any("truncated" in str(w.message).lower() for w in caught):
            raise UnusableFile("is truncated (astropy: file may have been truncated)")
    except UnusableFile:
        raise
    except (OSError, ValueError, TypeError, IndexError, EOFError) as err:
        raise UnusableFile(f"is truncated or not a readable FITS file ({err})") from None
    image = fits_plane(data, band)
    unit = str(header.get("BUNIT", "")).strip()
    units = f"{unit} (FITS BUNIT)" if unit else "unknown (FITS file without BUNIT)"
    return image.astype(np.float64), units, fits_pixel_scale(header)


def fits_plane(data: np.ndarray, band: int | str | None) -> np.ndarray:
    """A 2-D image, or plane ``band`` of a 3-D cube (planes along the first FITS axis in numpy order)."""
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        return data
    if data.ndim != 3:
        raise UnusableFile(f"holds a {data.ndim}-D array of shape {data.shape}; expected a 2-D image or a 3-D cube")
    planes = data.shape[0]
    if not isinstance(band, int):
        hint = f"--band {band} names a colour channel" if band is not None else "no --band given"
        raise UnusableFile(f"is a cube of {planes} planes and {hint}; choose a plane with --band 0..{planes - 1}")
    if band >= planes:
        raise UnusableFile(f"is a cube of {planes} planes; --band {band} is out of range 0..{planes - 1}")
    return data[band]


def fits_pixel_scale(header) -> float:
    """Mean pixel scale in arcsec from the header's celestial WCS, NaN if there is none."""
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header).celestial
            if wcs.naxis != 2 or not wcs.has_celestial:
                return math.nan
            return float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
    except Exception:  # a malformed WCS only costs the scale, never the image
        return math.nan


def single_channel(pixels: np.ndarray, band) -> tuple[np.ndarray, str]:
    """``imaging.to_single_channel`` with shape problems as UnusableFile."""
    try:
        return to_single_channel(pixels, band)
    except ValueError as err:
        raise UnusableFile(str(err)) from None


def check_size(image: np.ndarray) -> None:
    """Raise UnusableFile for images smaller than MIN_SOURCE_SIDE on a side."""
    if image.ndim != 2 or min(image.shape) < MIN_SOURCE_SIDE:
        raise UnusableFile(f"is only {'x'.join(map(str, image.shape))} pixels; need at least "
                           f"{MIN_SOURCE_SIDE} on each side")


def check_values(image: np.ndarray) -> None:
    """Raise UnusableFile for images with NaN/Inf pixels or all pixels equal."""
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise UnusableFile(f"has {bad} non-finite (NaN or Inf) pixel{'s' if bad > 1 else ''}")
    if is_blank(image):
        raise UnusableFile(f"is blank (every pixel equals {image.flat[0]:g})")


# --- one stamp per file ----------------------------------------------------------------------

def is_galaxy_zoo(path: Path, shape: tuple[int, int]) -> bool:
    """A Kaggle Galaxy Zoo image: a 424 x 424 JPEG named ``<GalaxyID>.jpg``."""
    return path.stem.isdigit() and path.suffix.lower() in (".jpg", ".jpeg") and shape == (GALAXY_ZOO_SIZE,) * 2


def galaxy_zoo_stamp(path: Path, image: np.ndarray, units: str, labels: GalaxyZooLabels | None) -> Stamp:
    """Centre crop 207 x 207, 3 x 3 block average to 69 x 69, vote fractions joined by GalaxyID."""
    box = centre_box(image.shape, GALAXY_ZOO_CROP)
    metadata = common_metadata(path, path.stem, image.shape, box, math.nan)
    if labels is not None:
        votes = labels.votes(path.stem)
        metadata["has_labels"] = votes is not None
        metadata.update(zip(labels.columns, votes if votes is not None else [math.nan] * len(labels.columns)))
        metadata["family"] = labels.family(votes) if votes is not None else ""
    return make_stamp(image, box, "galaxy-zoo", units, False, metadata)


def cutout_stamp(path: Path, image: np.ndarray, units: str, pixel_scale: float, kind: str) -> Stamp:
    """A cutout of one galaxy: the largest square kept centred on the light, resampled to 69 x 69."""
    box = square_box_on_light(image)
    return make_stamp(image, box, kind, units, False, common_metadata(path, path.stem, image.shape, box, pixel_scale))


def common_metadata(path: Path, object_id: str, shape, box, source_pixel_scale: float) -> dict[str, Any]:
    """The metadata columns every stamp has (scale-dependent ones are completed by ``make_stamp``)."""
    return {
        "source_file": str(path), "object_id": str(object_id), "family": "",
        "original_shape": np.array(shape[:2], dtype=np.int64),
        "crop_box": np.array(box, dtype=np.int64), "crop_box_exact": np.array(box, dtype=np.float64),
        "source_pixel_scale_arcsec": float(source_pixel_scale),
    }


def make_stamp(image: np.ndarray, box, kind: str, units: str, sky_subtracted: bool,
               metadata: dict[str, Any]) -> Stamp:
    """Resample ``box`` of ``image`` to 69 x 69 and record scale, upsampling and pixel scale."""
    stamp, scale, upsampled = resample(image, box, STAMP_SIZE)
    metadata.update(scale_factor=float(scale), upsampled=bool(upsampled),
                    pixel_scale_arcsec=metadata.pop("source_pixel_scale_arcsec") * scale, source_kind=kind)
    return Stamp(stamp.astype(np.float32), kind, units, sky_subtracted, metadata)


# --- many stamps per file --------------------------------------------------------------------

def detected_stamps(path: Path, image: np.ndarray, units: str, pixel_scale: float,
                    config: DetectionConfig) -> Iterator[Stamp | FieldSummary]:
    """Stamps of the resolved galaxies detected in a field (see ingest.detect)."""
    try:
        result = detect_galaxies(image, config)
    except ValueError as err:
        raise UnusableFile(str(err)) from None
    except Exception as err:  # sep reports its failures as bare Exceptions
        raise UnusableFile(f"source detection failed ({err})") from None
    if not result.stamps:
        raise UnusableFile(f"has no resolved extended sources to keep ({result.n_detections} detections: "
                           + ", ".join(f"{k} {v}" for k, v in result.rejected.items() if v) + ")")
    yield FieldSummary(str(path), result.counts())
    units = f"{units}, minus the sep background"
    for detected in result.stamps:
        x, y = detected.metadata["detect_x"], detected.metadata["detect_y"]
        metadata = {"source_file": str(path), "object_id": f"x{x:.0f}_y{y:.0f}", "family": "",
                    "original_shape": np.array(image.shape, dtype=np.int64), **detected.metadata,
                    "pixel_scale_arcsec": pixel_scale * detected.metadata["scale_factor"], "source_kind": "detected"}
        yield Stamp(detected.image, "detected", units, True, metadata)


def read_galaxy10(path: Path, options: IngestOptions) -> Iterator[Stamp | BadInput]:
    """Stamps of an astroNN Galaxy10 SDSS (N, 69, 69, 3) or DECaLS (N, 256, 256, 3) file."""
    import h5py
    from tqdm.auto import tqdm

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise UnusableFile(f"is not a readable HDF5 file ({err})") from None
    with handle:
        images, labels, extras, kind = galaxy10_contents(handle)
        units = f"{display_units(images.dtype)}, {options.colour_rule}, not calibrated"
        with tqdm(total=len(images), desc=path.name, unit="image", leave=False, disable=not options.progress) as bar:
            for start in range(0, len(images), GALAXY10_CHUNK):
                try:
                    chunk = images[start:start + GALAXY10_CHUNK]
                except OSError as err:
                    yield BadInput(str(path), f"reading images {start} onwards failed ({err})")
                    return
                for offset, pixels in enumerate(chunk):
                    try:
                        yield galaxy10_stamp(path, start + offset, pixels, labels[start + offset], extras, kind,
                                             units, options.band)
                    except UnusableFile as err:
                        yield BadInput(f"{path}[{start + offset}]", str(err))
                bar.update(len(chunk))


def galaxy10_contents(handle) -> tuple[Any, np.ndarray, dict[str, np.ndarray], str]:
    """(images dataset, labels, extra columns, kind) of an open Galaxy10 file, checked."""
    if handle.attrs.get("format") == "galaxyvae-dataset":
        raise UnusableFile("is already a galaxyvae data set; use it directly")
    keys = sorted(handle.keys())
    if "images" not in handle or "ans" not in handle:
        raise UnusableFile(f"has keys {keys}; a Galaxy10 file needs 'images' and 'ans'")
    images = handle["images"]
    shape = images.shape
    if len(shape) == 4 and shape[1:] == (69, 69, 3):
        kind = "galaxy10-sdss"
    elif len(shape) == 4 and shape[1:] == (256, 256, 3):
        kind = "galaxy10-decals"
    else:
        raise UnusableFile(f"'images' has shape {shape}; expected Galaxy10 SDSS (N, 69, 69, 3) "
                           "or Galaxy10 DECaLS (N, 256, 256, 3)")
    if shape[0] == 0:
        raise UnusableFile("holds no images")
    labels = np.asarray(handle["ans"][()]).reshape(-1)
    if len(labels) != shape[0]:
        raise UnusableFile(f"'ans' has {len(labels)} labels for {shape[0]} images")
    extras = {}
    if kind == "galaxy10-decals":
        for key in GALAXY10_DECALS_EXTRAS:
            values = np.asarray(handle[key][()], dtype=np.float64).reshape(-1) if key in handle else None
            extras[key] = values if values is not None and len(values) == shape[0] else np.full(shape[0], np.nan)
    return images, labels, extras, kind


def galaxy10_stamp(path: Path, index: int, pixels: np.ndarray, label, extras: dict[str, np.ndarray], kind: str,
                   units: str, band) -> Stamp:
    """One Galaxy10 image: SDSS kept at 69 x 69; DECaLS cropped like Galaxy Zoo (the central
    207/424 of the field, 125 of 256 pixels) and area-averaged to 69 x 69."""
    image, _ = single_channel(np.asarray(pixels)[::-1], band)
    check_size(image)
    check_values(image)
    if kind == "galaxy10-sdss":
        box, classes, source_scale = (0, 0, 69, 69), GALAXY10_SDSS_CLASSES, math.nan
    else:
        side = round(image.shape[0] * GALAXY_ZOO_CROP / GALAXY_ZOO_SIZE)
        box, classes, source_scale = centre_box(image.shape, side), GALAXY10_DECALS_CLASSES, extras["pxscale"][index]
    metadata = common_metadata(path, str(index), image.shape, box, source_scale)
    label = int(label)
    metadata.update(label=label, family=classes[label] if 0 <= label < len(classes) else f"class {label}")
    metadata.update({key: float(values[index]) for key, values in extras.items()})
    return make_stamp(image, box, kind, units, False, metadata)
