import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import pdist

from galaxyvae import figures
from galaxyvae.errors import InputError, OutputExistsError
from tests.helpers import gaussian_blobs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def saved_size(fig, path):
    figures.save_figure(fig, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        return image.size


def test_asinh_norm_spans_the_percentiles_and_colour_bar_ticks_stay_apart():
    images = gaussian_blobs(3, seed=1)
    norm = figures.asinh_norm(images)
    lo, hi = np.percentile(images, [10, 99.8])
    assert norm.vmin == pytest.approx(lo) and norm.vmax == pytest.approx(hi)
    ticks = figures.asinh_ticks(norm)
    assert 0.0 in ticks and len(ticks) >= 3
    positions = np.array([float(norm(t)) for t in ticks])
    assert ((positions >= 0) & (positions <= 1)).all()
    assert np.diff(positions).min() >= 0.07  # labels do not collide
    positive = figures.asinh_ticks(figures.asinh_norm(images + 1.0))  # a range that does not reach zero
    assert 0.0 not in positive and positive[0] >= np.percentile(images + 1.0, 10)


def test_conditional_figure_has_four_image_columns_per_row_and_one_colour_bar_per_scale(tmp_path):
    x = gaussian_blobs(3, seed=2)
    mean = gaussian_blobs(3, seed=2, noise=0)
    variance = np.full_like(x, 0.05 ** 2)
    fig = figures.plot_conditional(x, mean, variance, mean * 0.9, labels=["a", "b", "c"], units="nanomaggies")
    assert len(image_axes(fig)) == 3 * 4
    assert len(fig.axes) == 3 * 4 + 3 * 2  # two colour bars per row: intensity (shared by three) and s.d.
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles[0] == "input x" and "f_\\mu(z)" in titles[1] and "Gaussian fit" in titles[2]
    assert "s.d." in titles[3]
    row = image_axes(fig)[:3]
    assert row[0].images[0].norm is row[1].images[0].norm is row[2].images[0].norm
    sd_panel = image_axes(fig)[3].images[0].get_array()
    np.testing.assert_allclose(sd_panel, 0.05, rtol=1e-5)  # drawn as the square root of the variance
    width, height = saved_size(fig, tmp_path / "c.png")
    one_row = figures.plot_conditional(x[:1], mean[:1], variance[:1], mean[:1], units="nanomaggies")
    width_1, height_1 = saved_size(one_row, tmp_path / "c1.png")
    assert width == pytest.approx(width_1, rel=0.05) and height > 2.5 * height_1


def test_conditional_figure_rejects_mismatched_shapes():
    x = gaussian_blobs(2)
    with pytest.raises(ValueError, match="share one"):
        figures.plot_conditional(x, x[:1], x, x)


def test_non_overlapping_keeps_points_at_least_a_thumbnail_apart():
    points = np.random.default_rng(0).uniform(0, 1, (500, 2))
    kept = figures.non_overlapping(points, 0.1, seed=3)
    assert 20 < len(kept) < 150
    assert pdist(points[kept], metric="chebyshev").min() >= 0.1
    others = np.setdiff1d(np.arange(500), kept)
    blocked = np.abs(points[others, None, :] - points[None, kept, :]).max(axis=2).min(axis=1)
    assert (blocked < 0.1).all()  # greedy: every galaxy left out would overlap a drawn one


def test_tsne_is_seeded_and_keeps_separated_groups_apart():
    rng = np.random.default_rng(0)
    latent = np.concatenate([rng.normal(0, 1, (40, 8)), rng.normal(8, 1, (40, 8))])
    first = figures.tsne_embedding(latent, seed=1)
    np.testing.assert_array_equal(first, figures.tsne_embedding(latent, seed=1))
    distance = np.linalg.norm(first[:, None] - first[None], axis=2)
    np.fill_diagonal(distance, np.inf)
    nearest = distance.argmin(axis=1)
    assert ((nearest < 40) == (np.arange(80) < 40)).all()


def test_tsne_needs_a_few_galaxies():
    with pytest.raises(InputError, match="at least 4"):
        figures.tsne_embedding(np.zeros((3, 8)))


def test_tsne_figure_places_thumbnails_framed_by_family(tmp_path):
    from matplotlib.offsetbox import AnnotationBbox

    rng = np.random.default_rng(1)
    embedding = rng.normal(size=(60, 2))
    families = np.array(["spiral", "elliptical", "edge_on"] * 20)
    fig = figures.plot_tsne(embedding, gaussian_blobs(60, seed=1), families=families, seed=2)
    (ax,) = fig.axes
    boxes = [a for a in ax.artists if isinstance(a, AnnotationBbox)]
    shown = figures.non_overlapping(embedding / np.ptp(embedding, axis=0), 1.1 / 20, seed=2)
    assert len(boxes) == len(shown) > 10
    np.testing.assert_allclose([b.xy for b in boxes], embedding[shown])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["edge on (20)", "elliptical (20)", "spiral (20)"]
    frames = {tuple(b.patch.get_edgecolor()) for b in boxes}
    assert len(frames) == 3
    saved_size(fig, tmp_path / "t.png")


def test_traversal_grid_steps_one_dimension_per_row():
    steps = figures.TRAVERSAL_STEPS
    grid = figures.traversal_grid(8, steps)
    assert grid.shape == (8, 7, 8)
    for dim in range(8):
        np.testing.assert_array_equal(grid[dim, :, dim], np.arange(-3, 4))
        assert not np.delete(grid[dim], dim, axis=1).any()
    assert not grid[:, 3].any()  # the centre column is z = 0 in every row


def test_traversal_figure_layout_and_labels():
    images = gaussian_blobs(4 * 7, seed=3, noise=0).reshape(4, 7, 69, 69)
    fig = figures.plot_traversals(images, figures.TRAVERSAL_STEPS)
    assert len(image_axes(fig)) == 28 and len(fig.axes) == 29
    assert [ax.get_title() for ax in fig.axes[:7]] == ["-3$\\sigma$", "-2$\\sigma$", "-1$\\sigma$", "0",
                                                       "+1$\\sigma$", "+2$\\sigma$", "+3$\\sigma$"]
    assert len({id(ax.images[0].norm) for ax in image_axes(fig)}) == 1  # one shared colour scale
    with pytest.raises(ValueError, match="steps"):
        figures.plot_traversals(images, np.arange(3))


def test_samples_figure_fills_a_grid_with_one_colour_bar():
    fig = figures.plot_samples(gaussian_blobs(10, seed=4, noise=0), columns=4)
    assert len(image_axes(fig)) == 10
    assert len(fig.axes) == 3 * 4 + 1


def test_training_figure_marks_the_best_validation_epoch():
    epoch = np.arange(1, 9)
    elbo = np.array([1, 5, 7, 9, 12, 11, 10, 10.5])
    fig = figures.plot_training({"epoch": epoch, "train_loss": -elbo - 1, "validation_elbo": elbo})
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("epoch 5" in label for label in labels)
    assert any(label.startswith("best validation") for label in labels)
    with pytest.raises(InputError, match="validation_elbo"):
        figures.plot_training({"epoch": epoch, "train_loss": elbo})


def test_training_figure_stars_the_lowest_validation_mse_when_it_chose_the_checkpoint():
    epoch = np.arange(1, 6)
    history = {"epoch": epoch, "train_loss": -epoch * 10.0, "validation_elbo": epoch * 10.0,
               "validation_mse": np.array([5.0, 3.0, 2.0, 2.5, 4.0])}
    fig = figures.plot_training(history, checkpoint_metric="mse")
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("lowest validation MSE: epoch 3" in label for label in labels)


def test_training_figure_of_an_older_run_says_its_checkpoint_was_chosen_on_the_held_out_split():
    epoch = np.arange(1, 4)
    fig = figures.plot_training({"epoch": epoch, "train_loss": -epoch - 1.0, "held_out_elbo": epoch * 1.0})
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "held-out ELBO" in labels and any(label.startswith("best held-out: epoch 3") for label in labels)


def synthetic_per_image(n=200, seed=0):
    rng = np.random.default_rng(seed)
    mse_vae = rng.lognormal(-3, 1, n)
    columns = {"mse_vae": mse_vae, "loglik_vae": rng.normal(3000, 100, n)}
    for name, shift in (("gaussian", 1.0), ("sersic", 0.3)):
        columns[f"mse_{name}"] = mse_vae * rng.lognormal(shift, 1.0, n)
        columns[f"loglik_{name}"] = columns["loglik_vae"] - rng.normal(100 * shift, 80, n)
    return columns


def test_differences_figure_reports_win_fractions_counted_independently(tmp_path):
    columns = synthetic_per_image()
    summary = {"baselines": {"gaussian": {"mse_win_ci95": [0.8, 0.9]}}}
    fig = figures.plot_differences(columns, summary=summary)
    assert len(fig.axes) == 4
    for col, name in enumerate(("gaussian", "sersic")):
        mse_wins = (columns["mse_vae"] < columns[f"mse_{name}"]).sum()
        ll_wins = (columns["loglik_vae"] > columns[f"loglik_{name}"]).sum()
        assert f"{100 * mse_wins / 200:.1f}% of 200" in fig.axes[col].get_title()
        assert f"{100 * ll_wins / 200:.1f}% of 200" in fig.axes[2 + col].get_title()
        for ax in (fig.axes[col], fig.axes[2 + col]):
            assert any(list(line.get_xdata()) == [0, 0] for line in ax.lines)  # the zero line
            assert ax.get_xscale() == "symlog"
    assert "95% interval 80.0-90.0%" in fig.axes[0].get_title()
    assert "\u2190 VAE better" in [t.get_text() for t in fig.axes[0].texts]
    assert "VAE better \u2192" in [t.get_text() for t in fig.axes[2].texts]
    saved_size(fig, tmp_path / "d.png")


def test_differences_axis_is_linear_for_a_narrow_range_and_symmetric_log_for_a_wide_one():
    narrow = {"mse_vae": np.linspace(1.0, 2.0, 50), "mse_gaussian": np.linspace(1.5, 2.2, 50),
              "loglik_vae": np.zeros(50), "loglik_gaussian": np.geomspace(1e-3, 1e3, 50)}
    fig = figures.plot_differences(narrow)
    assert fig.axes[0].get_xscale() == "linear" and fig.axes[1].get_xscale() == "symlog"
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert "0" in labels and "$10^{3}$" in labels and "$-10^{3}$" in labels


def test_symlog_ticks_are_round_and_clear_of_the_linear_core():
    assert figures.symlog_ticks(1.0, 1e6) == [-1e6, -1e4, -1e2, 0.0, 1e2, 1e4, 1e6]
    assert figures.symlog_ticks(1e-4, 3e-3) == pytest.approx([-2e-3, -1e-3, -5e-4, 0, 5e-4, 1e-3, 2e-3])


def test_differences_figure_draws_only_baselines_present_and_needs_one():
    columns = synthetic_per_image()
    only_gaussian = {k: v for k, v in columns.items() if "sersic" not in k}
    assert len(figures.plot_differences(only_gaussian).axes) == 2
    with pytest.raises(InputError, match="no baseline"):
        figures.plot_differences({"mse_vae": columns["mse_vae"], "loglik_vae": columns["loglik_vae"]})


def test_symlog_bins_cover_every_value_in_increasing_order():
    values = np.array([-1e4, -3.0, -1e-3, 0.0, 2e-3, 50.0, 7e5])
    edges = figures.symlog_bins(values, linthresh=1e-2)
    assert (np.diff(edges) > 0).all()
    assert edges[0] <= values.min() and edges[-1] >= values.max()
    counts, _ = np.histogram(values, edges)
    assert counts.sum() == len(values)


def test_examples_take_every_family_before_repeating_one():
    families = np.array(["e"] * 50 + ["s"] * 5 + ["x"] * 2)
    chosen = figures.choose_examples(families, 6, seed=0)
    assert len(set(chosen)) == 6
    assert sorted(families[chosen[:3]]) == ["e", "s", "x"]
    np.testing.assert_array_equal(chosen, figures.choose_examples(families, 6, seed=0))


def test_per_image_csv_columns_are_typed(tmp_path):
    path = tmp_path / "per_image.csv"
    path.write_text("index,family,mse_vae,mse_win_gaussian\n0,spiral,0.5,True\n1,,1e-3,False\n")
    columns = figures.read_per_image(path)
    np.testing.assert_array_equal(columns["mse_vae"], [0.5, 1e-3])
    np.testing.assert_array_equal(columns["mse_win_gaussian"], [True, False])
    assert columns["family"].tolist() == ["spiral", ""]


def test_run_figures_refuse_to_replace_existing_ones(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "samples.png").write_bytes(PNG_MAGIC)
    with pytest.raises(OutputExistsError, match="samples.png"):
        figures.make_run_figures(tmp_path)
    with pytest.raises(InputError, match="differences.png"):
        figures.make_run_figures(tmp_path, only=["differences.png"])  # not evaluated: no per_image.csv
