"""The one on-disk data-set format that every galaxyvae step reads: HDF5 through h5py.

Layout of a data-set file (format version 1)::

    /images            float32 (N, 69, 69)   one galaxy per stamp, centred; units in attrs
    /held_out          bool    (N,)          True for the held-out (evaluation) split
    /metadata/<column> (N,) or (N, k)        per-image table; strings are UTF-8
    attrs              provenance (see REQUIRED_ATTRS and ``write_dataset``)

Required metadata columns (``write_dataset`` fills the ones a source cannot know):

- ``source_file``      str   the file the stamp came from ("" for simulated stamps)
- ``object_id``        str   the object's identifier within its source
- ``original_shape``   int (N, 2)  (height, width) of the source image in pixels
- ``crop_box``         int (N, 4)  (y0, x0, y1, x1) of the crop in source pixels, end-exclusive
- ``family``           str   morphological family or label where known, else ""

Anything else (simulation parameters, vote fractions, ra/dec...) is an optional column.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galaxyvae import STAMP_SIZE, __version__
from galaxyvae._io import atomic_path, check_writable
from galaxyvae.errors import InputError
from galaxyvae.provenance import command_line, utc_now

FORMAT_NAME = "galaxyvae-dataset"
FORMAT_VERSION = 1
DEFAULT_HELD_OUT = 1000
"""Held-out images by default, as in the paper."""
SMALL_DATASET = 5000
"""Below this many images the default held-out split is a fifth of them instead of 1,000."""

REQUIRED_ATTRS = ("source", "pixel_units", "pixel_scale_arcsec", "sky_subtracted")
"""Attributes a writer must supply: where the pixels came from, their units, their
angular scale in arcsec/pixel (NaN if unknown), and whether a sky level was subtracted."""

STRING_COLUMNS_DEFAULTS = {"source_file": "", "object_id": None, "family": ""}


class DatasetError(InputError):
    """A data-set file, or data meant for one, is not in the galaxyvae format."""


@dataclass
class GalaxyDataset:
    """Galaxy stamps with their split, per-image metadata and provenance.

    images:   (N, 69, 69) float32, in ``attrs["pixel_units"]``
    held_out: (N,) bool, True for images held out of training
    metadata: column name -> array with N rows
    attrs:    provenance and units (see module docstring)
    """

    images: np.ndarray
    held_out: np.ndarray
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def train_index(self) -> np.ndarray:
        """Indices (into the file) of the training images."""
        return np.flatnonzero(~self.held_out)

    @property
    def held_out_index(self) -> np.ndarray:
        """Indices (into the file) of the held-out images."""
        return np.flatnonzero(self.held_out)

    def split(self, name: str) -> "GalaxyDataset":
        """The ``"train"`` or ``"held_out"`` part as a data set of its own (a copy)."""
        if name == "train":
            return self.subset(self.train_index)
        if name == "held_out":
            return self.subset(self.held_out_index)
        raise ValueError(f"split must be 'train' or 'held_out', not {name!r}")

    def subset(self, index) -> "GalaxyDataset":
        """The images at ``index`` (ints or a boolean mask), with their metadata."""
        index = np.asarray(index)
        return GalaxyDataset(
            images=self.images[index],
            held_out=self.held_out[index],
            metadata={k: v[index] for k, v in self.metadata.items()},
            attrs=dict(self.attrs),
            path=self.path,
        )

    @property
    def provenance(self) -> dict:
        """The free-form provenance record (inputs, parameters) stored with the file."""
        return json.loads(self.attrs.get("provenance", "{}"))


def default_held_out(n_images: int) -> int:
    """Images held out by default: 1,000 as in the paper, or a fifth of them when there are fewer than 5,000."""
    return DEFAULT_HELD_OUT if n_images >= SMALL_DATASET else n_images // 5


def choose_held_out(n_images: int, n_held_out: int, seed: int) -> np.ndarray:
    """A random held-out mask of ``n_held_out`` of ``n_images``, reproducible from ``seed``.

    Returns (n_images,) bool. Raises ValueError unless 0 <= n_held_out < n_images.
    """
    if not 0 <= n_held_out < n_images:
        raise ValueError(
            f"cannot hold out {n_held_out} of {n_images} images: need 0 <= held-out < number of images"
        )
    mask = np.zeros(n_images, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_images, size=n_held_out, replace=False)] = True
    return mask


def validate_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Return ``images`` as float32 (N, 69, 69) after checking shape and finiteness.

    Raises DatasetError naming ``what`` and the problem.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (STAMP_SIZE, STAMP_SIZE):
        raise DatasetError(f"{what}: expected shape (N, {STAMP_SIZE}, {STAMP_SIZE}), got {images.shape}")
    if len(images) == 0:
        raise DatasetError(f"{what}: holds no images")
    images = images.astype(np.float32, copy=False)
    bad = ~np.isfinite(images).all(axis=(1, 2))
    if bad.any():
        raise DatasetError(f"{what}: {bad.sum()} image(s) hold NaN or Inf pixels, first at index {np.flatnonzero(bad)[0]}")
    return images


def complete_metadata(metadata: dict[str, Any], n_images: int) -> dict[str, np.ndarray]:
    """Check every column has ``n_images`` rows and add the required columns a source cannot know."""
    columns = {name: np.asarray(values) for name, values in metadata.items()}
    for name, values in columns.items():
        if len(values) != n_images:
            raise DatasetError(f"metadata column {name!r} has {len(values)} rows, expected {n_images}")
    if "object_id" not in columns:
        columns["object_id"] = np.array([str(i) for i in range(n_images)])
    for name, default in STRING_COLUMNS_DEFAULTS.items():
        columns.setdefault(name, np.full(n_images, default, dtype=object))
    columns.setdefault("original_shape", np.tile([STAMP_SIZE, STAMP_SIZE], (n_images, 1)))
    columns.setdefault("crop_box", np.tile([0, 0, STAMP_SIZE, STAMP_SIZE], (n_images, 1)))
    return columns


def write_dataset(
    path: str | Path,
    images: np.ndarray,
    held_out: np.ndarray,
    attrs: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate and write a data set to ``path`` atomically; return the path.

    images:     (N, 69, 69) pixel values in ``attrs["pixel_units"]``
    held_out:   (N,) bool split mask (see ``choose_held_out``)
    attrs:      must hold REQUIRED_ATTRS; ``seed`` is recorded if given
    metadata:   per-image columns (N rows each)
    provenance: free-form, JSON-serialisable record of inputs and parameters

    An existing file is replaced only with ``overwrite=True``; a failure leaves it untouched.
    """
    import h5py

    path = check_writable(path, overwrite)
    images = validate_images(images)
    held_out = np.asarray(held_out, dtype=bool)
    if held_out.shape != (len(images),):
        raise DatasetError(f"held_out mask has shape {held_out.shape}, expected ({len(images)},)")
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise DatasetError(f"data-set attributes missing: {', '.join(missing)}")
    columns = complete_metadata(metadata or {}, len(images))

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=images, chunks=(min(len(images), 256), STAMP_SIZE, STAMP_SIZE))
        f.create_dataset("held_out", data=held_out)
        group = f.create_group("metadata")
        for name, values in columns.items():
            _write_column(group, name, values)
        f.attrs.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            galaxyvae_version=__version__,
            created=utc_now(),
            command=command_line(),
            n_images=len(images),
            n_held_out=int(held_out.sum()),
            provenance=json.dumps(provenance or {}, default=str),
        )
        f.attrs.update({k: _attr_value(v) for k, v in attrs.items()})
    return path


def open_dataset_file(path: str | Path):
    """The data set at ``path`` as an open, read-only ``h5py.File`` (use it in a ``with`` block).

    Raises DatasetError naming the file if it is missing, unreadable or not in the format.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such data-set file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path}: not a readable HDF5 file ({err})") from None
    if handle.attrs.get("format") != FORMAT_NAME:
        handle.close()
        raise DatasetError(f"{path}: not a galaxyvae data set (no format={FORMAT_NAME!r} attribute)")
    return handle


def read_dataset(path: str | Path, split: str | None = None) -> GalaxyDataset:
    """Read a data set written by ``write_dataset``.

    split: None for all images, or ``"train"`` / ``"held_out"`` to read only that part.
    Raises DatasetError naming the file if it is missing, unreadable or not in the format.
    """
    path = Path(path)
    with open_dataset_file(path) as f:
        for key in ("images", "held_out", "metadata"):
            if key not in f:
                raise DatasetError(f"{path}: missing {key!r}")
        held_out = f["held_out"][()].astype(bool)
        if split is None:
            index = slice(None)
        elif split in ("train", "held_out"):
            index = np.flatnonzero(held_out if split == "held_out" else ~held_out)
            if len(index) == 0:
                raise DatasetError(f"{path}: the {split} split is empty")
        else:
            raise ValueError(f"split must be None, 'train' or 'held_out', not {split!r}")
        images = f["images"][index]
        try:
            images = validate_images(images, what=str(path))
        except DatasetError as err:
            raise DatasetError(str(err)) from None
        metadata = {name: _read_column(col, index) for name, col in f["metadata"].items()}
        attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    return GalaxyDataset(images=images, held_out=held_out[index], metadata=metadata, attrs=attrs, path=path)


def summarize(dataset: GalaxyDataset) -> str:
    """A human-readable summary: counts, split, units, pixel statistics, families, provenance."""
    a = dataset.attrs
    pixels = dataset.images
    lines = [
        f"file:            {dataset.path}",
        f"images:          {len(dataset)} x {STAMP_SIZE}x{STAMP_SIZE} "
        f"({(~dataset.held_out).sum()} train, {dataset.held_out.sum()} held out)",
        f"source:          {a.get('source')}",
        f"pixel units:     {a.get('pixel_units')} (sky subtracted: {bool(a.get('sky_subtracted'))})",
        f"pixel scale:     {a.get('pixel_scale_arcsec')} arcsec/pixel",
        f"seed:            {a.get('seed', 'none')}",
        f"created:         {a.get('created')} by galaxyvae {a.get('galaxyvae_version')}",
        f"command:         {a.get('command')}",
        "pixel values:    " + "  ".join(
            f"p{q}={v:.4g}" for q, v in zip((1, 50, 99), np.percentile(pixels[:2000], [1, 50, 99]))
        ) + f"  (first {min(len(pixels), 2000)} images)",
    ]
    families = Counter(str(f) for f in dataset.metadata.get("family", []))
    if families and set(families) != {""}:
        lines.append("families:        " + ", ".join(f"{k or '?'}: {v}" for k, v in sorted(families.items())))
    lines.append("metadata:        " + ", ".join(sorted(dataset.metadata)))
    prov = dataset.provenance
    if prov:
        lines.append("provenance:      " + json.dumps(prov, default=str)[:500])
    return "\n".join(lines)


def _write_column(group, name: str, values: np.ndarray) -> None:
    import h5py

    if values.dtype.kind in "OUS":
        group.create_dataset(name, data=np.array([str(v) for v in values.ravel()], dtype=object).reshape(values.shape),
                             dtype=h5py.string_dtype())
    else:
        group.create_dataset(name, data=values)


def _read_column(dataset, index) -> np.ndarray:
    import h5py

    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=object)[index]
    return dataset[()][index]


def _attr_value(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if value is None:
        return "none"
    return value
