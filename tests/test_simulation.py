"""The simulated survey: format, determinism, families, recorded parameters, rendering accuracy
against GalSim's own drawing, noise level, PSF, and the `galaxyvae simulate` command."""

import json

import galsim
import numpy as np
import pytest
from scipy.optimize import curve_fit

from galaxyvae.cli import main
from galaxyvae.config import ModelConfig
from galaxyvae.dataset import read_dataset
from galaxyvae.errors import InputError
from galaxyvae.simulation import FAMILIES, FAMILY_NAMES, canvas, observing, render_survey, simulate_survey, stamp
from galaxyvae.simulation.observing import PSFSpec

N_SMALL = 40


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "survey.h5"
    simulate_survey(path, n_images=N_SMALL, n_held_out=8, seed=7, workers=1, progress=False)
    return read_dataset(path)


def _spec_of_family(family: str, seed: int = 0) -> stamp.StampSpec:
    """The first stamp of ``family`` in the default survey, or in the deep-field one for a family
    outside the default mix."""
    from galaxyvae.simulation.families import FAMILY_BY_NAME
    from galaxyvae.simulation.presets import DEEP_FIELD

    preset = DEEP_FIELD if FAMILY_BY_NAME[family].fraction == 0 else None
    fractions = preset.family_fractions if preset else None
    index = next(i for i in range(1000) if stamp.family_of(seed, i, fractions) == family)
    return stamp.draw_stamp(seed, index, preset=preset.name) if preset else stamp.draw_stamp(seed, index)


def test_survey_has_the_data_set_format_and_units(survey):
    assert survey.images.shape == (N_SMALL, 69, 69)
    assert survey.images.dtype == np.float32
    assert np.isfinite(survey.images).all()
    assert survey.held_out.sum() == 8
    attrs = survey.attrs
    assert attrs["source"] == "simulated" and attrs["pixel_units"] == "nanomaggies"
    assert attrs["pixel_scale_arcsec"] == pytest.approx(0.396) and attrs["sky_subtracted"]
    assert attrs["seed"] == 7
    assert attrs["gain_e_per_count"] == observing.GAIN and attrs["read_noise_e"] == observing.READ_NOISE_E
    assert attrs["sky_sigma_nmgy_median"] == pytest.approx(observing.sky_sigma_nmgy(observing.SKY_MAG_MEDIAN), rel=1e-3)


def test_every_family_appears_labelled_in_the_intended_mix(survey):
    assert set(survey.metadata["family"]) == {family.name for family in FAMILIES if family.fraction > 0}
    assert set(FAMILY_NAMES) - set(survey.metadata["family"]) == {"thin_disk"}  # deep-field preset only
    families = [stamp.family_of(3, i) for i in range(20_000)]
    for family in FAMILIES:
        assert families.count(family.name) / len(families) == pytest.approx(family.fraction, abs=0.002)


def test_parameters_are_recorded_and_reproduce_the_image(survey):
    metadata = survey.metadata
    for i in range(N_SMALL):
        params = json.loads(metadata["params"][i])
        assert params["family"] == metadata["family"][i]
        assert params["galaxy"]["flux_nmgy"] == pytest.approx(metadata["flux_nmgy"][i])
        assert params["galaxy"]["half_light_radius_arcsec"] == pytest.approx(metadata["half_light_radius_arcsec"][i])
        assert params["psf"]["fwhm_arcsec"] == pytest.approx(metadata["psf_fwhm_arcsec"][i])
        assert bool(metadata["has_neighbour"][i]) == bool(params["neighbours"])
    for i in (0, 5, 11):
        spec = stamp.spec_from_params(i, metadata["params"][i])
        np.testing.assert_array_equal(stamp.render_stamp(spec).image, survey.images[i])
    assert 1.0 <= metadata["psf_fwhm_arcsec"].min() and metadata["psf_fwhm_arcsec"].max() <= 1.8
    assert (metadata["mag_r"] >= stamp.MAG_RANGE[0]).all() and (metadata["mag_r"] <= stamp.MAG_RANGE[1]).all()


def test_same_seed_same_survey_whatever_the_worker_count():
    one_process = render_survey(12, seed=11, workers=1, progress=False)
    two_processes = render_survey(12, seed=11, workers=2, progress=False, chunk_size=5)
    np.testing.assert_array_equal(one_process[0], two_processes[0])
    np.testing.assert_equal(one_process[1], two_processes[1])
    other_seed = render_survey(4, seed=12, workers=1, progress=False)
    assert not np.allclose(other_seed[0], one_process[0][:4])


def test_isolated_galaxies_are_centred(survey):
    isolated = np.flatnonzero(~survey.metadata["has_neighbour"].astype(bool))
    assert len(isolated) >= 15
    y, x = np.mgrid[:69, :69]
    for i in isolated:
        image = survey.images[i]
        bright = image > 5 * survey.metadata["sky_sigma_nmgy"][i]
        weights = np.where(bright, image, 0.0)
        cx, cy = (weights * x).sum() / weights.sum(), (weights * y).sum() / weights.sum()
        assert np.hypot(cx - 34, cy - 34) < 3.5, (survey.metadata["family"][i], cx, cy)
        assert np.hypot(survey.metadata["centre_x_pix"][i] - 34, survey.metadata["centre_y_pix"][i] - 34) <= 2.2


def test_sky_noise_matches_the_documented_noise_model():
    # Independent arithmetic from the documented constants: sky 20.85 mag/arcsec^2 over a
    # 0.396" pixel, 0.005 nmgy per count, 4.7 e-/count, 6 e- read noise.
    sky_nmgy = 10 ** (-0.4 * (20.85 - 22.5)) * 0.396 ** 2
    electrons = sky_nmgy / 0.005 * 4.7
    expected = np.sqrt(electrons + 6.0 ** 2) / 4.7 * 0.005
    assert observing.sky_sigma_nmgy(20.85) == pytest.approx(expected, rel=1e-9)
    residuals = []
    for index in range(30):
        spec = stamp.draw_stamp(5, index)
        noisy = stamp.render_stamp(spec).image
        model = stamp.render_stamp(spec, noise=False).image
        empty = model < 0.02 * observing.sky_sigma_nmgy(spec.sky_mag_arcsec2)
        corners = np.zeros_like(empty)
        corners[:12, :12] = corners[:12, -12:] = corners[-12:, :12] = corners[-12:, -12:] = True
        residuals.append((noisy - model)[empty & corners] / observing.sky_sigma_nmgy(spec.sky_mag_arcsec2))
    pooled = np.concatenate(residuals)
    assert len(pooled) > 5000
    assert pooled.std() == pytest.approx(1.0, abs=0.03)
    assert abs(pooled.mean()) < 0.03


def test_the_model_variance_ceiling_lies_above_the_noise_of_the_brightest_pixels(survey):
    # f_sigma is softly capped (ModelConfig.pixel_variance_max, in sky-noise variances) so that it
    # models noise, not misfit (docs/model.md); the cap must still admit the survey's real noise.
    sky_variance = np.asarray(survey.metadata["sky_sigma_nmgy"], np.float64) ** 2
    peak = survey.images.reshape(len(survey.images), -1).max(axis=1)
    noise_variance = sky_variance + peak * observing.NMGY_PER_COUNT / observing.GAIN   # sky + Poisson
    ratio = noise_variance / sky_variance
    assert ratio.min() > 1.05                      # every central galaxy adds visible Poisson noise
    assert ratio.max() < ModelConfig().pixel_variance_max


@pytest.mark.parametrize("psf", [PSFSpec("kolmogorov", 1.0, float("nan"), 0.02, -0.01),
                                 PSFSpec("moffat", 1.6, 3.0, -0.01, 0.03)])
def test_a_star_is_drawn_as_galsim_draws_it(psf):
    x, y = 2.3, -1.1
    mine = canvas.observe(canvas.draw_k(galsim.DeltaFunction(flux=100.0), x, y), canvas.psf_k(psf))
    reference = psf.galsim_profile().withFlux(100.0).drawImage(nx=69, ny=69, scale=0.396,
                                                                offset=(x / 0.396, y / 0.396)).array
    assert np.abs(mine - reference).max() < 2e-3 * reference.max()


@pytest.mark.parametrize("psf", [PSFSpec("kolmogorov", 1.0, float("nan"), 0.0, 0.0),
                                 PSFSpec("kolmogorov", 1.8, float("nan"), 0.0, 0.0),
                                 PSFSpec("moffat", 1.35, 2.5, 0.0, 0.0),
                                 PSFSpec("moffat", 1.8, 4.5, 0.0, 0.0)])
def test_the_recorded_psf_fwhm_is_the_fwhm_of_a_drawn_star(psf):
    star = canvas.observe(canvas.draw_k(galsim.DeltaFunction(flux=1.0)), canvas.psf_k(psf))
    y, x = np.mgrid[:69, :69]
    radius = np.hypot(x - 34, y - 34).ravel() * 0.396

    def moffat(r, amplitude, fwhm, beta):
        alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
        return amplitude * (1 + (r / alpha) ** 2) ** -beta

    (_, fwhm, _), _ = curve_fit(moffat, radius, star.ravel(), p0=(star.max(), 1.3, 3.0))
    # pixel integration widens a star slightly (by ~3% at 1")
    assert fwhm == pytest.approx(psf.fwhm_arcsec, rel=0.06)


@pytest.mark.parametrize("family", ["smooth_elliptical", "lenticular"])
def test_smooth_galaxies_match_galsim_convolved_drawing(family):
    spec = _spec_of_family(family, seed=2)
    g = spec.galaxy
    from galaxyvae.simulation.families import FAMILY_BY_NAME, exponential, sersic

    if family == "smooth_elliptical":
        profile = sersic(g["sersic_n"], g["half_light_radius_arcsec"], g["flux_nmgy"], g["axis_ratio"],
                         g["position_angle_deg"])
    else:
        profile = (sersic(g["bulge_n"], g["bulge_radius_arcsec"], g["flux_nmgy"] * g["bulge_fraction"],
                          g["bulge_axis_ratio"], g["position_angle_deg"])
                   + exponential(g["half_light_radius_arcsec"], g["flux_nmgy"] * (1 - g["bulge_fraction"]),
                                 g["axis_ratio"], g["position_angle_deg"]))
    mine = canvas.observe(FAMILY_BY_NAME[family].render(g), canvas.psf_k(spec.psf))
    reference = galsim.Convolve(profile, spec.psf.galsim_profile()).drawImage(
        nx=69, ny=69, scale=0.396, offset=(g["x_arcsec"] / 0.396, g["y_arcsec"] / 0.396)).array
    assert np.abs(mine - reference).max() < 3e-3 * reference.max()


def test_structured_families_keep_their_flux_and_dusty_ones_lose_light_to_dust():
    for family in FAMILY_NAMES:
        spec = _spec_of_family(family, seed=4)
        rendered = stamp.render_stamp(spec, noise=False)
        # the stamp holds most of the galaxy's (post-dust) flux
        assert 0.8 < rendered.central.sum() / (spec.galaxy["flux_nmgy"] * rendered.flux_scale) < 1.01, family
        if family in ("edge_on_disk", "sombrero"):
            assert rendered.dust_transmission < 0.95, family
        if family in ("smooth_elliptical", "lenticular", "irregular", "thin_disk"):
            assert rendered.dust_transmission == pytest.approx(1.0, abs=1e-4), family


def test_spiral_arms_make_the_galaxy_non_axisymmetric():
    spec = _spec_of_family("grand_design_spiral", seed=1)
    spec.galaxy.update(flux_nmgy=2000.0)
    plain = dict(spec.galaxy, arm_contrast=0.0, knot_fraction=0.0, dust_tau=0.0)
    with_arms = stamp.render_stamp(spec, noise=False).central
    spec.galaxy = plain
    without_arms = stamp.render_stamp(spec, noise=False).central
    difference = np.abs(with_arms - without_arms).sum() / without_arms.sum()
    assert difference > 0.1


def test_invalid_arguments_are_refused(tmp_path):
    with pytest.raises(InputError, match="held-out"):
        simulate_survey(tmp_path / "a.h5", n_images=10, n_held_out=10, progress=False)
    with pytest.raises(InputError, match="seed"):
        simulate_survey(tmp_path / "a.h5", n_images=10, n_held_out=2, seed=-1, progress=False)
    with pytest.raises(InputError, match="workers"):
        simulate_survey(tmp_path / "a.h5", n_images=10, n_held_out=2, workers=0, progress=False)
    assert not (tmp_path / "a.h5").exists()


def test_simulate_command_writes_a_data_set_and_will_not_overwrite_it(tmp_path, capsys):
    out = tmp_path / "sim.h5"
    args = ["simulate", "--n", "10", "--held-out", "3", "--out", str(out), "--seed", "2", "--workers", "1"]
    assert main(args) == 0
    data = read_dataset(out)
    assert len(data) == 10 and data.held_out.sum() == 3 and data.attrs["seed"] == 2
    before = out.read_bytes()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(args[:-2] + ["--workers", "1", "--overwrite", "--seed", "3"]) == 0
    assert read_dataset(out).attrs["seed"] == 3
    assert main(["simulate", "--n", "5", "--held-out", "5", "--out", str(tmp_path / "x.h5")]) == 2
    assert main(["simulate", "--n", "10", "--out", str(tmp_path / "small.h5"), "--workers", "1"]) == 0
    assert read_dataset(tmp_path / "small.h5").held_out.sum() == 2  # a fifth of a small survey


# --- presets -----------------------------------------------------------------------------------

# Frozen before presets existed: sums of the default survey's stamps (float64 sum of float32 pixels)
# and the SHA-256 prefix of their parameter JSON. The default preset must not move.
FROZEN_DEFAULT = {
    (0, 0): ("grand_design_spiral", "ccacf7523ba30704", 146.66421342496324, 1.077678918838501),
    (0, 5): ("grand_design_spiral", "238caa171e1b7f7b", 255.20623565902946, 1.5871946811676025),
    (3, 2): ("lenticular", "9dcc04c63cf9337b", 1756.8292415578467, 27.16402816772461),
    (3, 27): ("distorted_spiral", "6bebd081e7017325", 103.76741063855707, 1.1971920728683472),
}


@pytest.mark.parametrize("key", list(FROZEN_DEFAULT))
def test_default_preset_is_unchanged(key):
    import hashlib

    family, params_sha, total, centre = FROZEN_DEFAULT[key]
    for spec in (stamp.draw_stamp(*key), stamp.draw_stamp(*key, preset="sdss")):
        rendered = stamp.render_stamp(spec)
        record = stamp.stamp_record(spec, rendered)
        assert spec.family == family
        assert hashlib.sha256(record["params"].encode()).hexdigest()[:16] == params_sha
        assert rendered.image.astype(np.float64).sum() == pytest.approx(total, rel=1e-6)
        assert rendered.image[34, 34] == pytest.approx(centre, rel=1e-6)


@pytest.fixture(scope="module")
def deep_field(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep") / "deep.h5"
    simulate_survey(path, n_images=30, n_held_out=6, seed=5, workers=1, progress=False, preset="deep-field")
    return read_dataset(path)


def test_deep_field_records_its_preset_and_units(deep_field, survey):
    attrs = deep_field.attrs
    assert attrs["preset"] == "deep-field" and survey.attrs["preset"] == "sdss"
    assert attrs["pixel_units"] == "display levels of a simulated asinh stretch" and attrs["sky_subtracted"]
    assert deep_field.provenance["preset"]["name"] == "deep-field"
    params = json.loads(deep_field.metadata["params"][0])
    assert params["preset"] == "deep-field"
    spec = stamp.spec_from_params(0, deep_field.metadata["params"][0])
    np.testing.assert_array_equal(stamp.render_stamp(spec).image, deep_field.images[0])


def test_deep_field_is_reproducible_and_independent_of_workers(deep_field, tmp_path):
    images, records = render_survey(30, seed=5, workers=2, chunk_size=10, progress=False, preset="deep-field")
    np.testing.assert_array_equal(images, deep_field.images)
    other, _ = render_survey(4, seed=6, workers=1, progress=False, preset="deep-field")
    assert not np.array_equal(other, deep_field.images[:4])


def test_deep_field_stamps_have_the_documented_properties(deep_field):
    from galaxyvae.simulation.presets import DEEP_FIELD

    x = deep_field.images.astype(np.float64)
    # Integer display levels, bounded by the asinh stretch of the brightest conceivable pixel.
    np.testing.assert_array_equal(x, np.round(x))
    assert np.abs(x).max() < 400
    n_neighbours = deep_field.metadata["n_neighbour_stars"] + deep_field.metadata["n_neighbour_galaxies"]
    assert 5.5 < n_neighbours.mean() < 8.5 and (n_neighbours > 0).mean() > 0.9
    families = deep_field.metadata["family"]
    assert {"distorted_spiral", "irregular"} <= set(families)
    assert DEEP_FIELD.family_fractions["distorted_spiral"] + DEEP_FIELD.family_fractions["irregular"] == 0.5


def second_moment_axis_ratio(image: np.ndarray) -> float:
    """b/a of a noiseless image from its flux-weighted second moments."""
    y, x = np.indices(image.shape, dtype=np.float64)
    w = np.clip(image, 0, None) / np.clip(image, 0, None).sum()
    dx, dy = x - (w * x).sum(), y - (w * y).sum()
    eigen = np.linalg.eigvalsh([[(w * dx * dx).sum(), (w * dx * dy).sum()], [(w * dx * dy).sum(), (w * dy * dy).sum()]])
    return float(np.sqrt(eigen[0] / eigen[1]))


def test_deep_field_thin_disks_are_elongated_and_its_seeing_is_sharper():
    from galaxyvae.simulation.presets import DEEP_FIELD

    thin = [i for i in range(60) if stamp.family_of(2, i, DEEP_FIELD.family_fractions) == "thin_disk"]
    assert len(thin) >= 3
    for index in thin[:3]:
        spec = stamp.draw_stamp(2, index, preset="deep-field")
        assert 63 <= spec.galaxy["inclination_deg"] <= 90 and spec.galaxy["axis_ratio"] < 0.46
        # Observed through the sharper seeing, the disk still looks at most ~half as wide as long.
        assert second_moment_axis_ratio(stamp.render_stamp(spec).central) < 0.55
    seeing = np.array([stamp.draw_stamp(2, i, preset="deep-field").psf.fwhm_arcsec for i in range(60)])
    low, high = (DEEP_FIELD.psf_fwhm_factor * f for f in observing.PSF_FWHM_RANGE)
    assert low - 1e-4 <= seeing.min() and seeing.max() <= high + 1e-4
    assert np.median(seeing) == pytest.approx(DEEP_FIELD.psf_fwhm_factor * observing.PSF_FWHM_MEDIAN, rel=0.1)


def test_deep_field_radius_and_peak_follow_the_preset():
    from galaxyvae.simulation.presets import DEEP_FIELD

    for index in range(6):
        spec = stamp.draw_stamp(1, index, preset="deep-field")
        rendered = stamp.render_stamp(spec)
        r50_pix = spec.galaxy["half_light_radius_arcsec"] / observing.PIXEL_SCALE
        assert DEEP_FIELD.half_light_radius_pix[0] <= r50_pix <= DEEP_FIELD.half_light_radius_pix[1] + 1e-3
        peak = rendered.central.max() / observing.sky_sigma_nmgy(spec.sky_mag_arcsec2)
        assert peak == pytest.approx(spec.galaxy["peak_snr"], rel=0.02)
        assert rendered.central.sum() == pytest.approx(spec.galaxy["flux_nmgy"] * rendered.flux_scale, rel=0.05)


def test_bad_preset_names_the_option(tmp_path, capsys):
    with pytest.raises(InputError, match="--preset"):
        simulate_survey(tmp_path / "x.h5", n_images=4, n_held_out=1, preset="hubble")
    assert main(["simulate", "--preset", "hubble", "--n", "4", "--out", str(tmp_path / "y.h5")]) == 2
    assert "--preset" in capsys.readouterr().err


def test_deep_field_noise_is_sky_subtracted_and_correlated():
    # The noise is the noisy stamp minus its noiseless display, where the noiseless sky is empty.
    # For a Gaussian kernel of rms s the adjacent-pixel correlation is exp(-1 / (4 s^2)) = 0.68.
    noise, empty = [], []
    for index in range(4):
        spec = stamp.draw_stamp(2, index, preset="deep-field")
        noisy = stamp.render_stamp(spec).image.astype(np.float64)
        clean = stamp.render_stamp(spec, noise=False).image.astype(np.float64)
        noise.append(noisy - clean)
        empty.append(np.abs(clean) < 0.5)
    noise, empty = np.array(noise), np.array(empty)
    assert abs(np.median(noise[empty])) <= 0.5
    assert np.std(noise[empty]) == pytest.approx(4.0, rel=0.2)
    pairs = empty[:, :, :-1] & empty[:, :, 1:]
    a, b = noise[:, :, :-1][pairs], noise[:, :, 1:][pairs]
    assert np.corrcoef(a, b)[0, 1] == pytest.approx(np.exp(-1 / (4 * 0.8 ** 2)), abs=0.08)


def test_deep_field_asymmetry_is_added_to_its_share_of_galaxies_only():
    from dataclasses import replace as replace_spec

    from galaxyvae.simulation.presets import DEEP_FIELD

    specs = [stamp.draw_stamp(4, i, preset="deep-field") for i in range(80)]
    applied = [s for s in specs if s.galaxy["asymmetry"]["clump_fraction"] > 0]
    untouched = [s for s in specs if s.galaxy["asymmetry"]["clump_fraction"] == 0]
    # Binomial(80, share): outside this range with probability < 1e-3.
    assert 0.42 < len(applied) / len(specs) < 0.78 and DEEP_FIELD.asymmetry.share == 0.6
    assert all(s.galaxy["asymmetry"]["lopsidedness"] == 0 for s in untouched)
    for spec, changed in ((untouched[0], False), (applied[0], True)):
        without = replace_spec(spec, galaxy={k: v for k, v in spec.galaxy.items() if k != "asymmetry"})
        same = np.array_equal(stamp.render_stamp(spec).central, stamp.render_stamp(without).central)
        assert same != changed
