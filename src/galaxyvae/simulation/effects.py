"""What the knobs of a simulation preset (:mod:`.presets`) draw and do to a stamp.

Draws take the preset's own generator (seeded by (seed, index, PRESET_STREAM)), never the
stamp's main one, so the default survey's draws do not move.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.ndimage

from galaxyvae.simulation import canvas, geometry as geo
from galaxyvae.simulation.families import exponential
from galaxyvae.simulation.observing import PIXEL_SCALE, magnitude_to_nmgy
from galaxyvae.simulation.presets import Asymmetry, Crowding, DisplayStretch

NEIGHBOUR_SERSIC_N = tuple(np.arange(0.8, 4.01, 0.4).round(1))
NEIGHBOUR_HALF_WIDTH_ARCSEC = (34 + 6) * PIXEL_SCALE
"""Neighbours are placed anywhere in the stamp or up to 6 pixels beyond its edge."""


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def draw_radius_arcsec(rng: np.random.Generator, radius_pix: tuple[float, float]) -> float:
    """Half-light radius of the central galaxy, log-uniform on ``radius_pix`` stamp pixels, in arcsec."""
    return round(_log_uniform(rng, *radius_pix) * PIXEL_SCALE, 4)


def draw_peak_snr(rng: np.random.Generator, snr_range: tuple[float, float]) -> float:
    """Noiseless peak of the central galaxy in white sky sigma, log-uniform on ``snr_range``."""
    return round(_log_uniform(rng, *snr_range), 3)


def draw_asymmetry(rng: np.random.Generator, knobs: Asymmetry) -> dict:
    """Parameters of the lopsidedness and off-centre clumps added to a galaxy of any family; for the
    galaxies outside ``knobs.share`` they are drawn all the same (the stream stays aligned) and then
    the lopsidedness and the clumps' light are set to 0, which ``add_asymmetry`` leaves untouched."""
    applied = bool(rng.uniform() < knobs.share)
    return {"lopsidedness": round(float(rng.uniform(*knobs.lopsidedness_range)), 4) * applied,
            "lopsided_phase_rad": round(float(rng.uniform(0, 2 * np.pi)), 4),
            "clumps": int(rng.integers(knobs.clump_count_range[0], knobs.clump_count_range[1] + 1)) * applied,
            "clump_fraction": round(float(rng.uniform(*knobs.clump_fraction_range)), 4) * applied,
            "clump_sigma_arcsec": round(float(rng.uniform(*knobs.clump_sigma_arcsec_range)), 4),
            "clump_spread_r50": knobs.clump_spread_r50,
            "clump_seed": int(rng.integers(1, 2 ** 31 - 1)),
            "clump_flux_seed": int(rng.integers(1, 2 ** 31 - 1))}


def add_asymmetry(k_galaxy: np.ndarray, galaxy: dict) -> np.ndarray:
    """A galaxy's Fourier-space scene made lopsided, with a share of its light moved into clumps.

    The total flux is kept: the body keeps (1 - clump_fraction) of it, the clumps the rest.
    """
    a = galaxy["asymmetry"]
    if a["lopsidedness"] == 0 and a["clump_fraction"] == 0:
        return k_galaxy
    x0, y0, pa, r50 = galaxy["x_arcsec"], galaxy["y_arcsec"], galaxy["position_angle_deg"], galaxy["half_light_radius_arcsec"]
    q = galaxy.get("axis_ratio", 1.0)
    flux = float(k_galaxy[0, 0].real)
    body = canvas.to_real(k_galaxy)
    radius, phi = geo.disk_polar(x0, y0, pa, q)
    lopsided = np.maximum(1 + np.float32(a["lopsidedness"]) * (radius / np.float32(r50))
                          * np.cos(phi - np.float32(a["lopsided_phase_rad"])), np.float32(0.1))
    body = body * lopsided
    body = body * np.float32(flux * (1 - a["clump_fraction"]) / float(body.sum()))
    points = geo.random_knot_positions(a["clumps"], exponential(a["clump_spread_r50"] * r50, 1.0, q, pa), a["clump_seed"])
    fluxes = geo.power_law_fluxes(np.random.default_rng(a["clump_flux_seed"]), len(points),
                                  flux * a["clump_fraction"], dynamic_range=10.0)
    clumps = canvas.deposit_points(points[:, 0] + x0, points[:, 1] + y0, fluxes)
    return canvas.to_k(body) + canvas.to_k(clumps) * canvas.gaussian_blur_k(a["clump_sigma_arcsec"])


def _draw_position(rng: np.random.Generator, central: dict, min_distance: float) -> tuple[float, float]:
    while True:
        x, y = rng.uniform(-NEIGHBOUR_HALF_WIDTH_ARCSEC, NEIGHBOUR_HALF_WIDTH_ARCSEC, 2)
        if np.hypot(x - central["x_arcsec"], y - central["y_arcsec"]) >= min_distance:
            return round(float(x), 4), round(float(y), 4)


def _magnitude_offset(rng: np.random.Generator, knobs: Crowding) -> float:
    """dm on mag_offset_range with dN/dm ~ 10 ** (slope dm) (inverse CDF): faint neighbours dominate."""
    a = knobs.mag_offset_slope * np.log(10)
    low, high = knobs.mag_offset_range
    u = rng.random()
    return float(np.log(np.exp(a * low) + u * (np.exp(a * high) - np.exp(a * low))) / a)


def draw_crowd(rng: np.random.Generator, knobs: Crowding, central: dict) -> list[dict]:
    """Poisson(mean_count) stars and galaxies around the central galaxy, fainter than it by dm,
    galaxies smaller than it by 10 ** (-0.15 dm) (with scatter), in the same format as the default
    survey's neighbours."""
    r50 = central["half_light_radius_arcsec"]
    neighbours = []
    for _ in range(int(rng.poisson(knobs.mean_count))):
        x, y = _draw_position(rng, central, knobs.min_distance_r50 * r50)
        mag = central["mag_r"] + _magnitude_offset(rng, knobs)
        source = {"x_arcsec": x, "y_arcsec": y, "mag_r": round(mag, 4),
                  "flux_nmgy": round(float(magnitude_to_nmgy(mag)), 6)}
        if rng.random() < knobs.star_fraction:
            neighbours.append({"kind": "star", **source})
            continue
        size = r50 * 10 ** (-0.15 * (mag - central["mag_r"]) + rng.normal(0, 0.12))
        neighbours.append({"kind": "galaxy", **source, "sersic_n": float(rng.choice(NEIGHBOUR_SERSIC_N)),
                           "half_light_radius_arcsec": round(float(np.clip(size, 0.25, 1.2 * r50)), 4),
                           "axis_ratio": round(float(rng.uniform(0.3, 1.0)), 4),
                           "position_angle_deg": round(float(rng.uniform(0, 180)), 3)})
    return neighbours


@lru_cache(maxsize=8)
def smoothed_noise_factor(sigma_pix: float) -> float:
    """rms of unit white noise after ``gaussian_filter(sigma_pix)``: the root sum of squared kernel weights."""
    delta = np.zeros((31, 31))
    delta[15, 15] = 1.0
    return float(np.sqrt((scipy.ndimage.gaussian_filter(delta, sigma_pix) ** 2).sum()))


def display_levels(image_nmgy: np.ndarray, knobs: DisplayStretch, sky_sigma_nmgy: float) -> np.ndarray:
    """Noisy sky-subtracted stamp (nmgy) -> display levels: smoothed by a Gaussian (correlated noise),
    asinh-stretched with softening ``softening_sigma`` white sky sigma, scaled so the smoothed sky
    noise is ~``sky_noise_levels`` levels, rounded if ``quantise``. Returns (69, 69) float32."""
    smoothed = scipy.ndimage.gaussian_filter(image_nmgy.astype(np.float64), knobs.smoothing_sigma_pix, mode="reflect")
    softening = knobs.softening_sigma * sky_sigma_nmgy
    # Near zero asinh is linear, so the sky noise in levels is levels_per_unit * smoothed rms / softening.
    scale = knobs.sky_noise_levels * knobs.softening_sigma / smoothed_noise_factor(knobs.smoothing_sigma_pix)
    out = scale * np.arcsinh(smoothed / softening)
    return (np.round(out) if knobs.quantise else out).astype(np.float32)
