import csv

import numpy as np
import pytest
from scipy import ndimage, optimize, special, stats

from galaxyvae.cli import main
from galaxyvae.config import ModelConfig, TrainConfig
from galaxyvae.dataset import DatasetError, read_dataset
from galaxyvae.errors import OutputExistsError
from galaxyvae.morphology import (QUANTITIES, STATISTICS, MorphologyConfig, MorphologyError, compare_morphology,
                                  measure_morphology, model_sample, read_data_sample, summarize_sample)
from galaxyvae.runs import load_run
from galaxyvae.training import train
from tests.helpers import write_blob_dataset

SIZE = 69
CENTRE = (SIZE - 1) / 2


def sersic_image(n: float, r_e: float, peak: float = 400.0, psf_sigma: float = 1.2, q: float = 1.0,
                 oversample: int = 5) -> np.ndarray:
    """A noiseless circular (or elliptical, axis ratio q) Sersic profile of index n and half-light radius
    r_e pixels, pixel-integrated by oversampling, blurred by a Gaussian PSF, scaled to ``peak``."""
    b = special.gammaincinv(2 * n, 0.5)
    offsets = (np.arange(SIZE * oversample) + 0.5) / oversample - 0.5 - CENTRE
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    profile = np.exp(-b * (np.hypot(x, y / q) / r_e) ** (1 / n))
    image = profile.reshape(SIZE, oversample, SIZE, oversample).mean(axis=(1, 3))
    image = ndimage.gaussian_filter(image, psf_sigma)
    return peak * image / image.max()


def gaussian_image(sigma: float, peak: float = 1000.0, centre=(CENTRE, CENTRE)) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE]
    return peak * np.exp(-((x - centre[1]) ** 2 + (y - centre[0]) ** 2) / (2 * sigma ** 2))


def noisy(*images: np.ndarray, seed: int = 0, sigma: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stack = np.stack(images)
    return stack + rng.normal(0, sigma, stack.shape)


def gaussian_concentration(eta: float = 0.2, extent: float = 1.5) -> float:
    """C = 5 log10(r80 / r20) of a circular Gaussian by statmorph's definition: the Petrosian radius
    r_p where I(r) / <I>(<r) = eta, the total flux taken within extent x r_p."""
    # With x = r^2 / (2 sigma^2): I(r) / <I>(<r) = x e^-x / (1 - e^-x), enclosed fraction 1 - e^-x.
    x_petro = optimize.brentq(lambda x: x * np.exp(-x) / (1 - np.exp(-x)) - eta, 1e-6, 50)
    total = 1 - np.exp(-extent ** 2 * x_petro)
    radius = lambda fraction: np.sqrt(-np.log(1 - fraction * total))  # in units of sigma * sqrt(2)
    return 5 * np.log10(radius(0.8) / radius(0.2))


# --- measurements with known answers --------------------------------------------------------------------

def test_gaussian_blob_has_its_analytic_concentration_and_no_asymmetry():
    sigma = 4.0
    result = measure_morphology(noisy(gaussian_image(sigma), gaussian_image(sigma), seed=1))
    assert result.n_failed == 0 and (result.flag == 0).all()
    np.testing.assert_allclose(result.values["concentration"], gaussian_concentration(), atol=0.02)
    assert np.all(np.abs(result.values["asymmetry"]) < 0.01)
    np.testing.assert_allclose(result.values["rhalf_px"], sigma * np.sqrt(2 * np.log(2)), rtol=0.01)
    np.testing.assert_allclose(result.values["peak_snr"], 1000.0, rtol=0.05)  # noise 1 estimated from the border
    assert (result.values["has_neighbour"] == 0).all()


def test_more_concentrated_sersic_has_higher_concentration_and_gini_and_lower_m20():
    result = measure_morphology(noisy(sersic_image(1.0, 5.0), sersic_image(4.0, 5.0), seed=2))
    assert result.n_failed == 0
    disk, spheroid = ({q: result.values[q][i] for q in QUANTITIES} for i in (0, 1))
    assert spheroid["concentration"] > disk["concentration"] + 0.5
    assert spheroid["gini"] > disk["gini"] + 0.05
    assert spheroid["m20"] < disk["m20"] - 0.1


def test_rotated_copies_have_the_same_statistics():
    image = noisy(sersic_image(2.0, 4.0, q=0.5), seed=3)[0] + noisy(gaussian_image(1.5, 60, (40, 30)), seed=4)[0]
    stack = np.stack([image, np.rot90(image, 2), np.rot90(image, 1)])
    result = measure_morphology(stack, MorphologyConfig(scaling="image"))
    assert result.n_failed == 0
    for quantity in ("concentration", "gini", "m20", "rhalf_px", "peak_snr"):
        np.testing.assert_allclose(result.values[quantity], result.values[quantity][0], rtol=1e-6)
    # The background terms of A and S come from a sky box that statmorph searches from one corner.
    for quantity in ("asymmetry", "smoothness"):
        np.testing.assert_allclose(result.values[quantity], result.values[quantity][0], atol=0.01)


def test_pixel_units_and_sky_offset_do_not_change_the_statistics():
    stack = noisy(sersic_image(1.5, 4.0), sersic_image(3.0, 6.0), seed=5)
    plain = measure_morphology(stack)
    converted = measure_morphology(250.0 * stack + 7.0)
    for quantity in QUANTITIES:
        np.testing.assert_allclose(converted.values[quantity], plain.values[quantity], rtol=1e-7, atol=1e-9)


def test_a_lopsided_galaxy_is_asymmetric():
    symmetric = sersic_image(1.0, 5.0)
    lopsided = symmetric + gaussian_image(2.0, 150, (CENTRE + 6, CENTRE + 4))
    result = measure_morphology(noisy(symmetric, lopsided, seed=6))
    assert abs(result.values["asymmetry"][0]) < 0.02
    assert result.values["asymmetry"][1] > 0.1


def test_a_separate_neighbour_is_masked_and_counted():
    galaxy = sersic_image(1.0, 4.0)
    neighbour = gaussian_image(2.0, 300, (CENTRE, CENTRE + 22))
    result = measure_morphology(noisy(galaxy, galaxy + neighbour, seed=7))
    np.testing.assert_array_equal(result.values["has_neighbour"], [0, 1])
    assert result.n_failed == 0
    for quantity in ("concentration", "gini", "m20"):
        assert abs(result.values[quantity][1] - result.values[quantity][0]) < 0.05


def test_blank_and_pure_noise_images_fail_as_nan_and_are_counted():
    galaxy = sersic_image(1.0, 4.0)
    with_blank = noisy(galaxy, galaxy, np.zeros((SIZE, SIZE)), seed=8)
    with_blank[2] = 0.0
    with_noise = noisy(galaxy, np.zeros((SIZE, SIZE)), seed=9)
    for stack in (with_blank, with_noise):
        result = measure_morphology(stack)
        failed = np.arange(len(stack)) == len(stack) - 1
        np.testing.assert_array_equal(result.failed, failed)
        assert result.n_failed == 1 and result.failure_fraction == pytest.approx(1 / len(stack))
        for quantity in STATISTICS:
            assert np.isfinite(result.values[quantity][~failed]).all() and np.isnan(result.values[quantity][-1])
        assert result.flag[-1] == -1 and "no significant source" in result.reason[-1]


def test_summaries_leave_out_failures_and_measure_ks_on_the_rest():
    a = measure_morphology(noisy(sersic_image(1.0, 4.0), sersic_image(1.5, 5.0), sersic_image(2.0, 3.0),
                                 np.zeros((SIZE, SIZE)), seed=9))
    b = measure_morphology(noisy(sersic_image(3.0, 4.0), sersic_image(4.0, 5.0), seed=10))
    summary = summarize_sample("a", a, reference=b, pair=("b", b))
    finite = a.values["gini"][:3]
    assert summary.n_failed == 1 and summary.failure_fraction == pytest.approx(0.25)
    assert summary.median["gini"] == pytest.approx(np.median(finite))
    assert summary.p16["gini"] == pytest.approx(np.percentile(finite, 16))
    expected = stats.ks_2samp(finite, b.values["gini"])
    assert summary.ks["gini"] == pytest.approx(expected.statistic)
    assert summary.ks_pair_p["gini"] == pytest.approx(expected.pvalue)


def test_bad_image_stacks_are_rejected():
    with pytest.raises(MorphologyError, match=r"\(N, S, S\)"):
        measure_morphology(np.zeros((SIZE, SIZE)))
    with pytest.raises(MorphologyError, match="NaN"):
        measure_morphology(np.full((1, SIZE, SIZE), np.nan))


# --- comparison files and the command line ----------------------------------------------------------------

def test_compare_morphology_writes_the_figure_and_tables_and_refuses_to_overwrite(tmp_path):
    samples = {"flat": noisy(sersic_image(1.0, 4.0), sersic_image(1.0, 6.0), seed=11),
               "cuspy": noisy(sersic_image(4.0, 4.0), sersic_image(4.0, 6.0), np.zeros((SIZE, SIZE)), seed=12)}
    families = {"cuspy": np.array(["x", "x", "y"])}
    comparison = compare_morphology(samples, tmp_path / "out", reference="flat", families=families,
                                    pairs={"cuspy": "flat"}, notes={"flat": "disks"})
    for path in comparison.paths.values():
        assert path.stat().st_size > 0
    assert comparison.paths["morphology.png"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(comparison.paths["morphology.csv"].open()))
    assert [row["sample"] for row in rows] == ["flat", "cuspy", "cuspy / x", "cuspy / y"]
    cuspy = rows[1]
    assert cuspy["n_failed"] == "1" and float(cuspy["failure_fraction"]) == pytest.approx(1 / 3)
    assert float(cuspy["concentration_median"]) > float(rows[0]["concentration_median"])
    assert cuspy["paired_with"] == "flat" and float(cuspy["gini_ks"]) == 1.0
    per_image = list(csv.DictReader(comparison.paths["morphology_per_image.csv"].open()))
    assert len(per_image) == 5 and per_image[-1]["failure"].startswith("no significant source")
    markdown = comparison.paths["morphology.md"].read_text()
    assert "**flat**: disks" in markdown and "| cuspy / y | 1 | 1 (100%) |" in markdown
    with pytest.raises(OutputExistsError, match="morphology"):
        compare_morphology(samples, tmp_path / "out")
    compare_morphology({"flat": samples["flat"]}, tmp_path / "out", overwrite=True)


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("morphology")
    data = write_blob_dataset(folder / "blobs.h5", n=32, n_held_out=8)
    config = TrainConfig(epochs=2, batch_size=8, compile="off", threads=1, device="cpu", model=ModelConfig(hidden=16))
    return train(data, folder / "run", config, progress=False), data


def test_model_samples_are_noisy_draws_from_the_decoder_and_repeat_by_seed(blob_run):
    run_dir, data = blob_run
    first, again, other = (model_sample(run_dir, 40, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.allclose(first.images, other.images)
    z = np.random.default_rng(3).standard_normal((40, load_run(run_dir).latent_dim)).astype(np.float32)
    mean, variance = load_run(run_dir).decode(z)
    standardised = (first.images - mean) / np.sqrt(variance)
    assert abs(standardised.mean()) < 0.02 and standardised.std() == pytest.approx(1.0, abs=0.02)
    assert first.data_path.resolve() == data.resolve()


def test_aggregate_posterior_samples_draw_z_from_q_of_training_images(blob_run):
    run_dir, data = blob_run
    sample = model_sample(run_dir, 40, 3, latents="aggregate")
    np.testing.assert_array_equal(model_sample(run_dir, 40, 3, latents="aggregate").images, sample.images)
    assert not np.allclose(sample.images, model_sample(run_dir, 40, 3).images)
    # The documented draws: 40 of the 24 training images (so with replacement), z ~ q(z|x), x ~ N(f_mu, f_sigma).
    model, rng = load_run(run_dir), np.random.default_rng(3)
    training = read_dataset(data, split="train").images
    q_mean, q_variance = model.encode(training[rng.choice(len(training), size=40, replace=True)])
    z = (q_mean + np.sqrt(q_variance) * rng.standard_normal(q_mean.shape)).astype(np.float32)
    mean, variance = model.decode(z)
    standardised = (sample.images - mean) / np.sqrt(variance)
    assert abs(standardised.mean()) < 0.02 and standardised.std() == pytest.approx(1.0, abs=0.02)
    assert "q(z|x) of training images" in sample.note


def test_aggregate_posterior_samples_need_the_training_data(tmp_path, capsys):
    data = write_blob_dataset(tmp_path / "gone.h5", n=12, n_held_out=2)
    config = TrainConfig(epochs=1, batch_size=8, compile="off", threads=1, device="cpu", model=ModelConfig(hidden=8))
    run_dir = train(data, tmp_path / "run", config, progress=False)
    data.unlink()
    with pytest.raises(MorphologyError, match="gone.h5 is not there"):
        model_sample(run_dir, 4, latents="aggregate")
    assert model_sample(run_dir, 4).images.shape == (4, SIZE, SIZE)  # the prior needs no data
    with pytest.raises(MorphologyError, match="latents must be one of prior, aggregate"):
        model_sample(run_dir, 4, latents="posterior")
    assert main(["morphology", "--run", str(run_dir), "--latents", "aggregate", "--out", str(tmp_path / "o")]) == 2
    assert "needs the run's training data" in capsys.readouterr().err


def test_read_data_sample_draws_without_replacement_by_seed(tmp_path):
    path = write_blob_dataset(tmp_path / "d.h5", n=20, n_held_out=4)
    sample = read_data_sample(path, 8, seed=1)
    assert sample.images.shape == (8, SIZE, SIZE) and sample.name == "d"
    assert len({image.tobytes() for image in sample.images}) == 8
    np.testing.assert_array_equal(read_data_sample(path, 8, seed=1).images, sample.images)
    assert read_data_sample(path, 100, seed=1).images.shape[0] == 20
    assert set(sample.families) <= {"blob-a", "blob-b"}


def test_cli_writes_the_comparison_and_refuses_to_overwrite(blob_run, tmp_path, capsys):
    run_dir, data = blob_run
    out = tmp_path / "morph"
    argv = ["morphology", f"blobs={data}", "--run", f"vae={run_dir}", "--out", str(out), "--n", "6", "--seed", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| blobs / blob-a |" in printed and "| vae | blobs |" in printed
    for name in ("morphology.png", "morphology.md", "morphology.csv", "morphology_per_image.csv",
                 "morphology_families.png"):
        assert (out / name).is_file()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--no-families"]) == 0


def test_cli_bad_inputs_name_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.h5"
    assert main(["morphology", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"{missing}: no such data-set file" in capsys.readouterr().err
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    assert main(["morphology", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert f"{junk}: not a readable HDF5 file" in capsys.readouterr().err
    assert main(["morphology", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path}: not a run directory" in capsys.readouterr().err
    data = write_blob_dataset(tmp_path / "d.h5", n=10, n_held_out=2)
    assert main(["morphology", str(data), str(data), "--out", str(tmp_path / "o")]) == 2
    assert "two samples are named 'd'" in capsys.readouterr().err
    with pytest.raises(DatasetError):
        read_data_sample(junk, 3)
