"""The galaxy families of the simulated survey: how each one's parameters are drawn, and how it is drawn.

One family per kind of "actual galaxy" the paper shows, plus the idealised ones that simple
profiles describe well. Each family has

- ``draw(rng, base) -> dict``: its parameters (JSON-serialisable), given the common ones in
  ``base`` (flux, size, position angle, centre), and
- ``render(params) -> k_image``: the intrinsic (pre-PSF) galaxy as its Fourier transform on the
  oversampled grid of :mod:`galaxyvae.simulation.canvas`, in nanomaggies.

Smooth components are GalSim profiles; spiral arms, dust and clumps are numpy fields
(:mod:`galaxyvae.simulation.geometry`). Sizes are half-light radii along the major axis
(in the disk plane for disks), in arcsec; position angles in degrees from +x towards +y.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from galaxyvae.simulation import canvas, geometry as geo

SERSIC_N_STEP = 0.2
"""Sersic indices are drawn on this grid, so GalSim's per-index Hankel tables are reused."""

DISK_THICKNESS = 0.12
"""Intrinsic axis ratio (thickness) of thin disks seen edge-on."""

THICK_DISK_THICKNESS = 0.22
"""Intrinsic axis ratio of the thicker disks of lenticulars."""

THIN_DISK_THICKNESS = (0.06, 0.12)
"""Range of the intrinsic axis ratio (scale height over radius) of bulgeless thin disks."""

THIN_DISK_COS_RANGE = (0.0, 0.45)
"""cos(inclination) of the thin disks: 63 to 90 degrees, the elongated ones."""


@dataclass(frozen=True)
class Family:
    """A morphological family: its name, the galaxy it imitates, its share of the survey, its
    typical half-light radius (arcsec, at r = 16.5) and its parameter and rendering functions."""

    name: str
    look_alike: str
    fraction: float
    typical_radius_arcsec: float
    draw: Callable[[np.random.Generator, dict], dict]
    render: Callable[[dict], np.ndarray]
    lopsided: bool = False
    """True if the light is asymmetric enough that the stamp is centred on the light's centroid
    (as a cutout around a detected galaxy would be) rather than on the galaxy's nucleus."""


# --- small helpers ---------------------------------------------------------------------------

def _r(value, digits: int = 4) -> float:
    return round(float(value), digits)


def _sersic_n(rng: np.random.Generator, low: float, high: float) -> float:
    return _r(np.round(rng.uniform(low, high) / SERSIC_N_STEP) * SERSIC_N_STEP, 2)


def _disk_axis_ratio(cos_i: float, thickness: float) -> float:
    """Projected axis ratio of an oblate disk of intrinsic thickness ``thickness`` seen at cos(i)."""
    return float(np.sqrt(cos_i ** 2 + thickness ** 2 * (1 - cos_i ** 2)))


def sersic(n: float, r50: float, flux: float, q: float, pa_deg: float):
    """GalSim Sersic profile with major-axis half-light radius ``r50`` and axis ratio ``q``."""
    import galsim

    return (galsim.Sersic(n=n, half_light_radius=r50, flux=flux)
            .shear(q=q, beta=pa_deg * galsim.degrees).dilate(np.sqrt(q)))


def exponential(r50: float, flux: float, q: float, pa_deg: float):
    """GalSim exponential profile with major-axis half-light radius ``r50`` and axis ratio ``q``."""
    import galsim

    return galsim.Exponential(half_light_radius=r50, flux=flux).shear(q=q, beta=pa_deg * galsim.degrees).dilate(np.sqrt(q))


def inclined_disk(r50: float, flux: float, inclination_deg: float, h_over_r: float, pa_deg: float):
    """GalSim exponential disk with a sech^2 vertical profile (face-on half-light radius ``r50``)."""
    import galsim

    return galsim.InclinedExponential(inclination_deg * galsim.degrees, half_light_radius=r50,
                                      scale_h_over_r=h_over_r, flux=flux).rotate(pa_deg * galsim.degrees)


def _modulated(real: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``real * factor`` rescaled to the flux of ``real`` (structure redistributes light, keeps the total)."""
    out = real * factor
    total = float(out.sum())
    return out * np.float32(float(real.sum()) / total) if total > 0 else real


def _inclined(rng, cos_range, thickness=DISK_THICKNESS) -> dict:
    """A disk orientation: cos(inclination) uniform in ``cos_range`` (random orientations), and its axis ratio."""
    cos_i = rng.uniform(*cos_range)
    return {"inclination_deg": _r(np.degrees(np.arccos(cos_i)), 3),
            "axis_ratio": _r(_disk_axis_ratio(cos_i, thickness))}


def _knot_seeds(rng) -> dict:
    """Seeds of a galaxy's knots: their positions (GalSim RandomKnots) and their fluxes and selection."""
    return {"knot_seed": int(rng.integers(1, 2 ** 31 - 1)), "knot_flux_rng_seed": int(rng.integers(1, 2 ** 31 - 1))}


def _cos_i(params: dict) -> float:
    return float(np.cos(np.radians(params["inclination_deg"])))


# --- grand-design spiral (M51) ---------------------------------------------------------------

def draw_grand_design(rng, base):
    """Parameters of an M51-like spiral: bulge, inclined disk, 2-3 logarithmic arms, knots, arm dust."""
    p = _inclined(rng, (0.35, 1.0))
    p.update(
        bulge_fraction=_r(rng.uniform(0.05, 0.3)), bulge_n=_sersic_n(rng, 1.5, 4.0),
        bulge_radius_arcsec=_r(base["half_light_radius_arcsec"] * rng.uniform(0.12, 0.3)),
        bulge_axis_ratio=_r(rng.uniform(0.7, 1.0)),
        arms=int(rng.choice([2, 2, 2, 3])), pitch_deg=_r(rng.uniform(12, 28), 2),
        chirality=int(rng.choice([-1, 1])), arm_phase_rad=_r(rng.uniform(0, 2 * np.pi)),
        arm_sharpness=_r(rng.uniform(3, 10), 2), arm_contrast=_r(rng.uniform(0.65, 0.95)),
        arm_inner_radius_ratio=_r(rng.uniform(0.25, 0.5)),
        knot_fraction=_r(rng.uniform(0.04, 0.15)), knot_candidates=int(rng.integers(150, 400)),
        dust_tau=_r(rng.uniform(0.5, 1.5)), dust_phase_offset_rad=_r(rng.uniform(0.35, 0.8)),
    )
    p.update(_knot_seeds(rng))
    return p


def _arm_modulation(radius, phi, p, r_disk):
    """Spiral phase and arm amplitude (zero inside the bulge) on disk-plane coordinates."""
    phase = geo.spiral_phase(radius, phi, p["arms"], p["pitch_deg"], p["arm_phase_rad"], r_disk, p["chirality"])
    amplitude = p["arm_contrast"] * geo.inner_taper(radius, p["arm_inner_radius_ratio"] * r_disk)
    return phase, amplitude


def render_grand_design(p):
    """Bulge + disk x arm modulation + knots on the arms, under dust lanes on the arms' inner edges."""
    x0, y0, pa, r_disk, flux = p["x_arcsec"], p["y_arcsec"], p["position_angle_deg"], p["half_light_radius_arcsec"], p["flux_nmgy"]
    cos_i = _cos_i(p)
    bulge = canvas.to_real(canvas.draw_k(sersic(p["bulge_n"], p["bulge_radius_arcsec"], flux * p["bulge_fraction"],
                                                p["bulge_axis_ratio"], pa), x0, y0))
    disk_flux = flux * (1 - p["bulge_fraction"])
    disk = canvas.to_real(canvas.draw_k(exponential(r_disk, disk_flux * (1 - p["knot_fraction"]), p["axis_ratio"], pa), x0, y0))
    radius, phi = geo.disk_polar(x0, y0, pa, cos_i)
    phase, amplitude = _arm_modulation(radius, phi, p, r_disk)
    arms = geo.arm_profile(phase, p["arm_sharpness"])
    disk = _modulated(disk, 1 - amplitude + amplitude * arms)
    knots = _arm_knots(p, r_disk, disk_flux * p["knot_fraction"], cos_i, acceptance_power=2.0)
    dust_tau = (p["dust_tau"] * geo.inner_taper(radius, p["arm_inner_radius_ratio"] * r_disk)
                * geo.arm_profile(phase - p["dust_phase_offset_rad"], 2 * p["arm_sharpness"]))
    scene = (bulge + disk + knots) * geo.screen_transmission(dust_tau, 0.5)
    return canvas.to_k(scene)


def _arm_knots(p, r_disk, knot_flux, cos_i, acceptance_power):
    """Star-forming knots: RandomKnots positions in the disk plane, kept preferentially on the arm crests."""
    import galsim

    rng = np.random.default_rng(p["knot_flux_rng_seed"])
    points = geo.random_knot_positions(p["knot_candidates"], galsim.Exponential(half_light_radius=1.2 * r_disk),
                                       p["knot_seed"])
    u, v = points[:, 0], points[:, 1]
    radius = np.maximum(np.hypot(u, v), geo.MIN_RADIUS)
    phase, amplitude = _arm_modulation(radius, np.arctan2(v, u), p, r_disk)
    crest = (0.5 * (1 + np.cos(phase))) ** acceptance_power
    keep = rng.random(len(u)) < crest * amplitude
    x, y = geo.disk_to_sky(u[keep], v[keep], p["x_arcsec"], p["y_arcsec"], p["position_angle_deg"], cos_i)
    return canvas.deposit_points(x, y, geo.power_law_fluxes(rng, int(keep.sum()), knot_flux, dynamic_range=10.0))


# --- dusty elliptical (NGC 4753) -------------------------------------------------------------

def draw_dusty_elliptical(rng, base):
    """Parameters of an NGC 4753-like elliptical: twisted two-component Sersic body, dust filaments in 75 %."""
    p = {"sersic_n": _sersic_n(rng, 2.0, 4.5), "axis_ratio": _r(rng.uniform(0.55, 1.0)),
         "inner_fraction": _r(rng.uniform(0.25, 0.55)), "inner_n": _sersic_n(rng, 1.5, 4.0),
         "inner_radius_ratio": _r(rng.uniform(0.25, 0.5)), "inner_axis_ratio": _r(rng.uniform(0.45, 1.0)),
         "inner_twist_deg": _r(rng.normal(0, 25), 2), "has_dust": bool(rng.random() < 0.75)}
    if p["has_dust"]:
        n_filaments = int(rng.integers(3, 8))
        p.update(dust_inclination_deg=_r(rng.uniform(45, 80), 2),
                 dust_position_angle_deg=_r(base["position_angle_deg"] + rng.normal(0, 30), 2),
                 near_side=int(rng.choice([-1, 1])), chirality=int(rng.choice([-1, 1])),
                 dust_clumpiness=_r(rng.uniform(0.2, 0.6)), dust_field_seed=int(rng.integers(1, 2 ** 31 - 1)),
                 filaments=[{"pitch_deg": _r(rng.uniform(6, 30), 2),
                             "start_radius_ratio": _r(rng.uniform(0.2, 0.9)),
                             "log_extent": _r(rng.uniform(0.6, 1.8)),
                             "phase_rad": _r(rng.uniform(0, 2 * np.pi)),
                             "width_arcsec": _r(rng.uniform(0.35, 0.8)),
                             "tau": _r(rng.uniform(1.5, 4.0))} for _ in range(n_filaments)])
    return p


def filament_optical_depth(radius, ln_radius, phi, filament: dict, r50: float, chirality: int):
    """Optical depth of one dust filament: a logarithmic-spiral arc of Gaussian cross-section in the
    dust plane, from ``start_radius_ratio * r50`` over ``log_extent`` in ln R (ends ramped over 0.15)."""
    tan_pitch = np.float32(np.tan(np.radians(filament["pitch_deg"])))
    ln_start = np.float32(np.log(filament["start_radius_ratio"] * r50))
    period = np.float32(2 * np.pi) * tan_pitch
    # ln R above the nearest winding of the spiral, wrapped into [-period/2, period/2)
    offset = ln_radius - ln_start - tan_pitch * (np.float32(chirality) * phi - np.float32(filament["phase_rad"]))
    offset = (offset + period / 2) % period - period / 2
    along = ln_radius - offset - ln_start
    ramp = np.float32(0.15)
    window = np.clip(along / ramp, 0, 1) * np.clip((np.float32(filament["log_extent"]) - along) / ramp, 0, 1)
    distance = radius * offset * np.float32(np.cos(np.arctan(tan_pitch)) / filament["width_arcsec"])
    return np.float32(filament["tau"]) * window * np.exp(np.float32(-0.5) * distance * distance)


def render_dusty_elliptical(p):
    """Two Sersic components; dust filaments in an inclined plane obscure the light behind them."""
    x0, y0, pa, r50, flux = p["x_arcsec"], p["y_arcsec"], p["position_angle_deg"], p["half_light_radius_arcsec"], p["flux_nmgy"]
    outer = sersic(p["sersic_n"], r50, flux * (1 - p["inner_fraction"]), p["axis_ratio"], pa)
    inner = sersic(p["inner_n"], r50 * p["inner_radius_ratio"], flux * p["inner_fraction"], p["inner_axis_ratio"],
                   pa + p["inner_twist_deg"])
    k_image = canvas.draw_k(outer + inner, x0, y0)
    if not p["has_dust"]:
        return k_image
    cos_d = float(np.cos(np.radians(p["dust_inclination_deg"])))
    radius, phi = geo.disk_polar(x0, y0, p["dust_position_angle_deg"], cos_d)
    ln_radius = np.log(radius)
    tau = sum(filament_optical_depth(radius, ln_radius, phi, f, r50, p["chirality"]) for f in p["filaments"])
    tau = tau * _clumps(p["dust_field_seed"], p["dust_clumpiness"], 0.6)
    _, w = geo.rotated(x0, y0, p["dust_position_angle_deg"])
    behind = geo.near_side_fraction(w, p["near_side"], 0.25 * r50)
    return canvas.to_k(canvas.to_real(k_image) * geo.screen_transmission(tau, behind))


def _clumps(seed: int, strength: float, correlation_arcsec: float) -> np.ndarray:
    """A log-normal multiplicative field of mean ~1 that makes dust or light patchy."""
    field = canvas.random_field(np.random.default_rng(seed), correlation_arcsec)
    return np.exp(np.float32(strength) * field - np.float32(0.5 * strength ** 2))


# --- distorted spiral (NGC 60) ---------------------------------------------------------------

def draw_distorted_spiral(rng, base):
    """Parameters of an NGC 60-like spiral: lopsided, off-centre disk with irregular, broken arms and a tail."""
    p = _inclined(rng, (0.35, 1.0))
    n_arms = int(rng.choice([1, 2, 2, 3]))
    p.update(
        bulge_fraction=_r(rng.uniform(0.0, 0.15)), bulge_n=_sersic_n(rng, 1.0, 3.0),
        bulge_radius_arcsec=_r(base["half_light_radius_arcsec"] * rng.uniform(0.12, 0.3)),
        chirality=int(rng.choice([-1, 1])), arm_contrast=_r(rng.uniform(0.65, 0.95)),
        arm_inner_radius_ratio=_r(rng.uniform(0.2, 0.5)),
        arm_list=[{"phase_rad": _r(2 * np.pi * k / n_arms + rng.normal(0, 0.6)),
                   "pitch_deg": _r(rng.uniform(14, 40), 2), "pitch_drift": _r(rng.normal(0, 0.8)),
                   "weight": _r(rng.uniform(0.35, 1.0)), "sharpness": _r(rng.uniform(1.5, 6), 2),
                   "break_frequency": _r(rng.uniform(2, 7)), "break_phase_rad": _r(rng.uniform(0, 2 * np.pi)),
                   "break_depth": _r(rng.uniform(0.2, 0.8))} for k in range(n_arms)],
        lopsidedness=_r(rng.uniform(0.15, 0.6)), lopsided_phase_rad=_r(rng.uniform(0, 2 * np.pi)),
        disk_offset_ratio=_r(rng.uniform(0.0, 0.25)), disk_offset_angle_rad=_r(rng.uniform(0, 2 * np.pi)),
        tail_fraction=_r(rng.uniform(0.03, 0.12) if rng.random() < 0.5 else 0.0),
        knot_fraction=_r(rng.uniform(0.03, 0.12)), knot_candidates=int(rng.integers(100, 300)),
        dust_tau=_r(rng.uniform(0.0, 0.6)),
    )
    p.update(_knot_seeds(rng))
    return p


def _distorted_arms(radius, phi, p, r_disk):
    """Sum of irregular arms: each with its own pitch drifting with radius, weight, width and gaps."""
    ln_r = np.log(radius / np.float32(r_disk))
    total, weights = 0, 0.0
    for arm in p["arm_list"]:
        winding = ln_r / np.float32(np.tan(np.radians(arm["pitch_deg"]))) + np.float32(arm["pitch_drift"]) * ln_r ** 2
        phase = np.float32(p["chirality"]) * phi - winding - np.float32(arm["phase_rad"])
        gaps = 1 - np.float32(arm["break_depth"]) * 0.5 * (1 + np.cos(np.float32(arm["break_frequency"]) * ln_r
                                                                      + np.float32(arm["break_phase_rad"])))
        total = total + np.float32(arm["weight"]) * geo.arm_profile(phase, arm["sharpness"]) * gaps
        weights += arm["weight"]
    return total / np.float32(weights)


def render_distorted_spiral(p):
    """Small bulge + lopsided disk x irregular arms, a tidal tail, scattered knots and weak arm dust."""
    x0, y0, pa, r_disk, flux = p["x_arcsec"], p["y_arcsec"], p["position_angle_deg"], p["half_light_radius_arcsec"], p["flux_nmgy"]
    cos_i = _cos_i(p)
    shift = p["disk_offset_ratio"] * r_disk
    dx, dy = geo.disk_to_sky(shift * np.cos(p["disk_offset_angle_rad"]), shift * np.sin(p["disk_offset_angle_rad"]),
                             0.0, 0.0, pa, cos_i)
    xd, yd = x0 + float(dx), y0 + float(dy)
    bulge = canvas.draw_k(sersic(p["bulge_n"], p["bulge_radius_arcsec"], flux * p["bulge_fraction"], 0.9, pa), x0, y0)
    disk_flux = flux * (1 - p["bulge_fraction"])
    smooth_flux = disk_flux * (1 - p["knot_fraction"] - p["tail_fraction"])
    disk = canvas.to_real(canvas.draw_k(exponential(r_disk, smooth_flux, p["axis_ratio"], pa), xd, yd))
    radius, phi = geo.disk_polar(xd, yd, pa, cos_i)
    amplitude = p["arm_contrast"] * geo.inner_taper(radius, p["arm_inner_radius_ratio"] * r_disk)
    arms = _distorted_arms(radius, phi, p, r_disk)
    lopsided = np.maximum(1 + p["lopsidedness"] * (radius / r_disk) * np.cos(phi - p["lopsided_phase_rad"]), 0.1)
    disk = _modulated(disk, (1 - amplitude + amplitude * arms) * lopsided)
    scene = disk + _tidal_tail(radius, phi, p, r_disk, disk_flux * p["tail_fraction"])
    scene = scene + _distorted_knots(p, r_disk, disk_flux * p["knot_fraction"], cos_i, xd, yd)
    if p["dust_tau"] > 0:
        scene = scene * np.exp(-p["dust_tau"] * amplitude * arms / np.float32(4.0))
    return canvas.to_k(scene) + bulge


def _tidal_tail(radius, phi, p, r_disk, tail_flux):
    """A faint extension of the first arm beyond the disk: light along its crest at 1.2-3 r50."""
    if tail_flux <= 0:
        return 0
    first = dict(p, arm_list=p["arm_list"][:1])
    crest = _distorted_arms(radius, phi, first, r_disk) ** 2
    profile = np.exp(-radius / np.float32(1.2 * r_disk)) * (1 - np.exp(-(radius / np.float32(1.3 * r_disk)) ** 4))
    tail = crest * profile
    return tail * np.float32(tail_flux / max(float(tail.sum()), 1e-12))


def _distorted_knots(p, r_disk, knot_flux, cos_i, xd, yd):
    """Knots loosely following the irregular arms, within 2.2 r50 of the disk centre."""
    import galsim

    rng = np.random.default_rng(p["knot_flux_rng_seed"])
    points = geo.random_knot_positions(p["knot_candidates"], galsim.Exponential(half_light_radius=1.1 * r_disk),
                                       p["knot_seed"])
    u, v = points[:, 0], points[:, 1]
    radius = np.maximum(np.hypot(u, v), geo.MIN_RADIUS)
    arms = _distorted_arms(radius, np.arctan2(v, u), p, r_disk)
    keep = rng.random(len(u)) < np.clip(0.1 + 0.5 * arms, 0, 1) * geo.inner_taper(radius, 0.3 * r_disk)
    keep &= radius < 2.2 * r_disk
    x, y = geo.disk_to_sky(u[keep], v[keep], xd, yd, p["position_angle_deg"], cos_i)
    return canvas.deposit_points(x, y, geo.power_law_fluxes(rng, int(keep.sum()), knot_flux, dynamic_range=10.0))


# --- edge-on disk with a dust lane (NGC 1032) ------------------------------------------------

def draw_edge_on(rng, base):
    """Parameters of an NGC 1032-like edge-on disk: thick inclined disk, flattened bulge, mid-plane dust lane."""
    inclination = rng.uniform(82, 90)
    return {
        "inclination_deg": _r(inclination, 3),
        "axis_ratio": _r(_disk_axis_ratio(np.cos(np.radians(inclination)), 0.15)),
        "scale_height_ratio": _r(rng.uniform(0.15, 0.3)),
        "bulge_fraction": _r(rng.uniform(0.25, 0.6)), "bulge_n": _sersic_n(rng, 1.0, 2.5),
        "bulge_radius_arcsec": _r(base["half_light_radius_arcsec"] * rng.uniform(0.3, 0.5)),
        "bulge_axis_ratio": _r(rng.uniform(0.65, 0.95)),
        "dust_tau": _r(rng.uniform(3.0, 8.0)), "dust_width_arcsec": _r(rng.uniform(0.4, 0.7)),
        "dust_scale_ratio": _r(rng.uniform(0.8, 1.5)), "dust_behind_fraction": _r(rng.uniform(0.9, 0.99)),
        "dust_offset_arcsec": _r(rng.choice([-1, 1]) * (0.1 + 0.5 * (90 - inclination) / 8) * rng.uniform(0.5, 1.0)),
        "dust_clumpiness": _r(rng.uniform(0.2, 0.6)), "dust_field_seed": int(rng.integers(1, 2 ** 31 - 1)),
        "has_dust": True,
    }


def render_edge_on(p):
    """GalSim InclinedExponential disk + bulge under a patchy dust lane along the (offset) mid-plane."""
    x0, y0, pa, r50, flux = p["x_arcsec"], p["y_arcsec"], p["position_angle_deg"], p["half_light_radius_arcsec"], p["flux_nmgy"]
    disk = inclined_disk(r50, flux * (1 - p["bulge_fraction"]), p["inclination_deg"], p["scale_height_ratio"], pa)
    bulge = sersic(p["bulge_n"], p["bulge_radius_arcsec"], flux * p["bulge_fraction"], p["bulge_axis_ratio"], pa)
    scene = canvas.to_real(canvas.draw_k(disk + bulge, x0, y0))
    u, w = geo.rotated(x0, y0, pa)
    scale_length = r50 / 1.678
    tau = (p["dust_tau"] * np.exp(-np.abs(u) / np.float32(p["dust_scale_ratio"] * scale_length * 2))
           * np.exp(-0.5 * ((w - np.float32(p["dust_offset_arcsec"])) / np.float32(p["dust_width_arcsec"])) ** 2))
    tau = tau * _clumps(p["dust_field_seed"], p["dust_clumpiness"], 0.5)
    return canvas.to_k(scene * geo.screen_transmission(tau, p["dust_behind_fraction"]))


# --- irregular, clumpy -----------------------------------------------------------------------

def draw_irregular(rng, base):
    """Parameters of an irregular galaxy: a lopsided, patchy low-concentration body and bright clumps."""
    return {
        "sersic_n": _sersic_n(rng, 0.5, 1.2), "axis_ratio": _r(rng.uniform(0.4, 0.95)),
        "clump_fraction": _r(rng.uniform(0.2, 0.45)), "clumps": int(rng.integers(10, 40)),
        "clump_sigma_arcsec": _r(rng.uniform(0.35, 0.9)),
        "clump_spread_ratio": _r(rng.uniform(0.5, 0.9)),
        "patchiness": _r(rng.uniform(0.3, 0.8)), "patch_scale_ratio": _r(rng.uniform(0.25, 0.5)),
        "lopsidedness": _r(rng.uniform(0.2, 0.8)), "lopsided_phase_rad": _r(rng.uniform(0, 2 * np.pi)),
        "clump_seed": int(rng.integers(1, 2 ** 31 - 1)), "field_seed": int(rng.integers(1, 2 ** 31 - 1)),
        "clump_flux_seed": int(rng.integers(1, 2 ** 31 - 1)),
    }


def render_irregular(p):
    """Patchy lopsided Sersic body + Gaussian clumps at RandomKnots positions."""
    x0, y0, pa, r50, flux = p["x_arcsec"], p["y_arcsec"], p["position_angle_deg"], p["half_light_radius_arcsec"], p["flux_nmgy"]
    q = p["axis_ratio"]
    body = canvas.to_real(canvas.draw_k(sersic(p["sersic_n"], r50, flux * (1 - p["clump_fraction"]), q, pa), x0, y0))
    radius, phi = geo.disk_polar(x0, y0, pa, q)
    lopsided = np.maximum(1 + p["lopsidedness"] * (radius / r50) * np.cos(phi - p["lopsided_phase_rad"]), 0.05)
    body = _modulated(body, lopsided * _clumps(p["field_seed"], p["patchiness"], p["patch_scale_ratio"] * r50))
    spread = exponential(p["clump_spread_ratio"] * r50, 1.0, q, pa)
    points = geo.random_knot_positions(p["clumps"], spread, p["clump_seed"])
    rng = np.random.default_rng(p["clump_flux_seed"])
    fluxes = geo.power_law_fluxes(rng, len(points), flux * p["clump_fraction"], dynamic_range=10.0, slope=2.0)
    clumps = canvas.deposit_points(points[:, 0] + x0, points[:, 1] + y0, fluxes)
    return canvas.to_k(body) + canvas.to_k(clumps) * canvas.gaussian_blur_k(p["clump_sigma_arcsec"])


# --- Sombrero: bulge-dominated, disk with a dust lane ----------------------------------------

def draw_sombrero(rng, base):
    """Parameters of a Sombrero-like galaxy: dominant bulge, inclined ring-like disk, dust ring."""
    inclination = rng.uniform(70, 85)
    return {
        "inclination_deg": _r(inclination, 3),
        "axis_ratio": _r(_disk_axis_ratio(np.cos(np.radians(inclination)), 0.08)),
        "bulge_fraction": _r(rng.uniform(0.4, 0.75)), "bulge_n": _sersic_n(rng, 2.5, 4.5),
        "bulge_radius_ratio": _r(rng.uniform(0.45, 0.8)), "bulge_axis_ratio": _r(rng.uniform(0.55, 0.85)),
        "disk_hole_ratio": _r(rng.uniform(0.3, 0.6)), "scale_height_ratio": _r(rng.uniform(0.04, 0.09)),
        "dust_ring_ratio": _r(rng.uniform(0.8, 1.3)), "dust_ring_width_ratio": _r(rng.uniform(0.15, 0.3)),
        "dust_tau": _r(rng.uniform(2.0, 5.0)), "near_side": int(rng.choice([-1, 1])),
        "dust_clumpiness": _r(rng.uniform(0.2, 0.5)), "dust_field_seed": int(rng.integers(1, 2 ** 31 - 1)),
        "has_dust": True,
    }


def render_sombrero(p):
    """Bulge + disk with a central hole; a dust ring darkens the bulge on the near side."""
    x0, y0, pa, r50, flux = p["x_arcsec"], p["y_arcsec"], p["position_angle_deg"], p["half_light_radius_arcsec"], p["flux_nmgy"]
    disk_flux = flux * (1 - p["bulge_fraction"])
    hole = p["disk_hole_ratio"]
    # A disk with a central hole (a ring-like 'type II' disk): the difference of two exponentials
    # of equal central surface brightness.
    outer = inclined_disk(r50, disk_flux / (1 - hole ** 2), p["inclination_deg"], p["scale_height_ratio"], pa)
    inner = inclined_disk(r50 * hole, -disk_flux * hole ** 2 / (1 - hole ** 2), p["inclination_deg"],
                          p["scale_height_ratio"] / hole, pa)
    bulge = sersic(p["bulge_n"], r50 * p["bulge_radius_ratio"], flux * p["bulge_fraction"], p["bulge_axis_ratio"], pa)
    scene = canvas.to_real(canvas.draw_k(outer + inner + bulge, x0, y0))
    u, w = geo.rotated(x0, y0, pa)
    cos_eff = np.sqrt(np.cos(np.radians(p["inclination_deg"])) ** 2 + 0.03 ** 2)
    ring_radius = np.hypot(u, w / np.float32(cos_eff))
    ring = p["dust_ring_ratio"] * r50
    tau = p["dust_tau"] * np.exp(-0.5 * ((ring_radius - np.float32(ring)) / np.float32(p["dust_ring_width_ratio"] * ring)) ** 2)
    tau = tau * _clumps(p["dust_field_seed"], p["dust_clumpiness"], 0.5)
    behind = geo.near_side_fraction(w, p["near_side"], 0.15)
    return canvas.to_k(scene * geo.screen_transmission(tau, 0.1 + 0.85 * behind))


# --- idealised: smooth elliptical and lenticular ---------------------------------------------

def draw_smooth_elliptical(rng, base):
    """Parameters of an idealised elliptical: one Sersic profile."""
    return {"sersic_n": _sersic_n(rng, 2.5, 6.0), "axis_ratio": _r(rng.uniform(0.45, 1.0))}


def render_smooth_elliptical(p):
    """One Sersic profile, drawn by GalSim in Fourier space."""
    return canvas.draw_k(sersic(p["sersic_n"], p["half_light_radius_arcsec"], p["flux_nmgy"], p["axis_ratio"],
                                p["position_angle_deg"]), p["x_arcsec"], p["y_arcsec"])


def draw_thin_disk(rng, base):
    """Parameters of a bulgeless late-type disk (like NGC 4244) seen at a high inclination: a thin
    exponential disk and nothing else. The deep-field preset needs it: the Hubble Deep Field cutouts
    hold many flat, elongated galaxies that the other families, all with a bulge or a thick or
    moderately inclined disk, never produce (docs/simulation.md)."""
    thickness = rng.uniform(*THIN_DISK_THICKNESS)
    return dict(_inclined(rng, THIN_DISK_COS_RANGE, thickness), scale_height_ratio=_r(thickness))


def render_thin_disk(p):
    """A GalSim InclinedExponential disk with a sech^2 vertical profile, drawn in Fourier space."""
    disk = inclined_disk(p["half_light_radius_arcsec"], p["flux_nmgy"], p["inclination_deg"],
                         p["scale_height_ratio"], p["position_angle_deg"])
    return canvas.draw_k(disk, p["x_arcsec"], p["y_arcsec"])


def draw_lenticular(rng, base):
    """Parameters of an idealised lenticular: Sersic bulge + thick exponential disk."""
    p = _inclined(rng, (0.08, 1.0), THICK_DISK_THICKNESS)
    p.update(bulge_fraction=_r(rng.uniform(0.3, 0.7)), bulge_n=_sersic_n(rng, 2.0, 4.5),
             bulge_radius_arcsec=_r(base["half_light_radius_arcsec"] * rng.uniform(0.2, 0.5)),
             bulge_axis_ratio=_r(max(p["axis_ratio"], rng.uniform(0.6, 1.0))))
    return p


def render_lenticular(p):
    """Bulge + disk, drawn by GalSim in Fourier space."""
    pa, flux = p["position_angle_deg"], p["flux_nmgy"]
    bulge = sersic(p["bulge_n"], p["bulge_radius_arcsec"], flux * p["bulge_fraction"], p["bulge_axis_ratio"], pa)
    disk = exponential(p["half_light_radius_arcsec"], flux * (1 - p["bulge_fraction"]), p["axis_ratio"], pa)
    return canvas.draw_k(bulge + disk, p["x_arcsec"], p["y_arcsec"])


FAMILIES = (
    Family("grand_design_spiral", "M51, the Whirlpool", 0.16, 4.0, draw_grand_design, render_grand_design),
    Family("dusty_elliptical", "NGC 4753", 0.12, 3.2, draw_dusty_elliptical, render_dusty_elliptical),
    Family("distorted_spiral", "NGC 60", 0.12, 3.8, draw_distorted_spiral, render_distorted_spiral, True),
    Family("edge_on_disk", "NGC 1032", 0.10, 4.8, draw_edge_on, render_edge_on),
    Family("irregular", "irregular galaxies", 0.08, 3.5, draw_irregular, render_irregular, True),
    Family("sombrero", "the Sombrero, M104", 0.07, 4.0, draw_sombrero, render_sombrero),
    Family("smooth_elliptical", "idealised Sersic elliptical", 0.20, 2.6, draw_smooth_elliptical, render_smooth_elliptical),
    Family("lenticular", "idealised bulge + disk (S0)", 0.15, 3.0, draw_lenticular, render_lenticular),
    Family("thin_disk", "NGC 4244, a bulgeless disk seen nearly edge-on (not in the default mix)", 0.0, 4.0,
           draw_thin_disk, render_thin_disk),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}
FAMILY_NAMES = tuple(family.name for family in FAMILIES)
