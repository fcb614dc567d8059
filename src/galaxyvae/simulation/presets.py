"""Named simulation presets: small typed sets of knobs that change what a survey looks like.

- ``sdss`` (the default) is the paper reproduction: SDSS-like r-band stamps in nanomaggies. Its
  knobs are all "off", and its stamps are bit for bit those of the simulator before presets existed.
- ``deep-field`` imitates the Hubble Deep Field cutouts that ``ingest --detect`` makes (see
  docs/realism.md), for pretraining before fine-tuning on them: a narrow range of half-light radii
  in pixels, crowded fields, lopsided galaxies with off-centre clumps, a family mix with more
  distorted spirals and irregulars, noise correlated by a Gaussian resampling kernel, and an asinh
  display stretch quantised to integer display levels like an 8-bit JPEG.

Every random choice a preset adds is drawn from a generator seeded by (seed, index,
``PRESET_STREAM``), so the ``sdss`` draws from (seed, index) are untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from galaxyvae.errors import InputError

PRESET_STREAM = 0x0DF5EED
"""Third seed word of the generator of the draws a preset adds (a constant, so they are reproducible)."""


@dataclass(frozen=True)
class DisplayStretch:
    """How noisy linear pixels (nmgy) become display levels: Gaussian smoothing (the correlated noise
    of resampling), then ``levels * asinh(x / b)`` with ``b = softening_sigma`` times the stamp's
    white sky noise, scaled so that the smoothed sky noise is ``sky_noise_levels`` levels, then
    rounded to integers if ``quantise``. Sky-subtracted: an empty pixel has median 0."""

    smoothing_sigma_pix: float
    softening_sigma: float
    sky_noise_levels: float
    quantise: bool


@dataclass(frozen=True)
class Crowding:
    """Neighbours in every stamp: Poisson(``mean_count``) sources, a fraction ``star_fraction`` of them
    stars; magnitudes fainter than the central galaxy by dm on ``mag_offset_range`` with
    dN/dm ~ 10 ** (``mag_offset_slope`` * dm); at least ``min_distance_r50`` central half-light radii
    from its centre."""

    mean_count: float
    star_fraction: float
    mag_offset_range: tuple[float, float]
    mag_offset_slope: float
    min_distance_r50: float


@dataclass(frozen=True)
class Asymmetry:
    """Lopsidedness and off-centre clumps added to a fraction ``share`` of the galaxies, of any family
    (the others keep their family's own symmetry): the galaxy's light times
    1 + e (R / r50) cos(phi - phi0) with e uniform on ``lopsidedness_range``, and ``clump_count_range``
    Gaussian clumps (rms ``clump_sigma_arcsec_range``) holding ``clump_fraction_range`` of the light,
    spread like an exponential of half-light radius ``clump_spread_r50`` r50."""

    share: float
    lopsidedness_range: tuple[float, float]
    clump_count_range: tuple[int, int]
    clump_fraction_range: tuple[float, float]
    clump_sigma_arcsec_range: tuple[float, float]
    clump_spread_r50: float


@dataclass(frozen=True)
class SimulationPreset:
    """A named set of simulator knobs. ``None`` means "as in the default SDSS survey".

    family_fractions:       share of each family (missing families get 0); None: the default mix
    half_light_radius_pix:  central galaxy's r50 log-uniform on this range, in stamp pixels
    peak_snr_range:         the central galaxy's noiseless peak, in white sky sigma, log-uniform on this range
                            (the galaxy and its neighbours are scaled together; the drawn magnitude is replaced)
    psf_fwhm_factor:        the drawn seeing FWHM times this (None: 1, the SDSS seeing); the preset's own
                            knob for how well resolved its galaxies are
    crowding, asymmetry, display: see the classes above
    pixel_units:            the stored images' units
    """

    name: str
    description: str
    family_fractions: dict | None = None
    half_light_radius_pix: tuple[float, float] | None = None
    peak_snr_range: tuple[float, float] | None = None
    psf_fwhm_factor: float | None = None
    crowding: Crowding | None = None
    asymmetry: Asymmetry | None = None
    display: DisplayStretch | None = None
    pixel_units: str = "nanomaggies"

    def to_dict(self) -> dict:
        """The knobs as a JSON-safe dict (for the data set's provenance)."""
        return asdict(self)


SDSS = SimulationPreset("sdss", "SDSS-like r-band stamps in nanomaggies (the paper reproduction)")

DEEP_FIELD = SimulationPreset(
    "deep-field",
    "Hubble-Deep-Field-like display cutouts for pretraining before fine-tuning on `ingest --detect` stamps",
    family_fractions={"grand_design_spiral": 0.10, "dusty_elliptical": 0.06, "distorted_spiral": 0.30,
                      "edge_on_disk": 0.06, "irregular": 0.20, "sombrero": 0.04, "smooth_elliptical": 0.06,
                      "lenticular": 0.08, "thin_disk": 0.10},
    half_light_radius_pix=(5.4, 6.5),
    peak_snr_range=(60.0, 250.0),
    psf_fwhm_factor=0.6,
    crowding=Crowding(mean_count=7.0, star_fraction=0.15, mag_offset_range=(0.5, 5.0), mag_offset_slope=0.2,
                      min_distance_r50=1.0),
    asymmetry=Asymmetry(share=0.6, lopsidedness_range=(0.1, 0.4), clump_count_range=(3, 10),
                        clump_fraction_range=(0.15, 0.3), clump_sigma_arcsec_range=(0.3, 0.6), clump_spread_r50=0.8),
    display=DisplayStretch(smoothing_sigma_pix=0.8, softening_sigma=7.0, sky_noise_levels=4.0, quantise=True),
    pixel_units="display levels of a simulated asinh stretch",
)

PRESETS = {preset.name: preset for preset in (SDSS, DEEP_FIELD)}
PRESET_NAMES = tuple(PRESETS)


def get_preset(name: str) -> SimulationPreset:
    """The preset called ``name``; InputError naming --preset if there is none."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise InputError(f"preset (--preset) must be one of {', '.join(PRESET_NAMES)}, got {name!r}") from None
