import h5py
import numpy as np
import pytest

from galaxyvae.dataset import DatasetError, choose_held_out, read_dataset, summarize, write_dataset
from galaxyvae.errors import OutputExistsError
from tests.helpers import gaussian_blobs, write_blob_dataset

ATTRS = {"source": "t", "pixel_units": "u", "pixel_scale_arcsec": 0.396, "sky_subtracted": True}


def test_round_trip_keeps_images_split_metadata_and_provenance(tmp_path):
    path = write_blob_dataset(tmp_path / "d.h5", n=30, n_held_out=6)
    ds = read_dataset(path)
    assert ds.images.shape == (30, 69, 69) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.images, gaussian_blobs(30, 0))
    assert ds.held_out.sum() == 6
    assert ds.metadata["family"][0] == "blob-a"
    assert ds.metadata["crop_box"].shape == (30, 4)
    assert ds.metadata["original_shape"].shape == (30, 2)
    assert ds.attrs["pixel_units"] == "arbitrary" and ds.attrs["seed"] == 0
    assert ds.provenance == {"made_by": "tests.helpers"}
    assert ds.attrs["n_held_out"] == 6


def test_reading_one_split(tmp_path):
    path = write_blob_dataset(tmp_path / "d.h5", n=30, n_held_out=6)
    full = read_dataset(path)
    held = read_dataset(path, split="held_out")
    train = read_dataset(path, split="train")
    assert len(held) == 6 and len(train) == 24
    np.testing.assert_array_equal(held.images, full.images[full.held_out])
    np.testing.assert_array_equal(train.metadata["object_id"], full.metadata["object_id"][~full.held_out])


def test_held_out_choice_is_reproducible_and_sized():
    a, b = choose_held_out(100, 10, seed=3), choose_held_out(100, 10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 10
    assert not np.array_equal(a, choose_held_out(100, 10, seed=4))
    with pytest.raises(ValueError, match="cannot hold out 100 of 100"):
        choose_held_out(100, 100, seed=0)


def test_existing_file_is_not_replaced_without_overwrite(tmp_path):
    path = write_blob_dataset(tmp_path / "d.h5", n=10, n_held_out=2)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        write_blob_dataset(path, n=12, n_held_out=2)
    assert path.read_bytes() == before
    write_blob_dataset(path, n=12, n_held_out=2, overwrite=True)
    assert len(read_dataset(path)) == 12


@pytest.mark.parametrize("images, message", [
    (np.zeros((3, 64, 64)), r"expected shape \(N, 69, 69\)"),
    (np.zeros((0, 69, 69)), "holds no images"),
    (np.full((3, 69, 69), np.nan), "NaN or Inf"),
])
def test_bad_images_are_refused_and_nothing_is_written(tmp_path, images, message):
    with pytest.raises(DatasetError, match=message):
        write_dataset(tmp_path / "d.h5", images, np.zeros(len(images), bool), ATTRS)
    assert list(tmp_path.iterdir()) == []


def test_metadata_with_wrong_length_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="'family' has 2 rows, expected 3"):
        write_dataset(tmp_path / "d.h5", np.zeros((3, 69, 69)), np.zeros(3, bool), ATTRS,
                      metadata={"family": ["a", "b"]})


def test_missing_attributes_are_named(tmp_path):
    with pytest.raises(DatasetError, match="pixel_units"):
        write_dataset(tmp_path / "d.h5", np.zeros((3, 69, 69)), np.zeros(3, bool), {"source": "x"})


def test_reading_bad_files_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match="no such data-set file"):
        read_dataset(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetError, match="junk.h5: not a readable HDF5 file"):
        read_dataset(junk)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["images"] = np.zeros((2, 69, 69))
    with pytest.raises(DatasetError, match="foreign.h5: not a galaxyvae data set"):
        read_dataset(foreign)


def test_summary_reports_counts_and_families(tmp_path):
    text = summarize(read_dataset(write_blob_dataset(tmp_path / "d.h5", n=20, n_held_out=4)))
    assert "20 x 69x69 (16 train, 4 held out)" in text
    assert "blob-a: 10" in text and "blob-b: 10" in text


def test_written_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    path = write_blob_dataset(tmp_path / "d.h5", n=10, n_held_out=2)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
