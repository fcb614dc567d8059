"""Ingestion of real-data formats into the data-set format: each source, the arithmetic, bad input, the CLI.

Every input is made here: tiny Galaxy Zoo JPEG folders with a solutions CSV, fake Galaxy10
SDSS and DECaLS files, FITS images and cubes, odd-sized PNGs, and scikit-image's Hubble
Deep Field picture (shipped with scikit-image, read offline).
"""

import logging
import math

import h5py
import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from galaxyvae.cli import main
from galaxyvae.dataset import read_dataset
from galaxyvae.errors import InputError, OutputExistsError
from galaxyvae.imaging import LUMINANCE_WEIGHTS
from galaxyvae.dataset import default_held_out
from galaxyvae.ingest import ingest
from galaxyvae.ingest.sources import GALAXY10_DECALS_CLASSES, GALAXY10_SDSS_CLASSES

HDF_STAMPS_KEPT = 106
"""Stamps --detect keeps from skimage's Hubble Deep Field picture with the default DetectionConfig
(measured; the tests allow +-10 for sep or scikit-image version drift)."""


# --- making inputs ---------------------------------------------------------------------------

def galaxy(shape, x=None, y=None, sigma=None, amplitude=180.0, sky=20.0, seed=0, channels=3):
    """A uint8 picture of an elliptical Gaussian galaxy on a noisy sky; (x, y) in array (row-from-top) pixels."""
    rng = np.random.default_rng(seed)
    height, width = shape
    x = width / 2 if x is None else x
    y = height / 2 if y is None else y
    sigma = min(shape) / 12 if sigma is None else sigma
    rows, cols = np.mgrid[:height, :width] + 0.5
    light = amplitude * np.exp(-0.5 * (((cols - x) / sigma) ** 2 + ((rows - y) / (0.6 * sigma)) ** 2))
    grey = np.clip(sky + light + rng.normal(0, 3, shape), 0, 255)
    if channels == 1:
        return grey.astype(np.uint8)
    tints = np.array([1.0, 0.85, 0.7])[:channels]
    return np.clip(grey[..., None] * tints, 0, 255).astype(np.uint8)


def save_picture(path, pixels, **kwargs):
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def galaxy_zoo_folder(folder, ids=(100008, 100023, 100053)):
    folder.mkdir(parents=True, exist_ok=True)
    for n, galaxy_id in enumerate(ids):
        save_picture(folder / f"{galaxy_id}.jpg", galaxy((424, 424), seed=n), quality=95)
    return folder


def solutions_csv(path, rows):
    lines = ["GalaxyID,Class1.1,Class1.2,Class1.3,Class2.1"]
    lines += [",".join([str(galaxy_id)] + [f"{v:g}" for v in votes]) for galaxy_id, votes in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def galaxy10_file(path, n=6, size=69, decals=False, keys=("images", "ans")):
    images = np.stack([galaxy((size, size), seed=i) for i in range(n)])
    with h5py.File(path, "w") as f:
        if "images" in keys:
            f["images"] = images
        if "ans" in keys:
            f["ans"] = np.arange(n) % 10
        if decals:
            f["ra"], f["dec"] = np.linspace(10, 20, n), np.linspace(-5, 5, n)
            f["redshift"], f["pxscale"] = np.linspace(0.01, 0.1, n), np.full(n, 0.262)
    return path, images


def fits_file(path, data, bunit="nanomaggy", scale_arcsec=0.396):
    header = fits.Header()
    if bunit:
        header["BUNIT"] = bunit
    if scale_arcsec:
        header.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=2.0, CRPIX1=1.0, CRPIX2=1.0,
                      CDELT1=-scale_arcsec / 3600, CDELT2=scale_arcsec / 3600, CUNIT1="deg", CUNIT2="deg")
    fits.PrimaryHDU(data=data, header=header).writeto(path)
    return path


def decoded_luminance(path):
    """What ingest should see: the decoded picture, first row at the bottom, as luminance."""
    pixels = np.asarray(Image.open(path))[::-1].astype(np.float64)
    return pixels @ np.asarray(LUMINANCE_WEIGHTS) if pixels.ndim == 3 else pixels


def quiet_ingest(paths, out, **kwargs):
    return ingest(paths, out, progress=False, **kwargs)


# --- Galaxy Zoo ------------------------------------------------------------------------------

def test_galaxy_zoo_folder_is_cropped_downscaled_and_joined_to_its_votes(tmp_path):
    folder = galaxy_zoo_folder(tmp_path / "images_training_rev1")
    labels = solutions_csv(tmp_path / "training_solutions_rev1.csv",
                           {100008: [0.2, 0.7, 0.1, 0.0], 100023: [0.9, 0.05, 0.05, 0.3], 999: [1, 0, 0, 0]})
    report = quiet_ingest([folder], tmp_path / "gz.h5", labels_csv=labels)
    data = read_dataset(tmp_path / "gz.h5")

    assert report.kept == 3 and report.kinds == {"galaxy-zoo": 3} and report.unlabelled == 1
    assert data.images.shape == (3, 69, 69) and data.images.dtype == np.float32
    assert data.attrs["source"] == "galaxy-zoo" and data.attrs["sky_subtracted"] is False
    assert data.attrs["pixel_units"].startswith("8-bit display level (0-255)")
    assert "not calibrated" in data.attrs["pixel_units"] and math.isnan(data.attrs["pixel_scale_arcsec"])
    meta = data.metadata
    assert list(meta["object_id"]) == ["100008", "100023", "100053"]
    np.testing.assert_array_equal(meta["crop_box"], [[108, 108, 315, 315]] * 3)
    np.testing.assert_array_equal(meta["original_shape"], [[424, 424]] * 3)
    np.testing.assert_allclose(meta["scale_factor"], 3.0)
    assert not meta["upsampled"].any()
    np.testing.assert_allclose(meta["Class1.2"][:2], [0.7, 0.05])
    np.testing.assert_allclose(meta["Class2.1"][:2], [0.0, 0.3])
    assert np.isnan(meta["Class1.1"][2]) and list(meta["has_labels"]) == [True, True, False]
    assert list(meta["family"]) == ["features or disk", "smooth", ""]


def test_galaxy_zoo_stamp_is_the_3x3_block_mean_of_the_central_207_pixels(tmp_path):
    folder = galaxy_zoo_folder(tmp_path / "gz", ids=(424242,))
    quiet_ingest([folder], tmp_path / "gz.h5")
    stamp = read_dataset(tmp_path / "gz.h5").images[0]
    source = decoded_luminance(folder / "424242.jpg")
    crop = source[108:315, 108:315]
    np.testing.assert_allclose(stamp, crop.reshape(69, 3, 69, 3).mean(axis=(1, 3)), rtol=1e-6)
    assert stamp.astype(np.float64).sum() * 9 == pytest.approx(crop.sum(), rel=1e-6)


def test_band_chooses_one_colour_channel(tmp_path):
    folder = galaxy_zoo_folder(tmp_path / "gz", ids=(7,))
    quiet_ingest([folder], tmp_path / "r.h5", band="r")
    data = read_dataset(tmp_path / "r.h5")
    red = np.asarray(Image.open(folder / "7.jpg"))[::-1, :, 0].astype(np.float64)[108:315, 108:315]
    np.testing.assert_allclose(data.images[0], red.reshape(69, 3, 69, 3).mean(axis=(1, 3)), rtol=1e-6)
    assert "red channel" in data.attrs["pixel_units"]


# --- Galaxy10 --------------------------------------------------------------------------------

def test_galaxy10_sdss_keeps_69_pixel_images_and_names_the_classes(tmp_path):
    path, images = galaxy10_file(tmp_path / "Galaxy10.h5", n=6)
    report = quiet_ingest([path], tmp_path / "g10.h5")
    data = read_dataset(tmp_path / "g10.h5")
    assert report.kinds == {"galaxy10-sdss": 6} and data.attrs["source"] == "galaxy10-sdss"
    expected = images[:, ::-1].astype(np.float64) @ np.asarray(LUMINANCE_WEIGHTS)
    np.testing.assert_allclose(data.images, expected, rtol=1e-6)
    assert list(data.metadata["label"]) == list(range(6))
    assert list(data.metadata["family"]) == list(GALAXY10_SDSS_CLASSES[:6])
    np.testing.assert_array_equal(data.metadata["crop_box"], [[0, 0, 69, 69]] * 6)


def test_galaxy10_decals_is_cropped_like_galaxy_zoo_with_its_pixel_scale_and_coordinates(tmp_path):
    path, _ = galaxy10_file(tmp_path / "Galaxy10_DECals.h5", n=4, size=256, decals=True)
    quiet_ingest([path], tmp_path / "decals.h5")
    data = read_dataset(tmp_path / "decals.h5")
    meta = data.metadata
    assert data.attrs["source"] == "galaxy10-decals"
    np.testing.assert_array_equal(meta["crop_box"], [[65, 65, 190, 190]] * 4)
    np.testing.assert_allclose(meta["pixel_scale_arcsec"], 0.262 * 125 / 69)
    assert data.attrs["pixel_scale_arcsec"] == pytest.approx(0.262 * 125 / 69)
    np.testing.assert_allclose(meta["ra"], np.linspace(10, 20, 4))
    np.testing.assert_allclose(meta["redshift"], np.linspace(0.01, 0.1, 4))
    assert list(meta["family"]) == list(GALAXY10_DECALS_CLASSES[:4])


def test_a_blank_image_inside_a_galaxy10_file_is_skipped_by_index(tmp_path):
    path, _ = galaxy10_file(tmp_path / "Galaxy10.h5", n=5)
    with h5py.File(path, "r+") as f:
        f["images"][2] = 0
    report = quiet_ingest([path], tmp_path / "out.h5")
    assert report.kept == 4
    assert report.skipped == [(f"{path}[2]", "is blank (every pixel equals 0)")]


# --- FITS and pictures -----------------------------------------------------------------------

def test_fits_cutout_keeps_its_units_and_wcs_pixel_scale(tmp_path):
    data = galaxy((138, 138), channels=1).astype(np.float32) * 0.01
    path = fits_file(tmp_path / "cutout.fits", data)
    quiet_ingest([path], tmp_path / "fits.h5")
    result = read_dataset(tmp_path / "fits.h5")
    assert result.attrs["pixel_units"] == "nanomaggy (FITS BUNIT)" and result.attrs["source"] == "fits"
    assert result.attrs["pixel_scale_arcsec"] == pytest.approx(0.396 * 2)
    np.testing.assert_allclose(result.images[0], data.reshape(69, 2, 69, 2).mean(axis=(1, 3)), rtol=1e-6)


def test_fits_cube_uses_the_plane_chosen_by_band(tmp_path):
    cube = np.stack([np.full((69, 69), float(k)) + galaxy((69, 69), channels=1, seed=k) for k in range(3)])
    path = fits_file(tmp_path / "cube.fits", cube.astype(np.float32), scale_arcsec=None)
    quiet_ingest([path], tmp_path / "plane.h5", band=2)
    result = read_dataset(tmp_path / "plane.h5")
    np.testing.assert_allclose(result.images[0], cube[2], rtol=1e-6)
    assert result.attrs["pixel_units"] == "nanomaggy (FITS BUNIT)"
    assert math.isnan(result.attrs["pixel_scale_arcsec"])


def test_png_of_odd_size_is_centred_on_its_galaxy_and_enlarged_with_a_flag(tmp_path):
    path = save_picture(tmp_path / "odd.png", galaxy((50, 90), x=60, y=25, sigma=4, channels=1))
    quiet_ingest([path], tmp_path / "png.h5")
    data = read_dataset(tmp_path / "png.h5")
    meta = data.metadata
    np.testing.assert_array_equal(meta["original_shape"], [[50, 90]])
    y0, x0, y1, x1 = meta["crop_box"][0]
    assert (y0, y1, x1 - x0) == (0, 50, 50) and abs((x0 + x1) / 2 - 60) <= 1
    assert meta["upsampled"][0] and meta["scale_factor"][0] == pytest.approx(50 / 69)
    peak_row, peak_col = np.unravel_index(np.argmax(data.images[0]), (69, 69))
    assert abs(peak_row - 34) <= 2 and abs(peak_col - 34) <= 2


def test_grey_and_colour_pictures_share_units_and_mix(tmp_path):
    grey = save_picture(tmp_path / "grey.png", galaxy((80, 80), channels=1))
    colour = save_picture(tmp_path / "colour.png", galaxy((80, 80)))
    report = quiet_ingest([grey, colour], tmp_path / "mixed.h5")
    assert report.kept == 2 and report.kinds == {"picture": 2}


def test_folders_are_searched_recursively_and_other_files_ignored(tmp_path):
    folder = tmp_path / "cutouts"
    (folder / "deeper").mkdir(parents=True)
    save_picture(folder / "a.png", galaxy((40, 40)))
    save_picture(folder / "deeper" / "b.png", galaxy((40, 40), seed=1))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")
    report = quiet_ingest([folder], tmp_path / "out.h5")
    assert report.kept == 2 and report.ignored == 1 and report.skipped == []


def test_different_pixel_units_are_refused_and_nothing_is_written(tmp_path):
    picture = save_picture(tmp_path / "a.png", galaxy((80, 80)))
    cutout = fits_file(tmp_path / "b.fits", galaxy((80, 80), channels=1).astype(np.float32))
    with pytest.raises(InputError, match="different pixel units"):
        quiet_ingest([picture, cutout], tmp_path / "out.h5")
    assert list(tmp_path.glob("*.h5")) == [] and list(tmp_path.glob(".*tmp")) == []


# --- bad input -------------------------------------------------------------------------------

def _junk(path):
    path.write_bytes(b"this is not an image file at all" * 10)
    return path


def _empty(path):
    path.write_bytes(b"")
    return path


def _truncated(path, writer):
    writer(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _fits_with(value):
    def make(path):
        data = galaxy((40, 40), channels=1).astype(np.float32)
        data[5, 7] = value
        return fits_file(path, data)
    return make


BAD_INPUTS = {
    "unreadable picture": ("junk.png", _junk, "is empty or not a readable PNG/JPEG image"),
    "truncated JPEG": ("cut.jpg", lambda p: _truncated(p, lambda q: save_picture(q, galaxy((200, 200)))),
                       "cannot be decoded (image file is truncated"),
    "truncated FITS": ("cut.fits", lambda p: _truncated(p, lambda q: fits_file(q, np.ones((100, 100), np.float32))),
                       "is truncated or not a readable FITS file"),
    "truncated HDF5": ("cut.h5", lambda p: _truncated(p, lambda q: galaxy10_file(q, n=20)), "not a readable HDF5"),
    "empty JPEG": ("empty.jpg", _empty, "is empty or not a readable"),
    "empty FITS": ("empty.fits", _empty, "is truncated or not a readable FITS file"),
    "empty HDF5": ("empty.h5", _empty, "is not a readable HDF5 file"),
    "NaN pixels": ("nan.fits", _fits_with(np.nan), "has 1 non-finite (NaN or Inf) pixel"),
    "Inf pixels": ("inf.fits", _fits_with(np.inf), "has 1 non-finite (NaN or Inf) pixel"),
    "blank picture": ("blank.png", lambda p: save_picture(p, np.full((60, 60), 17, np.uint8)),
                      "is blank (every pixel equals 17)"),
    "1-D FITS": ("line.fits", lambda p: fits_file(p, np.arange(50.0), scale_arcsec=None), "holds a 1-D array"),
    "4-D FITS": ("hyper.fits", lambda p: fits_file(p, np.ones((2, 2, 20, 20)), scale_arcsec=None),
                 "holds a 4-D array"),
    "FITS cube without --band": ("cube.fits", lambda p: fits_file(p, np.ones((3, 20, 20)), scale_arcsec=None),
                                 "is a cube of 3 planes and no --band given"),
    "tiny picture": ("tiny.png", lambda p: save_picture(p, galaxy((8, 8))), "is only 8x8 pixels"),
    "wrong Galaxy10 shape": ("shape.h5", lambda p: galaxy10_file(p, size=32), "'images' has shape (6, 32, 32, 3)"),
    "wrong HDF5 keys": ("keys.h5", lambda p: galaxy10_file(p, keys=("images",)), "needs 'images' and 'ans'"),
    "unsupported type": ("table.csv", lambda p: p.write_text("a,b\n1,2\n"), "is not a supported file type"),
    "missing path": ("nowhere.png", lambda p: None, "no such file or folder"),
    "empty folder": ("empty_folder", lambda p: p.mkdir(), "folder holds no PNG, JPEG, FITS or HDF5 files"),
}


@pytest.fixture
def good_picture(tmp_path):
    return save_picture(tmp_path / "good.png", galaxy((80, 80)))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_with_a_logged_reason_naming_it(case, tmp_path, good_picture, caplog):
    name, make, reason = BAD_INPUTS[case]
    bad = tmp_path / name
    make(bad)
    with caplog.at_level(logging.WARNING, logger="galaxyvae.ingest"):
        report = quiet_ingest([good_picture, bad], tmp_path / "out.h5")
    assert report.kept == 1
    assert [file for file, _ in report.skipped] == [str(bad)]
    assert reason in report.skipped[0][1]
    assert f"skipped {bad}: " in caplog.text
    assert str(bad) in report.summary() and read_dataset(tmp_path / "out.h5").images.shape == (1, 69, 69)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_strict_mode_stops_at_the_first_bad_input_and_writes_nothing(case, tmp_path, good_picture):
    name, make, reason = BAD_INPUTS[case]
    bad = tmp_path / name
    make(bad)
    with pytest.raises(InputError) as caught:
        quiet_ingest([good_picture, bad], tmp_path / "out.h5", strict=True)
    assert str(bad) in str(caught.value) and reason in str(caught.value)
    assert not (tmp_path / "out.h5").exists()


def test_nothing_valid_is_an_error_and_writes_nothing(tmp_path):
    bad = [_junk(tmp_path / "a.png"), tmp_path / "missing.fits"]
    with pytest.raises(InputError, match="no usable images in the inputs \\(2 skipped\\)"):
        quiet_ingest(bad, tmp_path / "out.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_an_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    picture = save_picture(tmp_path / "a.png", galaxy((80, 80)))

    def must_not_read(*args, **kwargs):
        raise AssertionError("inputs were read before the output was checked")

    monkeypatch.setattr("galaxyvae.ingest.core.read_input", must_not_read)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quiet_ingest([picture], out)
    assert out.read_bytes() == b"precious"
    monkeypatch.undo()
    quiet_ingest([picture, out], out, overwrite=True)
    assert read_dataset(out).images.shape == (1, 69, 69)


def test_a_failure_while_writing_leaves_no_file_behind(tmp_path, monkeypatch):
    picture = save_picture(tmp_path / "a.png", galaxy((80, 80)))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("galaxyvae.dataset._write_column", disk_full)
    with pytest.raises(OSError, match="No space"):
        quiet_ingest([picture], tmp_path / "out.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_invalid_options_fail_before_reading(tmp_path):
    picture = save_picture(tmp_path / "a.png", galaxy((80, 80)))
    with pytest.raises(InputError, match="--band"):
        quiet_ingest([picture], tmp_path / "o.h5", band="ultraviolet")
    with pytest.raises(InputError, match="no such labels file"):
        quiet_ingest([picture], tmp_path / "o.h5", labels_csv=tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("id,Class1.1\n1,0.5\n")
    with pytest.raises(InputError, match="no GalaxyID column"):
        quiet_ingest([picture], tmp_path / "o.h5", labels_csv=tmp_path / "bad.csv")
    (tmp_path / "votes.csv").write_text("GalaxyID,Class1.1\n1,lots\n")
    with pytest.raises(InputError, match="votes.csv, line 2"):
        quiet_ingest([picture], tmp_path / "o.h5", labels_csv=tmp_path / "votes.csv")
    with pytest.raises(InputError, match="folder"):
        quiet_ingest([picture], tmp_path / "no" / "o.h5")
    assert not list(tmp_path.glob("*.h5"))


def test_detect_refuses_galaxy10_files(tmp_path, good_picture):
    path, _ = galaxy10_file(tmp_path / "Galaxy10.h5")
    report = quiet_ingest([path, good_picture], tmp_path / "o.h5", detect=True)
    assert report.skipped[0][0] == str(path) and "--detect works on single large images" in report.skipped[0][1]


# --- split and provenance --------------------------------------------------------------------

def test_default_held_out_is_1000_or_a_fifth_of_small_sets():
    assert default_held_out(44_444) == 1000 and default_held_out(5000) == 1000
    assert default_held_out(4999) == 999 and default_held_out(10) == 2 and default_held_out(1) == 0


def test_split_and_provenance_are_recorded(tmp_path):
    pictures = [save_picture(tmp_path / f"g{i}.png", galaxy((60, 60), seed=i)) for i in range(10)]
    report = quiet_ingest(pictures + [tmp_path / "gone.png"], tmp_path / "a.h5", seed=3)
    data = read_dataset(tmp_path / "a.h5")
    assert (report.n_held_out, report.n_train) == (2, 8) and int(data.held_out.sum()) == 2
    assert data.attrs["seed"] == 3
    record = data.provenance["ingest"]
    assert record["kept"] == 10 and record["skipped"] == 1 and record["files_read"] == 10
    assert record["skipped_inputs"] == [[str(tmp_path / "gone.png"), "no such file or folder"]]
    assert record["inputs"][0] == str(pictures[0].resolve()) and record["options"]["seed"] == 3
    assert record["options"]["n_held_out"] == 2 and "luminance" in record["colour_rule"]
    again = quiet_ingest(pictures, tmp_path / "b.h5", seed=3, n_held_out=4)
    assert again.n_held_out == 4
    with pytest.raises(InputError, match="only 10 images were kept"):
        quiet_ingest(pictures, tmp_path / "c.h5", n_held_out=10)
    assert not (tmp_path / "c.h5").exists()


# --- command line ----------------------------------------------------------------------------

def test_cli_ingests_a_galaxy_zoo_folder_and_refuses_to_overwrite(tmp_path, capsys):
    folder = galaxy_zoo_folder(tmp_path / "gz")
    labels = solutions_csv(tmp_path / "solutions.csv", {100008: [0.2, 0.7, 0.1, 0.0]})
    out = tmp_path / "gz.h5"
    assert main(["-q", "ingest", str(folder), "--out", str(out), "--labels", str(labels), "--seed", "1"]) == 0
    assert "ingested 3 images (3 galaxy-zoo)" in capsys.readouterr().out
    assert read_dataset(out).attrs["seed"] == 1
    assert main(["-q", "ingest", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err and "--overwrite" in err
    assert main(["-q", "ingest", str(folder), "--out", str(out), "--overwrite", "--held-out", "1"]) == 0


def test_cli_strict_reports_the_bad_file_in_one_line(tmp_path, capsys):
    good = save_picture(tmp_path / "good.png", galaxy((80, 80)))
    bad = _junk(tmp_path / "bad.png")
    assert main(["-q", "ingest", str(good), str(bad), "--out", str(tmp_path / "o.h5"), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("galaxyvae ingest: error: ") and str(bad) in err and err.count("\n") == 0


# --- many galaxies in one image: the Hubble Deep Field ----------------------------------------

@pytest.fixture(scope="module")
def hubble_deep_field(tmp_path_factory):
    """scikit-image's Hubble eXtreme Deep Field picture written as a PNG, and its data set made by --detect."""
    from skimage import data

    folder = tmp_path_factory.mktemp("hdf")
    png = save_picture(folder / "hubble_deep_field.png", data.hubble_deep_field())
    report = ingest([png], folder / "hdf.h5", detect=True, progress=False)
    return png, report, read_dataset(folder / "hdf.h5")


def test_detect_keeps_a_plausible_number_of_hubble_deep_field_galaxies(hubble_deep_field):
    png, report, data = hubble_deep_field
    assert abs(report.kept - HDF_STAMPS_KEPT) <= 10
    counts = report.detections[str(png)]
    assert counts["detections"] > 5 * report.kept  # most detections are small, faint or crowded
    assert counts["kept"] == report.kept and sum(counts["rejected"].values()) + report.kept == counts["detections"]
    assert data.attrs["sky_subtracted"] is True and data.attrs["source"] == "detected"
    assert "minus the sep background" in data.attrs["pixel_units"] and math.isnan(data.attrs["pixel_scale_arcsec"])


def test_hubble_deep_field_stamps_are_centred_extended_sources_inside_the_image(hubble_deep_field):
    _, _, data = hubble_deep_field
    meta = data.metadata
    assert (meta["half_light_radius_px"] >= 3).all()
    assert ((meta["ellipticity"] >= 0) & (meta["ellipticity"] < 1)).all()
    boxes = meta["crop_box"]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 872).all() and (boxes[:, 3] <= 1000).all()
    np.testing.assert_allclose(meta["scale_factor"], 10 * meta["half_light_radius_px"] / 69, rtol=1e-9)
    np.testing.assert_array_equal(meta["upsampled"], meta["scale_factor"] < 1)
    rows, cols = np.mgrid[:69, :69]
    offsets = []
    for stamp in data.images:
        core = np.clip(stamp, 0, None) * (np.hypot(rows - 34, cols - 34) < 12)
        offsets.append(np.hypot(*(np.array([(core * rows).sum(), (core * cols).sum()]) / core.sum() - 34)))
    assert np.median(offsets) < 0.5 and np.percentile(offsets, 90) < 1.5  # measured 0.18 and 0.81 px


def test_the_documented_sample_path_gives_the_same_stamps(hubble_deep_field, tmp_path):
    _, report, data = hubble_deep_field
    again = ingest(["skimage:hubble_deep_field"], tmp_path / "hdf.h5", detect=True, progress=False)
    assert again.kept == report.kept
    np.testing.assert_array_equal(read_dataset(tmp_path / "hdf.h5").images, data.images)


def test_detect_on_a_fits_field_masks_nan_borders_and_records_the_pixel_scale(tmp_path):
    from skimage import data

    luminance = data.hubble_deep_field()[::-1].astype(np.float32) @ np.asarray(LUMINANCE_WEIGHTS, np.float32)
    field = luminance[:436, :500].copy()
    field[:, :40] = np.nan  # an unobserved strip, as at a mosaic's edge
    path = fits_file(tmp_path / "field.fits", field, bunit="count", scale_arcsec=0.06)
    report = quiet_ingest([path], tmp_path / "field.h5", detect=True)
    result = read_dataset(tmp_path / "field.h5")
    assert report.kept >= 10 and result.attrs["sky_subtracted"] is True
    assert (result.metadata["crop_box"][:, 1] >= 40).all()
    assert result.attrs["pixel_units"] == "count (FITS BUNIT), minus the sep background"
    np.testing.assert_allclose(result.metadata["pixel_scale_arcsec"], 0.06 * result.metadata["scale_factor"])


def test_detect_skips_fields_without_usable_pixels_or_galaxies(tmp_path, good_picture):
    empty = fits_file(tmp_path / "nan.fits", np.full((100, 100), np.nan, np.float32))
    sky = save_picture(tmp_path / "sky.png", galaxy((200, 200), amplitude=0))
    report = quiet_ingest([empty, sky, good_picture], tmp_path / "o.h5", detect=True)
    reasons = dict(report.skipped)
    assert reasons[str(empty)] == "holds no finite pixels"
    assert reasons[str(sky)].startswith("has no resolved extended sources to keep")


def test_kinds_with_the_same_units_mix_and_missing_columns_are_filled(tmp_path):
    folder = galaxy_zoo_folder(tmp_path / "gz", ids=(5,))
    labels = solutions_csv(tmp_path / "solutions.csv", {5: [0.1, 0.8, 0.1, 0.5]})
    decals, _ = galaxy10_file(tmp_path / "Galaxy10_DECals.h5", n=2, size=256, decals=True)
    report = quiet_ingest([folder, decals], tmp_path / "mixed.h5", labels_csv=labels)
    data = read_dataset(tmp_path / "mixed.h5")
    meta = data.metadata
    assert report.kinds == {"galaxy-zoo": 1, "galaxy10-decals": 2}
    assert data.attrs["source"] == "galaxy-zoo+galaxy10-decals" and math.isnan(data.attrs["pixel_scale_arcsec"])
    assert list(meta["label"]) == [-1, 0, 1] and np.isnan(meta["ra"][0]) and meta["Class1.2"][0] == 0.8
    assert np.isnan(meta["Class1.2"][1:]).all() and list(meta["has_labels"]) == [True, False, False]
    assert list(meta["family"]) == ["features or disk", "Disturbed", "Merging"]
