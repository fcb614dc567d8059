"""The simulated telescope: SDSS r-band photometry, the atmospheric PSF, sky and detector noise.

Every number here is documented in docs/simulation.md and stored with the data set's attributes.
Pixel values are handled in nanomaggies (nmgy): a source of r-band magnitude m has a flux of
10 ** (-0.4 * (m - 22.5)) nmgy. The camera converts nanomaggies to detector counts (DN) with
``NMGY_PER_COUNT`` and counts to photo-electrons with ``GAIN``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PIXEL_SCALE = 0.396
"""SDSS pixel scale, arcsec per pixel."""

EXPOSURE_S = 53.907
"""SDSS drift-scan exposure time per band, seconds (recorded; the zero point below already includes it)."""

GAIN = 4.7
"""Electrons per count (DN), a typical r-band camcol value."""

READ_NOISE_E = 6.0
"""Read noise (with dark current), electrons rms per pixel; SDSS r-band 'dark variance' is ~1.3-1.8 DN^2."""

NMGY_PER_COUNT = 0.005
"""Calibration: nanomaggies per count in one 53.9 s exposure (SDSS r-band frames: ~0.004-0.006)."""

SKY_MAG_MEDIAN = 20.85
"""Median r-band sky brightness, mag per arcsec^2 (SDSS dark-time sky: ~20.5-21.2)."""

SKY_MAG_SCATTER = 0.2
SKY_MAG_RANGE = (20.3, 21.4)

PSF_FWHM_MEDIAN = 1.35
"""Median seeing FWHM in arcsec (SDSS r-band median: ~1.3-1.4")."""

PSF_FWHM_LOG_SCATTER = 0.15
PSF_FWHM_RANGE = (1.0, 1.8)
PSF_KOLMOGOROV_FRACTION = 0.5
"""Fraction of stamps whose PSF is a Kolmogorov profile; the others are Moffat profiles."""

MOFFAT_BETAS = tuple(np.round(np.arange(2.5, 4.51, 0.25), 2))
"""Moffat indices drawn from (a grid, so GalSim's profile tables are reused)."""

PSF_SHEAR_SCATTER = 0.02
"""rms of each reduced-shear component (g1, g2) of the PSF: small, as for a good ground-based PSF."""


def magnitude_to_nmgy(mag):
    """r-band AB magnitude -> flux in nanomaggies."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - 22.5))


def nmgy_to_magnitude(flux):
    """Flux in nanomaggies -> r-band AB magnitude."""
    return 22.5 - 2.5 * np.log10(flux)


def sky_level_nmgy(sky_mag_arcsec2: float) -> float:
    """Sky brightness in mag/arcsec^2 -> sky flux per pixel in nanomaggies."""
    return float(magnitude_to_nmgy(sky_mag_arcsec2)) * PIXEL_SCALE ** 2


def sky_sigma_nmgy(sky_mag_arcsec2: float) -> float:
    """Noise rms of an empty sky pixel in nanomaggies: Poisson noise of the sky plus read noise."""
    sky_electrons = sky_level_nmgy(sky_mag_arcsec2) / NMGY_PER_COUNT * GAIN
    return float(np.sqrt(sky_electrons + READ_NOISE_E ** 2) / GAIN * NMGY_PER_COUNT)


@dataclass(frozen=True)
class PSFSpec:
    """An atmospheric PSF: a Kolmogorov or Moffat profile of a given FWHM, slightly sheared.

    fwhm_arcsec is the FWHM of the round profile before the (area-preserving) shear (g1, g2).
    beta is the Moffat index (NaN for Kolmogorov).
    """

    model: str
    fwhm_arcsec: float
    beta: float
    g1: float
    g2: float

    def galsim_profile(self):
        """The PSF as a unit-flux GalSim profile."""
        import galsim

        if self.model == "kolmogorov":
            profile = galsim.Kolmogorov(fwhm=self.fwhm_arcsec)
        else:
            profile = galsim.Moffat(beta=self.beta, fwhm=self.fwhm_arcsec)
        return profile.shear(g1=self.g1, g2=self.g2)

    def to_dict(self) -> dict:
        """The fields as a JSON-safe dict (beta None for Kolmogorov)."""
        out = asdict(self)
        out["beta"] = None if np.isnan(self.beta) else self.beta
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "PSFSpec":
        """Inverse of ``to_dict``."""
        beta = values.get("beta")
        return cls(values["model"], values["fwhm_arcsec"], float("nan") if beta is None else beta,
                   values["g1"], values["g2"])


def draw_psf(rng: np.random.Generator) -> PSFSpec:
    """Draw the seeing of one stamp: log-normal FWHM around 1.35", clipped to 1.0-1.8"."""
    fwhm = float(np.clip(PSF_FWHM_MEDIAN * np.exp(rng.normal(0.0, PSF_FWHM_LOG_SCATTER)), *PSF_FWHM_RANGE))
    g1, g2 = np.clip(rng.normal(0.0, PSF_SHEAR_SCATTER, 2), -0.06, 0.06)
    if rng.random() < PSF_KOLMOGOROV_FRACTION:
        return PSFSpec("kolmogorov", round(fwhm, 4), float("nan"), round(float(g1), 4), round(float(g2), 4))
    beta = float(rng.choice(MOFFAT_BETAS))
    return PSFSpec("moffat", round(fwhm, 4), beta, round(float(g1), 4), round(float(g2), 4))


def draw_sky_mag(rng: np.random.Generator) -> float:
    """Draw the sky brightness of one stamp in r mag/arcsec^2."""
    return round(float(np.clip(rng.normal(SKY_MAG_MEDIAN, SKY_MAG_SCATTER), *SKY_MAG_RANGE)), 4)


def add_sky_and_detector_noise(image_nmgy: np.ndarray, sky_mag_arcsec2: float, noise_seed: int) -> np.ndarray:
    """Observe a noiseless image: add sky, Poisson and read noise with GalSim's CCDNoise, subtract the sky.

    image_nmgy: (H, W) noiseless source flux per pixel in nanomaggies (sky not included)
    Returns (H, W) float32 sky-subtracted pixel values in nanomaggies.
    """
    import galsim

    counts = galsim.ImageF(np.clip(image_nmgy, 0.0, None).astype(np.float32) / NMGY_PER_COUNT)
    sky_counts = sky_level_nmgy(sky_mag_arcsec2) / NMGY_PER_COUNT
    noise = galsim.CCDNoise(galsim.BaseDeviate(noise_seed), sky_level=sky_counts, gain=GAIN,
                            read_noise=READ_NOISE_E)
    counts.addNoise(noise)
    return (counts.array * NMGY_PER_COUNT).astype(np.float32)


def survey_attrs() -> dict:
    """The observing constants, as data-set attributes."""
    return {
        "band": "r",
        "exposure_s": EXPOSURE_S,
        "gain_e_per_count": GAIN,
        "read_noise_e": READ_NOISE_E,
        "nmgy_per_count": NMGY_PER_COUNT,
        "sky_mag_arcsec2_median": SKY_MAG_MEDIAN,
        "sky_mag_arcsec2_range": list(SKY_MAG_RANGE),
        "sky_level_nmgy_per_pixel_median": round(sky_level_nmgy(SKY_MAG_MEDIAN), 5),
        "sky_sigma_nmgy_median": round(sky_sigma_nmgy(SKY_MAG_MEDIAN), 5),
        "psf_fwhm_arcsec_median": PSF_FWHM_MEDIAN,
        "psf_fwhm_arcsec_range": list(PSF_FWHM_RANGE),
        "psf_models": "kolmogorov, moffat",
    }
