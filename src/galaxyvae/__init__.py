"""galaxyvae: a deep generative model of astronomical galaxy images.

After Regier, McAuliffe & Prabhat, "A deep generative model for astronomical images of
galaxies". The package is organised one module per concern:

- :mod:`galaxyvae.dataset`    the on-disk HDF5 data-set format (read, write, validate, split)
- :mod:`galaxyvae.simulation` the embedded simulated survey (GalSim)
- :mod:`galaxyvae.ingest`     real data on disk -> the data-set format
- :mod:`galaxyvae.model`      the VAE with per-pixel variance, pixel scaling
- :mod:`galaxyvae.training`   fitting by stochastic variational inference, run directories
- :mod:`galaxyvae.baselines`  per-image parametric fits (scaled Gaussian, Sersic)
- :mod:`galaxyvae.evaluation` held-out metrics against the baselines
- :mod:`galaxyvae.figures`    the paper's figures and contact sheets
- :mod:`galaxyvae.report`     one offline HTML page per run
- :mod:`galaxyvae.pipeline`   ``reproduce``: simulate -> train -> evaluate -> report
- :mod:`galaxyvae.cli`        the ``galaxyvae`` command, a thin shell over the above

Sub-modules are imported on first use so that ``import galaxyvae`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

STAMP_SIZE = 69
"""Side of every stored image in pixels, as in the paper (69 x 69)."""

_SUBMODULES = {
    "dataset", "simulation", "ingest", "imaging", "model", "training", "baselines",
    "evaluation", "figures", "report", "pipeline", "cli", "provenance", "runs",
}
_LAZY_ATTRIBUTES = {"load_run": "runs"}


def __getattr__(name):
    if name in _SUBMODULES:
        return import_module(f"galaxyvae.{name}")
    if name in _LAZY_ATTRIBUTES:
        return getattr(import_module(f"galaxyvae.{_LAZY_ATTRIBUTES[name]}"), name)
    raise AttributeError(f"module 'galaxyvae' has no attribute {name!r}")
