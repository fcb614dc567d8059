"""One stamp of the survey: drawing its parameters from (seed, index), and rendering them.

``draw_stamp(seed, index)`` is a pure function of its arguments (its random generator is
seeded by the pair), so the survey is the same whatever the number of worker processes.
``render_stamp(spec)`` turns the parameters into a (69, 69) float32 image in nanomaggies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

from galaxyvae.simulation import canvas, effects
from galaxyvae.simulation.families import FAMILIES, FAMILY_BY_NAME, sersic
from galaxyvae.simulation.observing import (
    GAIN, NMGY_PER_COUNT, PIXEL_SCALE, PSFSpec, add_sky_and_detector_noise, draw_psf, draw_sky_mag,
    magnitude_to_nmgy, nmgy_to_magnitude, sky_level_nmgy, sky_sigma_nmgy,
)
from galaxyvae.simulation.presets import PRESET_STREAM, SDSS, SimulationPreset, get_preset

MAG_RANGE = (14.0, 17.7)
"""r-band magnitudes of the central galaxies: prominent galaxies, down to the SDSS spectroscopic
main-sample limit (r < 17.77)."""

MAG_COUNT_SLOPE = 0.3
"""dN/dm ~ 10 ** (MAG_COUNT_SLOPE * m) within MAG_RANGE: fainter galaxies are more numerous."""

SIZE_MAG_SLOPE = 0.12
"""log10(r50) falls by this much per magnitude (brighter galaxies are bigger)."""

SIZE_LOG_SCATTER = 0.1
RADIUS_RANGE = (1.2, 6.0)
"""Half-light radii of the central galaxies are clipped to this range, arcsec."""

CENTRE_JITTER_PIX = 0.5
"""rms offset of the central galaxy from the stamp centre in each axis, pixels (clipped at 3 rms)."""

NEIGHBOUR_FRACTION = 0.3
"""Fraction of stamps with neighbouring stars or galaxies."""

STAR_FRACTION = 0.4
"""Fraction of neighbours that are stars."""

CENTRING_ISOPHOTE_NMGY = 0.14
"""Lopsided galaxies are centred on the centroid of their light above this level (nmgy per pixel,
~5 sky sigma): where a cutout around a detected galaxy would be centred."""

GOLDEN = (np.sqrt(5) - 1) / 2


@dataclass
class StampSpec:
    """Everything needed to render one stamp: the central galaxy, its neighbours, the PSF, the sky
    and the noise seed. ``galaxy`` holds the common parameters (see ``draw_common``) and the
    family's own."""

    index: int
    family: str
    galaxy: dict
    psf: PSFSpec
    sky_mag_arcsec2: float
    noise_seed: int
    neighbours: list = field(default_factory=list)
    preset: str = SDSS.name


def family_of(seed: int, index: int, fractions: dict | None = None) -> str:
    """The family of stamp ``index``: a golden-ratio (Weyl) sequence with a seed-dependent start,
    cut at the cumulative family fractions (``fractions`` by family name; default: the survey's
    mix), so every stretch of the survey has the intended mix."""
    start = np.random.default_rng([seed, 2 ** 32 - 1]).random()
    u = (start + index * GOLDEN) % 1.0
    shares = [f.fraction if fractions is None else fractions.get(f.name, 0.0) for f in FAMILIES]
    edges = np.cumsum(shares)
    return FAMILIES[min(int(np.searchsorted(edges / edges[-1], u, side="right")), len(FAMILIES) - 1)].name


def draw_magnitude(rng: np.random.Generator, low: float, high: float, slope: float) -> float:
    """A magnitude from dN/dm ~ 10 ** (slope * m) on [low, high] (inverse CDF)."""
    a = slope * np.log(10)
    u = rng.random()
    return float(np.log(np.exp(a * low) + u * (np.exp(a * high) - np.exp(a * low))) / a)


def draw_common(rng: np.random.Generator, family: str) -> dict:
    """Parameters every central galaxy has: magnitude, flux, size, position angle and centre."""
    mag = draw_magnitude(rng, *MAG_RANGE, MAG_COUNT_SLOPE)
    typical = FAMILY_BY_NAME[family].typical_radius_arcsec
    log_r50 = np.log10(typical) - SIZE_MAG_SLOPE * (mag - 16.5) + rng.normal(0, SIZE_LOG_SCATTER)
    jitter = np.clip(rng.normal(0, CENTRE_JITTER_PIX, 2), -3 * CENTRE_JITTER_PIX, 3 * CENTRE_JITTER_PIX)
    return {
        "mag_r": round(mag, 4),
        "flux_nmgy": round(float(magnitude_to_nmgy(mag)), 4),
        "half_light_radius_arcsec": round(float(np.clip(10 ** log_r50, *RADIUS_RANGE)), 4),
        "position_angle_deg": round(float(rng.uniform(0, 180)), 3),
        "x_arcsec": round(float(jitter[0] * PIXEL_SCALE), 4),
        "y_arcsec": round(float(jitter[1] * PIXEL_SCALE), 4),
    }


def draw_neighbours(rng: np.random.Generator, central: dict) -> list[dict]:
    """Stars and galaxies elsewhere in the stamp (in ``NEIGHBOUR_FRACTION`` of stamps), fainter than
    the central galaxy and at least 1.5 of its half-light radii (and 5") from its centre."""
    if rng.random() >= NEIGHBOUR_FRACTION:
        return []
    half_width = (34 + 6) * PIXEL_SCALE
    min_distance = max(5.0, 1.5 * central["half_light_radius_arcsec"])
    neighbours = []
    for _ in range(1 + rng.poisson(0.6)):
        while True:
            x, y = rng.uniform(-half_width, half_width, 2)
            if np.hypot(x - central["x_arcsec"], y - central["y_arcsec"]) >= min_distance:
                break
        if rng.random() < STAR_FRACTION:
            mag = draw_magnitude(rng, max(15.5, central["mag_r"] + 0.5), 21.5, 0.15)
            neighbours.append({"kind": "star", "x_arcsec": round(x, 4), "y_arcsec": round(y, 4),
                               "mag_r": round(mag, 4), "flux_nmgy": round(float(magnitude_to_nmgy(mag)), 4)})
        else:
            mag = draw_magnitude(rng, max(16.0, central["mag_r"] + 0.5), 21.5, 0.4)
            r50 = np.clip(10 ** (np.log10(1.2) - 0.12 * (mag - 19) + rng.normal(0, 0.12)), 0.4, 3.0)
            neighbours.append({"kind": "galaxy", "x_arcsec": round(x, 4), "y_arcsec": round(y, 4),
                               "mag_r": round(mag, 4), "flux_nmgy": round(float(magnitude_to_nmgy(mag)), 4),
                               "sersic_n": float(rng.choice(np.arange(0.8, 4.01, 0.4).round(1))),
                               "half_light_radius_arcsec": round(float(r50), 4),
                               "axis_ratio": round(float(rng.uniform(0.3, 1.0)), 4),
                               "position_angle_deg": round(float(rng.uniform(0, 180)), 3)})
    return neighbours


def draw_stamp(seed: int, index: int, preset: str = SDSS.name) -> StampSpec:
    """All the random choices of stamp ``index`` of the survey with ``seed`` and ``preset``.

    The preset's own draws come from a second generator seeded by (seed, index, PRESET_STREAM):
    the main generator's sequence of draws is the same for every preset."""
    knobs = get_preset(preset)
    rng = np.random.default_rng([seed, index])
    extra = np.random.default_rng([seed, index, PRESET_STREAM])
    family = family_of(seed, index, knobs.family_fractions)
    galaxy = draw_common(rng, family)
    if knobs.half_light_radius_pix is not None:
        galaxy["half_light_radius_arcsec"] = effects.draw_radius_arcsec(extra, knobs.half_light_radius_pix)
    galaxy.update(FAMILY_BY_NAME[family].draw(rng, galaxy))
    _draw_preset_galaxy_extras(extra, knobs, galaxy)
    psf, sky_mag, noise_seed = draw_psf(rng), draw_sky_mag(rng), int(rng.integers(1, 2 ** 31 - 1))
    if knobs.psf_fwhm_factor is not None:
        psf = replace(psf, fwhm_arcsec=round(psf.fwhm_arcsec * knobs.psf_fwhm_factor, 4))
    neighbours = (draw_neighbours(rng, galaxy) if knobs.crowding is None
                  else effects.draw_crowd(extra, knobs.crowding, galaxy))
    return StampSpec(index=index, family=family, galaxy=galaxy, psf=psf, sky_mag_arcsec2=sky_mag,
                     noise_seed=noise_seed, neighbours=neighbours, preset=knobs.name)


def _draw_preset_galaxy_extras(rng: np.random.Generator, knobs: SimulationPreset, galaxy: dict) -> None:
    if knobs.peak_snr_range is not None:
        galaxy["peak_snr"] = effects.draw_peak_snr(rng, knobs.peak_snr_range)
    if knobs.asymmetry is not None:
        galaxy["asymmetry"] = effects.draw_asymmetry(rng, knobs.asymmetry)


def neighbours_k(neighbours: list[dict]) -> np.ndarray | float:
    """The neighbouring stars and galaxies as one Fourier-space scene (0 if there are none)."""
    import galsim

    total = 0
    for nb in neighbours:
        if nb["kind"] == "star":
            profile = galsim.DeltaFunction(flux=nb["flux_nmgy"])
        else:
            profile = sersic(nb["sersic_n"], nb["half_light_radius_arcsec"], nb["flux_nmgy"], nb["axis_ratio"],
                             nb["position_angle_deg"])
        total = total + canvas.draw_k(profile, nb["x_arcsec"], nb["y_arcsec"])
    return total


@dataclass
class RenderedStamp:
    """A rendered stamp: the observed image and noiseless parts, (69, 69) float32 nmgy each."""

    image: np.ndarray
    central: np.ndarray
    neighbours: np.ndarray
    dust_transmission: float
    flux_scale: float = 1.0
    """Factor applied to the drawn fluxes of the galaxy and its neighbours (presets with a peak S/N)."""


def render_stamp(spec: StampSpec, noise: bool = True) -> RenderedStamp:
    """Render a stamp: the family's galaxy and the neighbours, blurred by the PSF and the pixel,
    plus sky, Poisson and read noise (unless ``noise`` is False), sky-subtracted.

    The central galaxy's total flux (after dust) is ``spec.galaxy["flux_nmgy"]`` times
    ``flux_scale`` (1 unless the preset sets the peak S/N); the fraction of its intrinsic light
    that dust lets through is returned as ``dust_transmission``. ``image`` is in the preset's
    pixel units (nmgy, or display levels for a preset with a display stretch); ``central`` and
    ``neighbours`` are noiseless nmgy."""
    knobs = get_preset(spec.preset)
    psf = canvas.psf_k(spec.psf)
    family = FAMILY_BY_NAME[spec.family]
    galaxy = family.render(spec.galaxy)
    # Magnitudes are observed ones (a survey selects on what reaches it), so the galaxy is scaled
    # to its drawn flux after dust has taken its share.
    emergent = float(galaxy[0, 0].real)
    galaxy = galaxy * np.float32(spec.galaxy["flux_nmgy"] / emergent)
    if "asymmetry" in spec.galaxy:
        galaxy = effects.add_asymmetry(galaxy, spec.galaxy)
    central = canvas.observe(galaxy, psf)
    flux_scale = 1.0
    if "peak_snr" in spec.galaxy:
        flux_scale = spec.galaxy["peak_snr"] * sky_sigma_nmgy(spec.sky_mag_arcsec2) / float(central.max())
        galaxy, central = galaxy * np.float32(flux_scale), central * np.float32(flux_scale)
    if family.lopsided:
        cx, cy = canvas.isophotal_centroid(central, CENTRING_ISOPHOTE_NMGY)
        central = canvas.observe(canvas.shifted(galaxy, spec.galaxy["x_arcsec"] - cx, spec.galaxy["y_arcsec"] - cy), psf)
        if "peak_snr" in spec.galaxy:  # the sub-pixel shift moved the peak (by up to ~4% under sharp seeing)
            correction = spec.galaxy["peak_snr"] * sky_sigma_nmgy(spec.sky_mag_arcsec2) / float(central.max())
            galaxy, central = galaxy * np.float32(correction), central * np.float32(correction)
            flux_scale *= correction
    others = neighbours_k(spec.neighbours)
    neighbours = canvas.observe(others, psf) if spec.neighbours else np.zeros_like(central)
    if flux_scale != 1.0:
        neighbours = neighbours * np.float32(flux_scale)
    noiseless = central + neighbours
    image = add_sky_and_detector_noise(noiseless, spec.sky_mag_arcsec2, spec.noise_seed) if noise else noiseless
    if knobs.display is not None:
        image = effects.display_levels(image, knobs.display, sky_sigma_nmgy(spec.sky_mag_arcsec2))
    return RenderedStamp(image=image, central=central, neighbours=neighbours,
                         dust_transmission=emergent / spec.galaxy["flux_nmgy"], flux_scale=flux_scale)


def optimal_snr(central: np.ndarray, total: np.ndarray, sky_mag_arcsec2: float) -> float:
    """Signal-to-noise ratio of the central galaxy for an optimal (matched-filter) measurement:
    sqrt(sum s^2 / var), var = sky variance + the source's own Poisson variance, per pixel."""
    variance = sky_sigma_nmgy(sky_mag_arcsec2) ** 2 + np.clip(total, 0, None) * NMGY_PER_COUNT / GAIN
    return float(np.sqrt(np.sum(central.astype(float) ** 2 / variance)))


def stamp_record(spec: StampSpec, rendered: RenderedStamp) -> dict:
    """The metadata row of a stamp: common numeric columns plus the full parameters as JSON."""
    g = spec.galaxy
    n_stars = sum(nb["kind"] == "star" for nb in spec.neighbours)
    params = {"family": spec.family, "galaxy": g, "psf": spec.psf.to_dict(), "sky_mag_arcsec2": spec.sky_mag_arcsec2,
              "noise_seed": spec.noise_seed, "neighbours": spec.neighbours}
    if spec.preset != SDSS.name:
        params["preset"] = spec.preset
    scaled = rendered.flux_scale != 1.0
    return {
        "family": spec.family,
        "mag_r": float(nmgy_to_magnitude(g["flux_nmgy"] * rendered.flux_scale)) if scaled else g["mag_r"],
        "flux_nmgy": g["flux_nmgy"] * rendered.flux_scale if scaled else g["flux_nmgy"],
        "flux_in_stamp_nmgy": float(rendered.central.sum()),
        "half_light_radius_arcsec": g["half_light_radius_arcsec"],
        "axis_ratio": g["axis_ratio"],
        "position_angle_deg": g["position_angle_deg"],
        "inclination_deg": g.get("inclination_deg", float("nan")),
        "bulge_fraction": g.get("bulge_fraction", float("nan")),
        "sersic_n": g.get("sersic_n", g.get("bulge_n", float("nan"))),
        "has_dust": bool(g.get("has_dust", "dust_tau" in g and g["dust_tau"] > 0)),
        "dust_transmission": rendered.dust_transmission,
        "centre_x_pix": 34 + g["x_arcsec"] / PIXEL_SCALE,
        "centre_y_pix": 34 + g["y_arcsec"] / PIXEL_SCALE,
        "psf_model": spec.psf.model,
        "psf_fwhm_arcsec": spec.psf.fwhm_arcsec,
        "psf_beta": spec.psf.beta,
        "psf_g1": spec.psf.g1,
        "psf_g2": spec.psf.g2,
        "sky_mag_arcsec2": spec.sky_mag_arcsec2,
        "sky_level_nmgy": sky_level_nmgy(spec.sky_mag_arcsec2),
        "sky_sigma_nmgy": sky_sigma_nmgy(spec.sky_mag_arcsec2),
        "snr": optimal_snr(rendered.central, rendered.central + rendered.neighbours, spec.sky_mag_arcsec2),
        "has_neighbour": bool(spec.neighbours),
        "n_neighbour_stars": int(n_stars),
        "n_neighbour_galaxies": int(len(spec.neighbours) - n_stars),
        "noise_seed": spec.noise_seed,
        "params": json.dumps(params, separators=(",", ":")),
    }


def spec_from_params(index: int, params_json: str) -> StampSpec:
    """Rebuild a stamp's StampSpec from its stored ``params`` JSON (to re-render it, e.g. without noise)."""
    p = json.loads(params_json)
    return StampSpec(index=index, family=p["family"], galaxy=p["galaxy"], psf=PSFSpec.from_dict(p["psf"]),
                     sky_mag_arcsec2=p["sky_mag_arcsec2"], noise_seed=p["noise_seed"], neighbours=p["neighbours"],
                     preset=p.get("preset", SDSS.name))
