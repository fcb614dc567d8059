import json
import os
from dataclasses import replace

import numpy as np
import pytest

from galaxyvae import pipeline
from galaxyvae.config import TrainConfig
from galaxyvae.errors import InputError
from galaxyvae.pipeline import Paths, ReproducePlan
from tests.helpers import write_blob_dataset

TINY = ReproducePlan(n_images=40, n_held_out=8, epochs=2, importance_samples=4, max_tsne=8, n_conditional=3,
                     n_samples=8)


def paths_in(folder, plan=TINY, seed=0):
    folder.mkdir(exist_ok=True)
    return Paths(out=folder, plan=plan, seed=seed)


def test_the_full_plan_is_the_papers_experiment():
    assert pipeline.FULL.n_images - pipeline.FULL.n_held_out == 43_444
    assert pipeline.FULL.n_held_out == 1000
    assert pipeline.FULL.batch_size == TrainConfig().batch_size  # the paper's model, TrainConfig defaults
    assert pipeline.QUICK.n_images < 1000 and pipeline.QUICK.epochs < pipeline.FULL.epochs
    assert pipeline.FULL.augment  # flips and rotations: docs/model.md, "Augmentation and epochs"


@pytest.mark.parametrize("augment, latent_dim", [(True, 8), (False, 3)])
def test_the_train_stage_trains_with_the_plans_augmentation_and_latent_dimension(tmp_path, augment, latent_dim):
    paths = paths_in(tmp_path / "out", plan=replace(TINY, augment=augment, latent_dim=latent_dim))
    write_blob_dataset(paths.survey, n=40, n_held_out=8)
    pipeline.train_stage(paths)
    config = json.loads((paths.run_dir / "config.json").read_text())
    assert config["augment"] is augment
    assert config["epochs"] == TINY.epochs
    assert config["model"]["latent_dim"] == latent_dim


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_reproduce_refuses_a_bad_latent_dimension_before_writing_anything(tmp_path, bad):
    with pytest.raises(InputError, match="--latent-dim must be a positive integer"):
        pipeline.reproduce(tmp_path / "out", plan=TINY, latent_dim=bad)
    assert not (tmp_path / "out").exists()


def test_the_latent_dimension_is_part_of_the_recorded_plan(tmp_path, monkeypatch):
    from galaxyvae.cli import main

    monkeypatch.setattr(pipeline, "QUICK", TINY)
    monkeypatch.setattr(pipeline, "build_stages", lambda: [])  # the record only
    out = tmp_path / "out"
    assert main(["reproduce", "--quick", "--latent-dim", "4", "--out", str(out)]) == 0
    assert json.loads((out / "reproduce.json").read_text())["plan"]["latent_dim"] == 4
    with pytest.raises(InputError, match="another plan"):
        pipeline.reproduce(out, plan=TINY)  # the same folder with z = 8 is another plan


def test_survey_stage_is_complete_only_for_a_data_set_of_the_planned_size(tmp_path):
    paths = paths_in(tmp_path / "out")
    assert not pipeline.survey_complete(paths)
    write_blob_dataset(paths.survey, n=40, n_held_out=8)
    assert pipeline.survey_complete(paths)
    other = paths_in(tmp_path / "out", plan=ReproducePlan(n_images=50, n_held_out=8))
    with pytest.raises(InputError, match="not the planned 50"):
        pipeline.survey_complete(other)


def test_a_broken_survey_file_is_reported_not_overwritten(tmp_path):
    paths = paths_in(tmp_path / "out")
    paths.survey.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="delete it"):
        pipeline.survey_complete(paths)
    assert paths.survey.read_bytes() == b"not hdf5"


def test_training_is_complete_when_every_planned_epoch_is_logged(tmp_path):
    paths = paths_in(tmp_path / "out")
    (paths.run_dir / "checkpoints").mkdir(parents=True)
    log = paths.run_dir / "log.csv"
    log.write_text("epoch,step,train_loss,held_out_elbo,images_per_s,seconds\n1,3,5.0,4.0,10,1\n")
    for name in ("best.pt", "last.pt"):
        (paths.run_dir / "checkpoints" / name).write_bytes(b"")
    assert pipeline.epochs_logged(log) == 1 and not pipeline.training_complete(paths)
    with log.open("a") as handle:
        handle.write("2,6,4.0,3.5,10,1\n")
    assert pipeline.training_complete(paths)
    (paths.run_dir / "checkpoints" / "best.pt").unlink()
    assert not pipeline.training_complete(paths)


def test_report_is_redone_when_older_than_the_evaluation_or_a_figure(tmp_path):
    paths = paths_in(tmp_path / "out")
    (paths.run_dir / "figures").mkdir(parents=True)
    evaluation, figure, report = (paths.run_dir / "evaluation.json", paths.run_dir / "figures" / "a.png",
                                  paths.run_dir / "report.html")
    for path in (evaluation, figure, report):
        path.write_text("x")
    os.utime(evaluation, (1000, 1000))
    os.utime(figure, (1000, 1000))
    os.utime(report, (2000, 2000))
    assert pipeline.report_complete(paths)
    os.utime(figure, (3000, 3000))
    assert not pipeline.report_complete(paths)


def test_out_must_be_a_folder(tmp_path, capsys):
    from galaxyvae.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_record_keeps_stage_times_across_invocations_and_refuses_another_plan(tmp_path):
    paths = paths_in(tmp_path / "out")
    record = pipeline.start_record(paths)
    pipeline.note_stage(paths, record, "simulate", status="done", seconds=12.345)
    record = pipeline.start_record(paths)
    pipeline.note_stage(paths, record, "simulate", status="skipped", seconds=None)
    saved = json.loads(paths.record.read_text())
    assert saved["stages"]["simulate"]["seconds"] == 12.35
    assert [i["ran"] for i in saved["invocations"]] == [["simulate"], []]
    assert saved["invocations"][1]["skipped"] == ["simulate"]
    assert saved["total_seconds"] == 12.35
    with pytest.raises(InputError, match="another plan or seed"):
        pipeline.start_record(paths_in(tmp_path / "out", seed=1))


def test_reproduce_end_to_end_continues_an_interrupted_run_then_skips_everything(tmp_path, monkeypatch, capsys):
    """The CLI's --quick with its sizes shrunk to TINY: simulate -> train -> evaluate -> figures -> report."""
    from galaxyvae.cli import main
    from galaxyvae.figures import FIGURES
    from galaxyvae.runs import read_log
    from galaxyvae.simulation import simulate_survey
    from galaxyvae.training import train

    monkeypatch.setattr(pipeline, "QUICK", TINY)
    out = tmp_path / "out"
    out.mkdir()
    # The state an interruption after the first of two epochs leaves behind.
    simulate_survey(out / "survey.h5", n_images=TINY.n_images, n_held_out=TINY.n_held_out, seed=0, progress=False)
    train(out / "survey.h5", out / "run", TrainConfig(epochs=1, seed=0), progress=False)
    first_epoch = read_log(out / "run" / "log.csv")

    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    assert f"report: {out / 'run' / 'report.html'}" in capsys.readouterr().out
    record = json.loads((out / "reproduce.json").read_text())
    assert record["invocations"][0]["skipped"] == ["simulate"]
    assert record["invocations"][0]["ran"] == ["train", "evaluate", "figures", "report"]
    log = read_log(out / "run" / "log.csv")
    np.testing.assert_array_equal(log["epoch"], [1, 2])
    assert log["train_loss"][0] == first_epoch["train_loss"][0]  # continued, not started over
    for name in ("evaluation.json", "per_image.csv", "table.md", "report.html", "checkpoints/best.pt"):
        assert (out / "run" / name).is_file(), name
    assert sorted(p.name for p in (out / "run" / "figures").glob("*.png")) == sorted(s.name for s in FIGURES)
    page = (out / "run" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)

    before = {p: p.stat().st_mtime_ns for p in (out / "run").rglob("*") if p.is_file()}
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    record = json.loads((out / "reproduce.json").read_text())
    assert record["invocations"][1]["ran"] == []
    assert record["invocations"][1]["skipped"] == ["simulate", "train", "evaluate", "figures", "report"]
    assert {p: p.stat().st_mtime_ns for p in (out / "run").rglob("*") if p.is_file()} == before
    assert set(record["stages"]) == {"train", "evaluate", "figures", "report", "simulate"}


@pytest.mark.slow
def test_the_quick_reproduction_as_ci_runs_it(tmp_path):
    from galaxyvae.cli import main

    assert main(["reproduce", "--quick", "--out", str(tmp_path / "quick")]) == 0
    evaluation = json.loads((tmp_path / "quick" / "run" / "evaluation.json").read_text())
    assert evaluation["n_images"] == pipeline.QUICK.n_held_out
    assert (tmp_path / "quick" / "run" / "report.html").is_file()
