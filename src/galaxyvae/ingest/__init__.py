"""Real galaxy images on disk -> the galaxyvae data-set format (see docs/ingest.md).

``ingest(paths, out, ...)`` reads Galaxy Zoo JPEG folders, astroNN Galaxy10 SDSS and DECaLS
HDF5 files, FITS cutouts and cubes, PNG/JPEG pictures, and, with ``detect=True``, large
images of many galaxies (sep detection, one stamp per resolved galaxy). Every image becomes
a centred 69 x 69 single-channel stamp; bad inputs are skipped with a reason (or stop the run
with ``strict=True``); the result is written atomically by ``galaxyvae.dataset.write_dataset``.

- :mod:`galaxyvae.ingest.core`     ``ingest``, ``IngestReport``, assembling and writing the data set
- :mod:`galaxyvae.ingest.sources`  reading each kind of input into stamps
- :mod:`galaxyvae.ingest.detect`   detection of galaxies in large images (``DetectionConfig``)
- :mod:`galaxyvae.ingest.labels`   Galaxy Zoo vote fractions
"""

from galaxyvae.ingest.core import IngestReport, ingest
from galaxyvae.ingest.detect import DetectionConfig

__all__ = ["ingest", "IngestReport", "DetectionConfig"]
