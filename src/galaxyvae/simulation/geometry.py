"""Numpy building blocks for the structure GalSim's affine profiles cannot make: disk-plane
coordinates, logarithmic spiral arms, dust screens and star-forming knots.

Angles: position angles are in degrees counter-clockwise from the +x (column) axis, the
major axis of the galaxy; azimuths in the disk plane are in radians.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

from galaxyvae.simulation.canvas import subpixel_coordinates

MIN_RADIUS = 1e-3
"""Radii are floored here (arcsec) so logarithms and azimuths stay finite at a galaxy's centre."""


def rotated(x0: float, y0: float, pa_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky sub-pixel coordinates relative to (x0, y0), rotated so u runs along the major axis
    (position angle ``pa_deg``) and w along the minor axis. Returns (u, w), arcsec, (GRID, GRID)."""
    x, y = subpixel_coordinates()
    c, s = np.float32(np.cos(np.radians(pa_deg))), np.float32(np.sin(np.radians(pa_deg)))
    dx, dy = x - np.float32(x0), y - np.float32(y0)
    return c * dx + s * dy, -s * dx + c * dy


def disk_polar(x0: float, y0: float, pa_deg: float, cos_inclination: float) -> tuple[np.ndarray, np.ndarray]:
    """Polar coordinates in the plane of a thin disk seen at inclination arccos(cos_inclination).

    Returns (R, phi): (GRID, GRID) float32 disk-plane radius in arcsec and azimuth in radians
    (phi = 0 on the major axis).
    """
    u, w = rotated(x0, y0, pa_deg)
    v = w / np.float32(max(cos_inclination, 1e-3))
    radius = np.maximum(np.hypot(u, v), np.float32(MIN_RADIUS))
    return radius, np.arctan2(v, u)


def disk_to_sky(u, v, x0: float, y0: float, pa_deg: float, cos_inclination: float) -> tuple[np.ndarray, np.ndarray]:
    """Disk-plane positions (u along the major axis, v across it), arcsec -> sky (x, y) arcsec."""
    c, s = np.cos(np.radians(pa_deg)), np.sin(np.radians(pa_deg))
    w = np.asarray(v) * cos_inclination
    return x0 + c * np.asarray(u) - s * w, y0 + s * np.asarray(u) + c * w


def spiral_phase(radius, phi, arms: int, pitch_deg: float, phase0: float, r_ref: float, chirality: int):
    """Phase of an ``arms``-armed logarithmic spiral: zero (mod 2 pi) along the arm crests.

    Along a crest, ln(R / r_ref) = tan(pitch) * (chirality * phi - phase0 / arms): the arms open
    by the pitch angle. Returns an array shaped like ``radius``.
    """
    winding = np.log(radius / np.float32(r_ref)) / np.float32(np.tan(np.radians(pitch_deg)))
    return np.float32(arms) * (np.float32(chirality) * phi - winding) - np.float32(phase0)


def arm_profile(phase, sharpness: float):
    """Crest profile ((1 + cos phase) / 2) ** sharpness divided by its mean over phase, so that a
    disk multiplied by it keeps its azimuthally averaged light (mean 1; larger sharpness, thinner arms)."""
    mean = np.exp(gammaln(sharpness + 0.5) - gammaln(sharpness + 1.0) - 0.5 * np.log(np.pi))
    return (np.float32(0.5) * (1 + np.cos(phase))) ** np.float32(sharpness) / np.float32(mean)


def inner_taper(radius, r_inner: float):
    """0 at the centre rising to 1 beyond ``r_inner``: arms and dust lanes start outside the bulge."""
    return 1 - np.exp(-(radius / np.float32(r_inner)) ** 2)


def screen_transmission(tau, behind_fraction):
    """Fraction of light transmitted through a dust screen of optical depth ``tau`` that lies in
    front of ``behind_fraction`` of the stars along each line of sight (the rest is unattenuated)."""
    return 1 - behind_fraction * (1 - np.exp(-tau))


def near_side_fraction(w, sign: int, softness_arcsec: float):
    """Fraction of a spheroid's light behind a dust plane through its centre, across the minor
    axis: ~1 on the near side (``sign * w < 0``), ~0 on the far side, smooth over ``softness_arcsec``."""
    return 0.5 * (1 - np.tanh(np.float32(sign) * w / np.float32(softness_arcsec)))


def power_law_fluxes(rng: np.random.Generator, n: int, total: float, dynamic_range: float = 30.0,
                     slope: float = 2.0) -> np.ndarray:
    """``n`` fluxes from dN/dF ~ F^-slope over [1, dynamic_range] (the luminosity function of HII
    regions has slope ~2), scaled to sum to ``total``."""
    if n == 0:
        return np.zeros(0)
    a = 1 - slope
    u = rng.random(n)
    fluxes = (1 + u * (dynamic_range ** a - 1)) ** (1 / a)
    return total * fluxes / fluxes.sum()


def random_knot_positions(n: int, profile, seed: int) -> np.ndarray:
    """``n`` random positions (n, 2) arcsec drawn from a GalSim profile with GalSim's RandomKnots."""
    import galsim

    if n == 0:
        return np.zeros((0, 2))
    return np.asarray(galsim.RandomKnots(n, profile=profile, rng=galsim.BaseDeviate(seed)).points)
