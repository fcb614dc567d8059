"""The simulated survey: many stamps, rendered in chunks over worker processes, written as one data set.

Workers are started with the *spawn* method and one OpenMP thread each: GalSim in a forked
child can deadlock once GalSim has run in the parent, and threads would only fight over the
cores the processes already use. Every stamp's random generator is seeded by (seed, index),
so the survey does not depend on the number of workers or on the chunking.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np

from galaxyvae import STAMP_SIZE, __version__
from galaxyvae._io import check_writable
from galaxyvae.dataset import DEFAULT_HELD_OUT, choose_held_out, default_held_out, write_dataset
from galaxyvae.errors import InputError
from galaxyvae.simulation.families import FAMILIES
from galaxyvae.simulation.observing import PIXEL_SCALE, survey_attrs
from galaxyvae.simulation.presets import SDSS, SimulationPreset, get_preset
from galaxyvae.simulation.stamp import draw_stamp, render_stamp, stamp_record

log = logging.getLogger(__name__)

DEFAULT_N_IMAGES = 44_444
"""Stamps in the default survey: the paper's 43,444 training images plus 1,000 held out."""

CHUNK_SIZE = 200
"""Stamps per task sent to a worker: large enough to amortise the transfer, small enough for a smooth progress bar."""

SINGLE_THREADED_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def simulate_chunk(seed: int, start: int, stop: int, preset: str = SDSS.name) -> tuple[int, np.ndarray, list[dict]]:
    """Render stamps ``start`` to ``stop - 1`` of the survey with ``seed`` and ``preset``.

    Returns (start, images (stop - start, 69, 69) float32 in the preset's pixel units, metadata rows).
    """
    from galsim.utilities import single_threaded

    images = np.empty((stop - start, STAMP_SIZE, STAMP_SIZE), np.float32)
    records = []
    # GalSim's OpenMP loops (e.g. its noise generators) spin-wait for busy cores: on a shared
    # machine they run many times slower than one thread.
    with single_threaded():
        for offset, index in enumerate(range(start, stop)):
            spec = draw_stamp(seed, index, preset)
            rendered = render_stamp(spec)
            images[offset] = rendered.image
            records.append(stamp_record(spec, rendered))
    return start, images, records


def _simulate_chunk_task(task: tuple[int, int, int, str]):
    return simulate_chunk(*task)


def default_workers() -> int:
    """The number of CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables (inherited by spawned workers) and restore them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def render_survey(n_images: int, seed: int = 0, workers: int | None = None, progress: bool = True,
                  chunk_size: int = CHUNK_SIZE, preset: str = SDSS.name) -> tuple[np.ndarray, list[dict]]:
    """Render stamps 0 .. n_images - 1 of the survey with ``seed`` and ``preset``.

    Returns (images (n_images, 69, 69) float32 in the preset's pixel units (nmgy for "sdss"),
    sky-subtracted; metadata rows in index order).
    """
    from tqdm import tqdm

    get_preset(preset)
    workers = default_workers() if workers is None else workers
    tasks = [(seed, start, min(start + chunk_size, n_images), preset) for start in range(0, n_images, chunk_size)]
    images = np.empty((n_images, STAMP_SIZE, STAMP_SIZE), np.float32)
    records: list[dict | None] = [None] * n_images
    bar = tqdm(total=n_images, unit="stamp", desc="simulate", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def collect(result):
        start, chunk_images, chunk_records = result
        images[start:start + len(chunk_images)] = chunk_images
        records[start:start + len(chunk_records)] = chunk_records
        bar.update(len(chunk_images))

    with bar:
        if workers == 1 or len(tasks) == 1:
            for task in tasks:
                collect(simulate_chunk(*task))
        else:
            context = multiprocessing.get_context("spawn")
            with _environment(SINGLE_THREADED_ENV), context.Pool(min(workers, len(tasks))) as pool:
                for result in pool.imap_unordered(_simulate_chunk_task, tasks):
                    collect(result)
    return images, records


def metadata_columns(records: list[dict]) -> dict[str, np.ndarray]:
    """Metadata rows -> columns (strings as object arrays, the rest as numpy numbers or booleans)."""
    columns = {}
    for name in records[0]:
        values = [record[name] for record in records]
        columns[name] = np.array(values, dtype=object) if isinstance(values[0], str) else np.array(values)
    return columns



def _check_arguments(n_images: int, n_held_out: int, seed: int, workers: int | None) -> None:
    if n_images < 2:
        raise InputError(f"n_images (--n) must be at least 2, got {n_images}")
    if not 0 <= n_held_out < n_images:
        raise InputError(f"n_held_out (--held-out) must be between 0 and n_images - 1 = {n_images - 1}, "
                         f"got {n_held_out}")
    if seed < 0:
        raise InputError(f"seed (--seed) must be a non-negative integer, got {seed}")
    if workers is not None and workers < 1:
        raise InputError(f"workers (--workers) must be at least 1, got {workers}")


def _preset_attrs(knobs: SimulationPreset) -> dict:
    """Data-set attributes that say which preset made the images and what its display stretch is."""
    attrs = {"preset": knobs.name}
    if knobs.display is not None:
        attrs.update(display_stretch="asinh", display_smoothing_sigma_pix=knobs.display.smoothing_sigma_pix,
                     display_softening_sky_sigma=knobs.display.softening_sigma,
                     display_sky_noise_levels=knobs.display.sky_noise_levels,
                     display_quantised=knobs.display.quantise)
    return attrs


def simulate_survey(out, n_images: int = DEFAULT_N_IMAGES, n_held_out: int | None = DEFAULT_HELD_OUT, seed: int = 0,
                    workers: int | None = None, overwrite: bool = False, progress: bool = True,
                    preset: str = SDSS.name) -> Path:
    """Simulate a survey of SDSS-like r-band galaxy stamps and write it as a galaxyvae data set.

    out:        output .h5 path; an existing file is replaced only with ``overwrite=True``
    n_images:   stamps in all (default 44,444: the paper's 43,444 training + 1,000 held-out images)
    n_held_out: how many of them form the held-out split (chosen at random with ``seed``);
                None for ``default_held_out(n_images)``
    seed:       the same seed gives the same images whatever the number of ``workers``
    workers:    processes (default: all usable cores)
    progress:   show a progress bar on stderr
    preset:     "sdss" (default: the paper reproduction) or "deep-field" (Hubble-Deep-Field-like
                display cutouts, for pretraining; see docs/simulation.md)

    Images are (n_images, 69, 69) float32, sky-subtracted, at 0.396"/pixel, in nanomaggies
    ("sdss") or display levels of a simulated asinh stretch ("deep-field"); metadata holds each
    stamp's family and parameters (see docs/simulation.md). Returns the path.
    """
    knobs = get_preset(preset)
    n_held_out = default_held_out(n_images) if n_held_out is None else n_held_out
    _check_arguments(n_images, n_held_out, seed, workers)
    out = check_writable(out, overwrite)
    workers = default_workers() if workers is None else workers
    log.info("simulating %d stamps (%d held out) with seed %d on %d process(es)", n_images, n_held_out, seed, workers)
    images, records = render_survey(n_images, seed=seed, workers=workers, progress=progress, preset=knobs.name)
    metadata = metadata_columns(records)
    metadata["object_id"] = np.array([f"sim-{seed}-{i:06d}" for i in range(n_images)], dtype=object)
    attrs = {"source": "simulated", "pixel_units": knobs.pixel_units, "pixel_scale_arcsec": PIXEL_SCALE, **_preset_attrs(knobs),
             "sky_subtracted": True, "seed": seed, "simulator": f"galaxyvae.simulation {__version__}",
             **{k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in survey_attrs().items()}}
    provenance = {"generator": "galaxyvae.simulation.simulate_survey", "n_images": n_images,
                  "n_held_out": n_held_out, "seed": seed, "workers": workers,
                  "preset": knobs.to_dict(),
                  "family_mix": knobs.family_fractions or {f.name: f.fraction for f in FAMILIES},
                  "look_alikes": {f.name: f.look_alike for f in FAMILIES}, "observing": survey_attrs()}
    path = write_dataset(out, images, choose_held_out(n_images, n_held_out, seed), attrs=attrs, metadata=metadata,
                         provenance=provenance, overwrite=overwrite)
    log.info("wrote %s", path)
    return path
