"""Colour to one channel, crop boxes and flux-conserving resampling, checked against hand computations."""

import numpy as np
import pytest

from galaxyvae.imaging import (
    LUMINANCE_WEIGHTS, area_average_weights, box_around, centre_box, enclosing_integer_box, is_blank,
    parse_band, resample, square_box_on_light, to_single_channel,
)


def blob(shape, x, y, sigma=3.0, amplitude=100.0):
    """A round Gaussian of ``amplitude`` centred on pixel coordinates (x, y) (pixel j's centre at j + 0.5)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]] + 0.5
    return amplitude * np.exp(-0.5 * ((cols - x) ** 2 + (rows - y) ** 2) / sigma**2)


def test_integer_factor_is_the_exact_block_mean_and_conserves_flux():
    image = np.random.default_rng(1).integers(0, 256, (424, 424)).astype(np.float64)
    stamp, scale, upsampled = resample(image, (108, 108, 315, 315), 69)
    by_hand = image[108:315, 108:315].reshape(69, 3, 69, 3).mean(axis=(1, 3))
    assert scale == 3.0 and not upsampled
    np.testing.assert_allclose(stamp, by_hand, rtol=0, atol=1e-12)
    assert stamp.sum() * 9 == pytest.approx(image[108:315, 108:315].sum(), rel=1e-14)


def test_a_hand_worked_two_by_two_block():
    image = np.array([[1.0, 2.0, 5.0, 7.0], [3.0, 4.0, 0.0, 0.0], [9.0, 9.0, 1.0, 1.0], [9.0, 9.0, 1.0, 3.0]])
    stamp, scale, _ = resample(image, (0, 0, 4, 4), 2)
    np.testing.assert_array_equal(stamp, [[2.5, 3.0], [9.0, 1.5]])
    assert scale == 2.0


def test_non_integer_factor_matches_brute_force_supersampling():
    rng = np.random.default_rng(2)
    image = rng.random((10, 10))
    box = (0.5, 0.25, 9.5, 9.25)  # 9 source pixels -> 4 output pixels: s = 2.25, edges on quarter pixels
    stamp, scale, upsampled = resample(image, box, 4)
    fine = np.kron(image, np.ones((4, 4)))  # each source pixel as 4 x 4 sub-pixels of equal value
    cut = fine[2:38, 1:37]  # the box in sub-pixels: rows 0.5*4..9.5*4, columns 0.25*4..9.25*4
    by_hand = cut.reshape(4, 9, 4, 9).mean(axis=(1, 3))
    assert scale == pytest.approx(2.25) and not upsampled
    np.testing.assert_allclose(stamp, by_hand, rtol=1e-12)
    assert stamp.sum() * scale**2 == pytest.approx(cut.sum() / 16, rel=1e-12)


def test_area_weights_rows_sum_to_one_and_cover_each_source_pixel_once():
    weights = area_average_weights(0.0, 207.0, 69, 207)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    np.testing.assert_allclose(weights.sum(axis=0), 1 / 3)


def test_identity_when_the_box_already_has_the_output_size():
    image = np.random.default_rng(3).random((69, 69))
    stamp, scale, upsampled = resample(image, (0, 0, 69, 69), 69)
    np.testing.assert_allclose(stamp, image, atol=1e-15)
    assert scale == 1.0 and not upsampled


def test_enlarging_interpolates_linearly_between_pixel_centres():
    ramp = np.add.outer(2.0 * np.arange(30), np.arange(30)).astype(np.float64)  # value = 2*row + col
    stamp, scale, upsampled = resample(ramp, (0, 0, 30, 30), 69)
    assert upsampled and scale == pytest.approx(30 / 69)
    centres = (np.arange(69) + 0.5) * scale - 0.5  # output centres in source-index units
    inside = (centres >= 0) & (centres <= 29)
    expected = np.add.outer(2 * centres, centres)
    np.testing.assert_allclose(stamp[np.ix_(inside, inside)], expected[np.ix_(inside, inside)], atol=1e-10)


def test_enlarging_keeps_the_mean_surface_brightness_of_a_smooth_galaxy():
    image = blob((30, 30), 15, 15, sigma=4)
    stamp, _, _ = resample(image, (0, 0, 30, 30), 69)
    assert stamp.mean() == pytest.approx(image.mean(), rel=0.01)


def test_resample_refuses_boxes_outside_the_image_or_not_square():
    image = np.zeros((20, 20))
    with pytest.raises(ValueError, match="outside"):
        resample(image, (-1, 0, 19, 20), 10)
    with pytest.raises(ValueError, match="not square"):
        resample(image, (0, 0, 10, 20), 10)


def test_luminance_uses_the_stated_weights_and_bands_pick_channels():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 50, 200
    luminance, rule = to_single_channel(rgb)
    assert luminance[0, 0] == pytest.approx(np.dot(LUMINANCE_WEIGHTS, [100, 50, 200]))
    assert "0.2126" in rule
    assert to_single_channel(rgb, "r")[0][0, 0] == 100
    assert to_single_channel(rgb, "b")[0][0, 0] == 200
    assert to_single_channel(rgb, 1)[0][0, 0] == 50
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 7, np.uint8)], axis=2)
    assert to_single_channel(rgba)[0][0, 0] == pytest.approx(luminance[0, 0])
    grey = np.full((2, 2), 9, np.uint8)
    assert to_single_channel(grey, "r") == (pytest.approx(grey.astype(float)), "grey")


def test_single_channel_rejects_odd_shapes_and_channels():
    with pytest.raises(ValueError, match="shape"):
        to_single_channel(np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="channels 0, 1, 2"):
        to_single_channel(np.zeros((4, 4, 3)), 3)


@pytest.mark.parametrize("band, expected", [
    (None, None), ("luminance", None), ("R", "r"), ("green", "g"), ("b", "b"), ("2", 2), (0, 0),
])
def test_parse_band_accepts_the_documented_values(band, expected):
    assert parse_band(band) == expected


@pytest.mark.parametrize("band", ["x", "-1", -2, "1.5"])
def test_parse_band_rejects_other_values(band):
    with pytest.raises(ValueError, match="--band"):
        parse_band(band)


def test_centre_box_of_galaxy_zoo_images():
    assert centre_box((424, 424), 207) == (108, 108, 315, 315)
    assert centre_box((256, 256), 125) == (65, 65, 190, 190)
    with pytest.raises(ValueError):
        centre_box((100, 100), 101)


def test_square_box_follows_the_light_along_the_long_axis():
    wide = blob((50, 200), x=150.5, y=25)
    y0, x0, y1, x1 = square_box_on_light(wide)
    assert (y0, y1) == (0, 50) and x1 - x0 == 50
    assert (x0 + x1) / 2 == pytest.approx(150.5, abs=1)
    near_edge = blob((200, 50), x=25, y=5)  # tall image, light near the first row: box clamped at 0
    assert square_box_on_light(near_edge) == (0, 0, 50, 50)
    assert square_box_on_light(np.zeros((30, 30))) == (0, 0, 30, 30)


def test_boxes_around_points_and_their_integer_envelopes():
    box = box_around(10.5, 20.25, 6)
    assert box == (17.25, 7.5, 23.25, 13.5)
    assert enclosing_integer_box(box) == (17, 7, 24, 14)
    assert enclosing_integer_box((3.0, 4.0, 9.0, 10.0)) == (3, 4, 9, 10)


def test_blank_images():
    assert is_blank(np.full((5, 5), 3.0))
    assert not is_blank(np.eye(5))
