"""What produced a file: the command, the library versions, the time."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from importlib import metadata

TRACKED_DISTRIBUTIONS = (
    "galaxyvae", "torch", "numpy", "scipy", "h5py", "astropy", "galsim", "sep",
    "scikit-image", "scikit-learn", "matplotlib",
)


def library_versions() -> dict[str, str]:
    """Versions of Python and of the distributions galaxyvae depends on ("absent" if not installed)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TRACKED_DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def command_line() -> str:
    """The command line of the current process, as one string."""
    return " ".join(sys.argv)


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
