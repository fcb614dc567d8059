import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from galaxyvae.cli import main
from galaxyvae.errors import InputError, OutputExistsError
from galaxyvae.figures import FIGURES
from galaxyvae.report import markdown_to_html, render_report, write_report

EVALUATION = {
    "n_images": 50,
    "data": "/somewhere/survey.h5",
    "run_dir": "/somewhere/run",
    "vae": {"mean_mse": 0.00123, "median_mse": 0.0011, "elbo_nats": 8123.4, "elbo_bits_per_pixel": 2.4617,
            "log_px_iw_nats": 8130.2, "log_px_iw_bits_per_pixel": 2.4637, "calibration_within_1sigma": 0.6712,
            "calibration_within_2sigma": 0.9488},
    "baselines": {
        "gaussian": {"mse_win_fraction": 0.98, "mse_win_ci95": [0.94, 1.0], "likelihood_win_fraction": 0.96,
                     "likelihood_win_ci95": [0.9, 1.0], "mean_mse": 0.0093, "median_mse": 0.0071,
                     "fit_converged_fraction": 1.0},
        "sersic": {"mse_win_fraction": 0.82, "mse_win_ci95": [0.7, 0.92], "likelihood_win_fraction": 0.8,
                   "likelihood_win_ci95": [0.68, 0.9], "mean_mse": 0.0031, "median_mse": 0.0027,
                   "fit_converged_fraction": 0.98},
    },
    "paper": {"mse_win_fraction": 0.971, "likelihood_win_fraction": 0.972},
}
TABLE_MD = """## Held-out comparison

| | paper | ours |
|---|---:|---:|
| MSE win vs Gaussian | 97.1% | 98.0% |
| likelihood win vs Gaussian | 97.2% | 96.0% |

Win fractions over **50** held-out images; x < y is `escaped`.
"""


def fake_evaluated_run(folder, with_figures=True):
    """A run directory holding every file a report reads, with small stand-in figures."""
    folder.mkdir()
    (folder / "evaluation.json").write_text(json.dumps(EVALUATION))
    (folder / "table.md").write_text(TABLE_MD)
    (folder / "per_image.csv").write_text("index,mse_vae,mse_gaussian\n0,0.1,0.2\n")
    (folder / "config.json").write_text(json.dumps({"epochs": 3, "model": {"latent_dim": 8}, "data": "/d.h5"}))
    (folder / "data.json").write_text(json.dumps({"path": "/d.h5", "attrs": {"pixel_units": "nanomaggies"},
                                                  "provenance": {"url": "http://example.org/hdf"}}))
    (folder / "versions.json").write_text(json.dumps({"python": "3.11.9", "torch": "2.13.0"}))
    (folder / "log.csv").write_text("epoch,step,train_loss,held_out_elbo,images_per_s,seconds\n"
                                    "1,10,-100,90,5000,2.0\n2,20,-120,115,5100,2.0\n3,30,-125,112,5200,2.0\n")
    if with_figures:
        (folder / "figures").mkdir()
        for number, spec in enumerate(FIGURES):
            Image.fromarray(np.full((8, 12), 20 * number, np.uint8)).save(folder / "figures" / spec.name)
    return folder


def test_report_embeds_every_figure_and_refers_to_nothing_outside(tmp_path):
    run = fake_evaluated_run(tmp_path / "run")
    page = write_report(run).read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(FIGURES)
    for data, spec in zip(embedded, FIGURES):
        assert base64.b64decode(data) == (run / "figures" / spec.name).read_bytes()
        assert spec.caption.split(".")[0] in page.replace("&#x27;", "'")
    assert len(re.findall(r"\bsrc=", page)) == len(FIGURES)  # every src is an embedded image
    assert re.findall(r'=\s*"(https?:[^"]*)"', page) == []  # no attribute points at the web...
    assert "http://example.org/hdf" in page  # ...a URL in the provenance is shown as text only
    assert "<link" not in page and "<script" not in page and "url(" not in page
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))


def test_report_renders_table_md_as_html_tables(tmp_path):
    page = write_report(fake_evaluated_run(tmp_path / "run")).read_text()
    assert "<td>MSE win vs Gaussian</td>" in page and '<td class="num">97.1%</td>' in page
    assert "<th>paper</th>" in page and "|---" not in page
    assert "98.0% (94.0–100.0%)" not in page  # no second copy of the tables built from evaluation.json


def test_without_table_md_the_tables_come_from_evaluation_json(tmp_path):
    run = fake_evaluated_run(tmp_path / "run")
    (run / "table.md").unlink()
    page = write_report(run).read_text()
    assert "97.1%" in page and "97.2%" in page  # the paper's numbers...
    assert "98.0% (94.0–100.0%)" in page and "82.0% (70.0–92.0%)" in page  # ...beside ours, both baselines
    assert "VAE vs S\u00e9rsic fit" in page
    for value in ("8,123.4", "2.462", "8,130.2", "2.464", "67.1%", "94.9%"):  # ELBO, log p(x), bits, calibration
        assert value in page


def test_report_shows_config_provenance_versions_and_training(tmp_path):
    run = fake_evaluated_run(tmp_path / "run")
    (run / "log.csv").write_text("epoch,step,train_loss,validation_elbo,images_per_s,seconds\n"
                                 "1,10,-100,90,5000,2.0\n2,20,-120,115,5100,2.0\n3,30,-125,112,5200,2.0\n")
    page = write_report(run).read_text()
    for text in ("model.latent_dim", "attrs.pixel_units", "nanomaggies", "torch", "2.13.0",
                 "best validation ELBO", "115 at epoch 2"):
        assert text in page


def test_the_report_names_the_epoch_of_the_lowest_validation_mse_when_it_chose_the_checkpoint(tmp_path):
    run = fake_evaluated_run(tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"epochs": 3, "checkpoint_metric": "mse", "data": "/d.h5"}))
    (run / "log.csv").write_text("epoch,step,train_loss,validation_elbo,validation_mse,images_per_s,seconds\n"
                                 "1,10,-100,90,0.5,5000,2.0\n2,20,-120,115,0.25,5100,2.0\n3,30,-125,112,0.375,5200,2.0\n")
    page = write_report(run).read_text()
    assert "lowest validation MSE" in page and "0.25 at epoch 2" in page


def test_the_report_of_an_older_run_names_the_held_out_elbo_that_chose_its_checkpoint(tmp_path):
    page = write_report(fake_evaluated_run(tmp_path / "run")).read_text()
    assert "best held-out ELBO" in page and "115 at epoch 2" in page


def test_report_needs_an_evaluated_run(tmp_path, capsys):
    run = fake_evaluated_run(tmp_path / "run")
    (run / "evaluation.json").unlink()
    with pytest.raises(InputError, match="not been evaluated"):
        write_report(run)
    assert main(["report", str(run)]) == 2
    assert "galaxyvae evaluate" in capsys.readouterr().err


def test_report_is_not_replaced_unless_asked(tmp_path):
    run = fake_evaluated_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    with pytest.raises(OutputExistsError):
        write_report(run)
    assert write_report(run, overwrite=True).is_file()


def test_markdown_tables_headings_and_escaping():
    rendered = markdown_to_html(TABLE_MD)
    assert "<h3>Held-out comparison</h3>" in rendered
    assert rendered.count("<tr>") == 3 and "<th>paper</th>" in rendered and "---" not in rendered
    assert "<b>50</b>" in rendered and "<code>escaped</code>" in rendered and "x &lt; y" in rendered


def test_render_without_figures_says_so(tmp_path):
    run = fake_evaluated_run(tmp_path / "run", with_figures=False)
    assert "No figures have been drawn" in render_report(run)
