"""``ingest``: real images on disk -> one validated galaxyvae data set, with a report of what was skipped."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from galaxyvae._io import check_writable
from galaxyvae.dataset import choose_held_out, default_held_out, write_dataset
from galaxyvae.errors import InputError
from galaxyvae.imaging import parse_band
from galaxyvae.ingest.detect import DetectionConfig, config_record
from galaxyvae.ingest.labels import read_galaxy_zoo_labels
from galaxyvae.ingest.sources import (
    SAMPLE_PREFIX, BadInput, FieldSummary, IngestOptions, Stamp, UnusableFile, input_kind, read_input,
)
from galaxyvae.provenance import library_versions

log = logging.getLogger("galaxyvae.ingest")


SKIPS_RECORDED = 1000
"""Most skipped inputs listed in the provenance record (all are counted)."""

RESAMPLING_RULE = ("shrink: area averaging (exact block mean for integer factors, area-overlap weights "
                   "otherwise); enlarge: linear interpolation between pixel centres (flagged upsampled)")



@dataclass
class IngestReport:
    """The outcome of ``ingest``.

    out:       the data set written
    kept:      images written
    skipped:   (input, reason) for every input skipped (files, folders, or ``file[index]``)
    kinds:     images kept per source kind (galaxy-zoo, galaxy10-sdss, galaxy10-decals, fits, picture, detected)
    n_held_out, n_train: the split written
    detections: per field, with --detect: detections, kept and rejected by reason
    ignored:   files of other types found in folders and not read
    unlabelled: Galaxy Zoo images without a row in the labels file
    """

    out: Path
    kept: int
    skipped: list[tuple[str, str]]
    kinds: dict[str, int]
    n_held_out: int
    n_train: int
    detections: dict[str, dict] = field(default_factory=dict)
    ignored: int = 0
    unlabelled: int = 0

    def summary(self) -> str:
        """A few lines for people: kept and skipped counts, the split, and each skip's reason."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()))
        lines = [f"ingested {self.kept} images ({kinds}) into {self.out}: "
                 f"{self.n_train} train, {self.n_held_out} held out"]
        for name, counts in self.detections.items():
            rejected = ", ".join(f"{k} {v}" for k, v in counts["rejected"].items() if v)
            lines.append(f"detected {counts['detections']} sources in {name}: kept {counts['kept']} "
                         f"galaxies (rejected: {rejected or 'none'})")
        if self.unlabelled:
            lines.append(f"{self.unlabelled} Galaxy Zoo images have no row in the labels file (vote fractions NaN)")
        if self.ignored:
            lines.append(f"ignored {self.ignored} files of other types found in folders")
        lines.append(f"skipped {len(self.skipped)} inputs" + (":" if self.skipped else ""))
        lines.extend(f"  {name}: {reason}" for name, reason in self.skipped[:50])
        if len(self.skipped) > 50:
            lines.append(f"  ... and {len(self.skipped) - 50} more (all listed in the data set's provenance)")
        return "\n".join(lines)


@dataclass
class Collection:
    """Stamps gathered so far, skips, per-field detection counts; ``strict`` makes a skip fatal."""

    strict: bool
    stamps: list[Stamp] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    detections: dict[str, dict] = field(default_factory=dict)
    ignored: int = 0

    def skip(self, bad: BadInput) -> None:
        """Record a bad input, logging it now; raise InputError instead in strict mode."""
        if self.strict:
            raise InputError(f"{bad.file}: {bad.reason} (stopped by --strict)")
        log.warning("skipped %s: %s", bad.file, bad.reason)
        self.skipped.append((bad.file, bad.reason))

    def add(self, item: Stamp | BadInput | FieldSummary) -> None:
        """Take one item a reader produced."""
        if isinstance(item, BadInput):
            self.skip(item)
        elif isinstance(item, FieldSummary):
            self.detections[item.file] = item.counts
        else:
            self.stamps.append(item)


def ingest(
    paths: Iterable[str | Path] | str | Path,
    out: str | Path,
    n_held_out: int | None = None,
    seed: int = 0,
    band: int | str | None = None,
    detect: bool = False,
    labels_csv: str | Path | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    detection: DetectionConfig | None = None,
) -> IngestReport:
    """Read galaxy images from ``paths`` and write them as one data set to ``out`` (docs/ingest.md).

    paths:      files and folders (searched recursively): Galaxy Zoo JPEG folders, Galaxy10
                SDSS/DECaLS .h5, FITS images or cubes, PNG/JPEG pictures, or ``skimage:NAME``
                for a scikit-image sample image (e.g. ``skimage:hubble_deep_field``)
    out:        the .h5 data set to write: (N, 69, 69) float32 stamps and metadata
    n_held_out: held-out images; None -> 1,000, or a fifth when fewer than 5,000 are kept
    seed:       seed of the held-out choice
    band:       colour rule: None (luminance), "r"/"g"/"b", or a FITS cube plane / channel index
    detect:     treat each image as a field of many galaxies and cut a stamp per resolved galaxy
    labels_csv: Galaxy Zoo ``training_solutions_rev1.csv`` to join by GalaxyID
    strict:     stop at the first bad input (InputError naming it) instead of skipping it
    overwrite:  replace an existing ``out``
    detection:  settings of ``detect`` (DetectionConfig defaults if None)

    Bad inputs are skipped with a logged one-line reason and listed in the report. Raises
    InputError, writing nothing, if an option is invalid, no usable image remains, or the
    images kept have different pixel units; OutputExistsError if ``out`` exists (checked
    before any work) and ``overwrite`` is false.
    """
    out = writable_output(out, overwrite)
    if n_held_out is not None and n_held_out < 0:
        raise InputError(f"--held-out {n_held_out}: must be 0 or more")
    try:
        parsed_band = parse_band(band)
    except ValueError as err:
        raise InputError(str(err)) from None
    options = IngestOptions(band=parsed_band, detect=detect, progress=progress,
                            labels=read_galaxy_zoo_labels(labels_csv) if labels_csv is not None else None,
                            detection=detection or DetectionConfig())
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    inputs = list(expand_inputs(paths, out))
    collection = collect(inputs, options, strict, progress)
    if not collection.stamps:
        raise InputError(f"no usable images in the inputs ({len(collection.skipped)} skipped); nothing written")
    images, metadata, attrs = assemble(collection.stamps, options)
    n_kept = len(images)
    held_count = default_held_out(n_kept) if n_held_out is None else n_held_out
    if held_count >= n_kept:
        raise InputError(f"--held-out {held_count}: only {n_kept} images were kept; nothing written")
    held_out = choose_held_out(n_kept, held_count, seed)
    kinds = dict(Counter(stamp.kind for stamp in collection.stamps))
    provenance = provenance_record(paths, inputs, options, collection, kinds, held_count, seed, strict, labels_csv)
    write_dataset(out, images, held_out, {**attrs, "seed": seed}, metadata, provenance, overwrite=overwrite)
    report = IngestReport(out=out, kept=n_kept, skipped=collection.skipped, kinds=kinds, n_held_out=held_count,
                          n_train=n_kept - held_count, detections=collection.detections,
                          ignored=collection.ignored, unlabelled=count_unlabelled(metadata))
    log.info("wrote %s", out)
    return report


def writable_output(out: str | Path, overwrite: bool) -> Path:
    """``check_writable`` with a missing folder reported as an InputError."""
    try:
        return check_writable(out, overwrite)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None


@dataclass
class IgnoredFiles:
    """How many files of unsupported types a folder held."""

    count: int


def expand_inputs(paths: list, out: Path) -> Iterator[Path | BadInput | IgnoredFiles]:
    """Each input file once, in order: folders searched recursively (hidden entries skipped),
    paths that do not exist or folders without images as BadInput; ``out`` itself never."""
    seen = {out.resolve()}
    for path in map(Path, paths):
        if str(path).startswith(SAMPLE_PREFIX):
            yield path
        elif path.is_dir():
            yield from folder_inputs(path, seen)
        elif not path.exists():
            yield BadInput(str(path), "no such file or folder")
        elif path.resolve() not in seen:
            seen.add(path.resolve())
            yield path


def folder_inputs(folder: Path, seen: set[Path]) -> Iterator[Path | BadInput | IgnoredFiles]:
    """Supported files under ``folder`` (sorted, recursive); files of other types are counted as ignored."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    supported = [p for p in files if input_kind(p) is not None and p.resolve() not in seen]
    if not supported:
        yield BadInput(str(folder), "folder holds no PNG, JPEG, FITS or HDF5 files")
        return
    for path in supported:
        seen.add(path.resolve())
        yield path
    if len(files) > len(supported):
        yield IgnoredFiles(len(files) - len(supported))


def collect(inputs: list, options: IngestOptions, strict: bool, progress: bool) -> Collection:
    """Read every input into a Collection, skipping (or, if strict, stopping at) bad ones."""
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    collection = Collection(strict=strict)
    # Resampling multiplies small matrices, which multi-threaded BLAS slows down ten-fold on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"), logging_redirect_tqdm(), \
            tqdm(inputs, desc="ingest", unit="file", disable=not progress) as bar:
        for item in bar:
            if isinstance(item, IgnoredFiles):
                collection.ignored += item.count
            elif isinstance(item, BadInput):
                collection.skip(item)
            else:
                read_one(item, options, collection)
            bar.set_postfix(kept=len(collection.stamps), skipped=len(collection.skipped), refresh=False)
    return collection


def read_one(path: Path, options: IngestOptions, collection: Collection) -> None:
    """Add the stamps of one file to ``collection``, or skip the file with its reason."""
    try:
        for item in read_input(path, options):
            collection.add(item)
    except UnusableFile as err:
        collection.skip(BadInput(str(path), str(err)))
    except OSError as err:  # the disk or file system failed under a reader
        collection.skip(BadInput(str(path), f"could not be read ({err})"))


# --- assembling the data set -----------------------------------------------------------------

def assemble(stamps: list[Stamp], options: IngestOptions) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(images (N, 69, 69) float32, metadata columns, data-set attributes) from the stamps.

    Raises InputError if the stamps' pixel units differ (mixing, e.g., JPEG display levels
    with calibrated FITS fluxes would make one model of them meaningless).
    """
    units = Counter(stamp.pixel_units for stamp in stamps)
    if len(units) > 1:
        examples = {stamp.pixel_units: stamp.metadata["source_file"] for stamp in stamps}
        listing = "; ".join(f"{u!r} (e.g. {f})" for u, f in examples.items())
        raise InputError(f"the inputs have different pixel units: {listing}; ingest them into separate data sets")
    images = np.stack([stamp.image for stamp in stamps]).astype(np.float32)
    metadata = metadata_columns([stamp.metadata for stamp in stamps])
    scale, scale_note = common_pixel_scale(metadata["pixel_scale_arcsec"])
    attrs = {
        "source": "+".join(sorted({stamp.kind for stamp in stamps})),
        "pixel_units": next(iter(units)),
        "pixel_scale_arcsec": scale,
        "pixel_scale_note": scale_note,
        "sky_subtracted": all(stamp.sky_subtracted for stamp in stamps),
        "colour_rule": options.colour_rule,
        "resampling": RESAMPLING_RULE,
        "orientation": "first row at the bottom (FITS convention); PNG/JPEG pictures flipped on reading",
    }
    return images, metadata, attrs


def metadata_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-image dicts -> columns; a column missing from some rows is filled with NaN (floats),
    -1 (integers), False (flags) or "" (strings)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        example = next(row[name] for row in rows if name in row and row[name] is not None)
        fill = missing_value(example)
        values = [fill if row.get(name) is None else row[name] for row in rows]
        columns[name] = np.array(values, dtype=object if isinstance(example, str) else None)
    return columns


def missing_value(example):
    """The filler for a row that lacks a column whose values look like ``example``."""
    if isinstance(example, np.ndarray):
        return np.full(example.shape, np.nan if example.dtype.kind == "f" else -1, dtype=example.dtype)
    if isinstance(example, (bool, np.bool_)):
        return False
    if isinstance(example, (int, np.integer)):
        return -1
    if isinstance(example, (float, np.floating)):
        return math.nan
    return ""


def common_pixel_scale(scales: np.ndarray) -> tuple[float, str]:
    """The data set's pixel scale: the per-image value if all agree, else NaN; and a note saying which."""
    scales = np.asarray(scales, dtype=np.float64)
    finite = np.isfinite(scales)
    if not finite.any():
        return math.nan, "unknown: the inputs do not record an angular scale"
    if finite.all() and np.allclose(scales, scales[0], rtol=1e-6):
        return float(scales[0]), "the same for every image"
    return math.nan, "varies per image (or is unknown for some): see metadata column pixel_scale_arcsec"


def count_unlabelled(metadata: dict[str, np.ndarray]) -> int:
    """Galaxy Zoo images that found no row in the labels file."""
    if "has_labels" not in metadata:
        return 0
    return int(np.sum((metadata["source_kind"] == "galaxy-zoo") & ~metadata["has_labels"].astype(bool)))


def provenance_record(paths: list, inputs: list, options: IngestOptions, collection: Collection,
                      kinds: dict[str, int], n_held_out: int, seed: int, strict: bool, labels_csv) -> dict[str, Any]:
    """What produced the data set: the paths given (absolute), how many files they held, options,
    counts, skips, detection settings and results. Each image's own file is in its metadata."""
    given = [str(p) if str(p).startswith(SAMPLE_PREFIX) else str(Path(p).resolve()) for p in paths]
    return {
        "ingest": {
            "inputs": given,
            "files_read": sum(isinstance(p, Path) for p in inputs),
            "kinds": kinds,
            "options": {"n_held_out": n_held_out, "seed": seed, "band": options.band, "detect": options.detect,
                        "labels_csv": str(Path(labels_csv).resolve()) if labels_csv else None, "strict": strict},
            "colour_rule": options.colour_rule,
            "resampling": RESAMPLING_RULE,
            "kept": len(collection.stamps),
            "skipped": len(collection.skipped),
            "skipped_inputs": [list(s) for s in collection.skipped[:SKIPS_RECORDED]],
            "ignored_files": collection.ignored,
            "detection": ({"config": config_record(options.detection), "fields": collection.detections}
                          if options.detect else None),
            "library_versions": library_versions(),
        }
    }
