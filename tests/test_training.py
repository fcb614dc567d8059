import csv
import json
import math
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from galaxyvae import training
from galaxyvae.cli import main
from galaxyvae.config import DISPLAY_PIXEL_VARIANCE_MAX, ModelConfig, TrainConfig
from galaxyvae.dataset import DatasetError, choose_held_out, read_dataset, write_dataset
from galaxyvae.errors import InputError
from galaxyvae.model import PixelScaling
from galaxyvae.runs import LOG_COLUMNS, CheckpointError, load_checkpoint, load_run
from galaxyvae.training import (
    DistributedContext, RunExistsError, augmentation_indices, batch_plan, choose_device, configure_threads,
    dihedral_indices, train,
)
from tests.helpers import gaussian_blobs, write_blob_dataset


def tiny(**changes) -> TrainConfig:
    """A config small enough for a test: a narrow network, a few epochs, no compilation."""
    settings = dict(epochs=2, batch_size=8, compile="off", threads=1, device="cpu",
                    model=ModelConfig(hidden=16))
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.fixture
def data(tmp_path):
    """41 training images: 1 set aside for validation (2%), 40 fitted in 5 batches of 8."""
    return write_blob_dataset(tmp_path / "blobs.h5", n=49, n_held_out=8)


def weights(run_dir, name="last"):
    return load_checkpoint(run_dir / "checkpoints" / f"{name}.pt")["model_state"]


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_rows(run_dir):
    with (run_dir / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_run_directory_holds_config_versions_data_log_and_checkpoints(tmp_path, data):
    run = train(data, tmp_path / "run", tiny(epochs=3), progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config.pop("data") == str(data.resolve())
    assert TrainConfig.from_dict(config) == tiny(epochs=3)
    versions = json.loads((run / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["execution"]["world_size"] == 1
    record = json.loads((run / "data.json").read_text())
    assert (record["n_train"], record["n_validation"], record["n_held_out"]) == (40, 1, 8)
    assert record["path"] == str(data.resolve())
    assert record["attrs"]["source"] == "test-blobs" and record["provenance"] == {"made_by": "tests.helpers"}
    rows = log_rows(run)
    assert tuple(rows[0]) == LOG_COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [5, 10, 15]          # 40 training images, batches of 8
    best_epoch = 1 + int(np.argmax([float(r["validation_elbo"]) for r in rows]))
    for name, epoch in (("last", 3), ("best", best_epoch)):
        checkpoint = torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)
        assert checkpoint["epoch"] == epoch
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "data.json", "log.csv",
                                                     "versions.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_training_lowers_the_loss_and_raises_the_validation_elbo(tmp_path):
    data = write_blob_dataset(tmp_path / "blobs.h5", n=160, n_held_out=32)
    run = train(data, tmp_path / "run", tiny(epochs=6, batch_size=16, model=ModelConfig(hidden=32)), progress=False)
    rows = log_rows(run)
    loss = [float(r["train_loss"]) for r in rows]
    elbo = [float(r["validation_elbo"]) for r in rows]
    assert loss[-1] < loss[0] - 1000 and elbo[-1] > elbo[0] + 1000
    assert all(math.isfinite(v) for v in loss + elbo)


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(tmp_path, data):
    first = train(data, tmp_path / "a", tiny(), progress=False)
    second = train(data, tmp_path / "b", tiny(), progress=False)
    third = train(data, tmp_path / "c", tiny(seed=1), progress=False)
    assert same_weights(weights(first), weights(second))
    assert not same_weights(weights(first), weights(third))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_after_a_crash_mid_epoch_is_bit_identical_to_an_uninterrupted_run(tmp_path, data, monkeypatch,
                                                                                 schedule):
    whole = train(data, tmp_path / "whole", tiny(epochs=4, lr_schedule=schedule), progress=False)

    original_step = torch.optim.Adam.step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:               # in epoch 3 (5 steps per epoch)
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "broken", tiny(epochs=4, lr_schedule=schedule), progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    assert [r["epoch"] for r in log_rows(tmp_path / "broken")] == ["1", "2"]

    resumed = train(data, tmp_path / "broken", tiny(epochs=4, lr_schedule=schedule), resume=True, progress=False)
    assert same_weights(weights(whole), weights(resumed))
    assert same_weights(weights(whole, "best"), weights(resumed, "best"))
    columns = ("epoch", "step", "train_loss", "validation_elbo")
    assert [[r[c] for c in columns] for r in log_rows(whole)] == [[r[c] for c in columns] for r in log_rows(resumed)]


def test_the_cosine_schedule_falls_from_the_step_size_to_zero_over_the_run(tmp_path, data):
    rates = [training.scheduled_learning_rate(1e-3, "cosine", t) for t in np.linspace(0, 1, 11)]
    assert rates[0] == 1e-3 and rates[5] == pytest.approx(5e-4) and rates[-1] == pytest.approx(0, abs=1e-18)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert training.scheduled_learning_rate(1e-3, "constant", 0.9) == 1e-3
    run = train(data, tmp_path / "run", tiny(epochs=2, lr_schedule="cosine", learning_rate=1e-2), progress=False)
    last_rate = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer_state"]["param_groups"][0]["lr"]
    steps = 2 * 5                                       # 40 training images in batches of 8
    assert last_rate == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * (steps - 1) / steps)))
    with pytest.raises(InputError, match="lr_schedule"):
        train(data, tmp_path / "bad", tiny(lr_schedule="linear"), progress=False)


def test_resume_can_extend_a_finished_run_and_keeps_its_settings(tmp_path, data):
    whole = train(data, tmp_path / "whole", tiny(epochs=3, lr_schedule="constant"), progress=False)
    run = train(data, tmp_path / "run", tiny(epochs=2, lr_schedule="constant"), progress=False)
    train(data, run, tiny(epochs=3, learning_rate=0.5), resume=True, progress=False)   # lr ignored: the run's own
    assert same_weights(weights(whole), weights(run))
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


def test_extending_a_cosine_run_warns_that_its_step_size_rises_again(tmp_path, data, caplog):
    run = train(data, tmp_path / "run", tiny(epochs=2), progress=False)
    assert TrainConfig().lr_schedule == "cosine"
    with caplog.at_level("WARNING", logger="galaxyvae.training"):
        train(data, run, tiny(epochs=4), resume=True, progress=False)
    assert "cosine" in caplog.text and "from 0 to 0.0005" in caplog.text


def test_display_level_data_with_the_linear_variance_ceiling_warns_and_names_the_setting(tmp_path, caplog):
    display = write_blob_dataset(tmp_path / "display.h5", n=30, n_held_out=5,
                                 attrs_units="8-bit display level (0-255), not calibrated")
    with caplog.at_level("WARNING", logger="galaxyvae.training"):
        train(display, tmp_path / "linear", tiny(epochs=1), progress=False)
    assert "display levels" in caplog.text and f"--pixel-variance-max {DISPLAY_PIXEL_VARIANCE_MAX:g}" in caplog.text
    caplog.clear()
    suited = tiny(epochs=1, model=replace(tiny().model, pixel_variance_max=DISPLAY_PIXEL_VARIANCE_MAX))
    with caplog.at_level("WARNING", logger="galaxyvae.training"):
        train(display, tmp_path / "suited", suited, progress=False)
        train(write_blob_dataset(tmp_path / "linear.h5", n=30, n_held_out=5), tmp_path / "blobs", tiny(epochs=1),
              progress=False)
    assert "display levels" not in caplog.text


def test_an_existing_run_directory_is_not_overwritten_without_resume(tmp_path, data):
    run = train(data, tmp_path / "run", tiny(epochs=1), progress=False)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunExistsError, match="--resume"):
        train(data, run, tiny(epochs=1), progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert issubclass(RunExistsError, InputError)


def test_resume_needs_a_run_directory(tmp_path, data):
    with pytest.raises(InputError, match="nothing to resume"):
        train(data, tmp_path / "nothing", tiny(), resume=True, progress=False)


def test_resume_refuses_a_different_data_set(tmp_path, data):
    run = train(data, tmp_path / "run", tiny(epochs=1), progress=False)
    other = write_blob_dataset(tmp_path / "other.h5", n=30, n_held_out=5, seed=3)
    with pytest.raises(InputError, match="not the data set"):
        train(other, run, tiny(epochs=2), resume=True, progress=False)


def write_raw_dataset(path, images, held_out):
    """An HDF5 file in the format but bypassing write_dataset's checks, as a damaged file would be."""
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("held_out", data=held_out)
        f.create_group("metadata")
        f.attrs.update(format="galaxyvae-dataset", source="test", pixel_units="x", pixel_scale_arcsec=0.4,
                       sky_subtracted=True)
    return path


@pytest.mark.parametrize("case, message", [
    ("nan", "NaN"), ("shape", "expected shape"), ("one training image", "cannot spare a validation subset"),
    ("no training", "training split is empty"),
])
def test_bad_data_sets_are_input_errors_and_create_nothing(tmp_path, case, message):
    images = gaussian_blobs(12, seed=1)
    held_out = choose_held_out(12, 3, 0)
    if case == "nan":
        images[4, 3, 3] = np.nan
    elif case == "shape":
        images = images[:, :32, :32]
    elif case == "one training image":
        held_out[1:] = True
        held_out[0] = False
    else:
        held_out[:] = True
    path = write_raw_dataset(tmp_path / "bad.h5", images, held_out)
    with pytest.raises(InputError, match=message):
        train(path, tmp_path / "run", tiny(), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_model_of_another_image_size_is_refused(tmp_path, data):
    with pytest.raises(InputError, match="the model expects"):
        train(data, tmp_path / "run", tiny(model=ModelConfig(image_size=32, hidden=16)), progress=False)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "foreign", "unsafe"])
def test_corrupt_or_foreign_checkpoints_are_refused_on_resume(tmp_path, data, content):
    run = train(data, tmp_path / "run", tiny(epochs=1), progress=False)
    last = run / "checkpoints" / "last.pt"
    if content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, last)
    elif content == "unsafe":
        torch.save({"format": "galaxyvae-checkpoint", "payload": Exception("code, not data")}, last)
    else:
        last.write_bytes(content)
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match="last.pt"):
        train(data, run, tiny(epochs=2), resume=True, progress=False)
    assert last.read_bytes() == before


def ten_times_brighter(tmp_path):
    """A second data set in other pixel units (x10), as real data differ from the simulation."""
    other = tmp_path / "other.h5"
    write_dataset(other, 10.0 * gaussian_blobs(40, seed=5), choose_held_out(40, 8, 1),
                  attrs={"source": "t", "pixel_units": "x", "pixel_scale_arcsec": 0.4, "sky_subtracted": True})
    return other


def test_init_starts_from_an_earlier_runs_weights_in_the_new_datas_noise_units(tmp_path, data):
    first = train(data, tmp_path / "first", tiny(epochs=3), progress=False)
    other = ten_times_brighter(tmp_path)
    tuned = train(other, tmp_path / "tuned", tiny(epochs=1, learning_rate=1e-12), init=first, progress=False)
    start, end = weights(first, "best"), weights(tuned)
    networks = [k for k in start if k not in ("pixel_offset", "pixel_scale")]
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in networks)   # a vanishing step moved nothing
    fitted, _ = training.validation_split(read_dataset(other).train_index, 0.02, seed=0)
    refitted = PixelScaling.fit(read_dataset(other).images[fitted])
    assert float(end["pixel_scale"]) == pytest.approx(refitted.scale, rel=1e-12)
    assert float(end["pixel_scale"]) == pytest.approx(10 * float(start["pixel_scale"]), rel=0.3)
    assert json.loads((tuned / "config.json").read_text())["init"] == str(first.resolve())


@pytest.mark.parametrize("part, fixed, learning", [
    ("decoder", ["decoder.", "decoder_head."], ["encoder.", "encoder_head."]),
    ("encoder", ["encoder.", "encoder_head."], ["decoder.", "decoder_head."]),
    ("decoder-body", ["decoder."], ["decoder_head.", "encoder."]),
])
def test_freeze_keeps_the_chosen_part_of_the_pretrained_model_fixed(tmp_path, data, part, fixed, learning):
    first = train(data, tmp_path / "first", tiny(epochs=2), progress=False)
    tuned = train(ten_times_brighter(tmp_path), tmp_path / "tuned", tiny(epochs=2, freeze=part),
                  init=first, progress=False)
    start, end = weights(first, "best"), weights(tuned)
    for key in start:
        if any(key.startswith(prefix) for prefix in fixed):
            assert torch.equal(start[key], end[key]), key
    moved = [key for key in start if any(key.startswith(prefix) for prefix in learning)]
    assert moved and all(not torch.equal(start[k], end[k]) for k in moved)
    assert json.loads((tuned / "config.json").read_text())["freeze"] == part


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_freeze_mean_refits_f_sigma_under_a_new_ceiling_and_keeps_f_mu_bit_for_bit(tmp_path, data, arch):
    model = ModelConfig(arch=arch, hidden=16, conv_channels=2, pixel_variance_max=2.0)
    first = train(data, tmp_path / "first", tiny(epochs=2, model=model), progress=False)
    raised = replace(model, pixel_variance_max=40.0)
    tuned = train(data, tmp_path / "tuned", tiny(epochs=2, freeze="mean", model=raised, learning_rate=0.05),
                  init=first, progress=False)
    before, after = load_run(first).model, load_run(tuned).model
    assert after.config == raised and json.loads((tuned / "config.json").read_text())["model"]["pixel_variance_max"] == 40
    x = torch.as_tensor(read_dataset(data).images[:6]).reshape(6, -1)
    with torch.no_grad():
        mean_before, log_var_before = before.decode(before.encode(before.scale(x))[0])
        mean_after, log_var_after = after.decode(after.encode(after.scale(x))[0])
    assert torch.equal(mean_before, mean_after)
    assert not torch.equal(log_var_before, log_var_after)
    assert float(log_var_before.max()) <= math.log(2.0) < float(log_var_after.max()) <= math.log(40.0)
    start, end = weights(first, "best"), weights(tuned)
    assert all(torch.equal(start[k], end[k]) for k in start if not k.startswith("decoder_head."))


def test_init_may_change_the_variance_bounds_but_not_the_shape_from_the_command_line(tmp_path, data, capsys):
    first = train(data, tmp_path / "first", tiny(epochs=1), progress=False)
    assert main(["train", str(data), "--out", str(tmp_path / "tuned"), "--init", str(first), "--epochs", "1",
                 "--pixel-variance-max", "7", "--freeze", "mean", "--compile", "off"]) == 0
    stored = json.loads((tmp_path / "tuned" / "config.json").read_text())["model"]
    assert stored == {**ModelConfig(hidden=16).__dict__, "pixel_variance_max": 7.0}
    assert main(["train", str(data), "--out", str(tmp_path / "wider"), "--init", str(first),
                 "--latent-dim", "3"]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "pixel_variance_max" in err and not (tmp_path / "wider").exists()


def test_freeze_without_init_is_refused_naming_the_option(tmp_path, data, capsys):
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--freeze", "decoder"]) == 2
    assert "--freeze decoder" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_init_and_resume_together_are_refused(tmp_path, data):
    run = train(data, tmp_path / "run", tiny(epochs=1), progress=False)
    with pytest.raises(InputError, match="--init"):
        train(data, run, tiny(), resume=True, init=run, progress=False)


def test_augmentation_uses_the_eight_flips_and_rotations():
    side = 5
    image = np.arange(side * side).reshape(side, side)
    expected = set()
    for k in range(4):
        expected.add(np.rot90(image, k).tobytes())
        expected.add(np.rot90(image, k).T.tobytes())
    got = {image.reshape(-1)[index].reshape(side, side).tobytes() for index in dihedral_indices(side).numpy()}
    assert got == expected and len(got) == 8


def test_shift_augmentation_draws_every_flip_and_rotation_at_every_wrapped_shift():
    side, shift = 7, 2
    image = np.arange(side * side).reshape(side, side)
    flipped = [np.rot90(image, k) for k in range(4)] + [np.rot90(image, k).T for k in range(4)]
    expected = {np.roll(f, (dy, dx), (0, 1)).tobytes() for f in flipped
                for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)}
    table = augmentation_indices(side, flips=True, shift=shift).numpy()
    assert table.shape == (8 * 25, side * side)
    assert {image.reshape(-1)[index].reshape(side, side).tobytes() for index in table} == expected
    shifts_only = augmentation_indices(side, flips=False, shift=1).numpy()
    assert {image.reshape(-1)[index].reshape(side, side).tobytes() for index in shifts_only} == {
        np.roll(image, (dy, dx), (0, 1)).tobytes() for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert augmentation_indices(side, flips=False, shift=0) is None


def test_a_shift_augmented_run_differs_from_a_flip_only_one_and_a_too_large_shift_is_refused(tmp_path, data):
    flips = train(data, tmp_path / "flips", tiny(augment=True), progress=False)
    shifted = train(data, tmp_path / "shifted", tiny(augment=True, augment_shift=2), progress=False)
    assert all(math.isfinite(float(r["validation_elbo"])) for r in log_rows(shifted))
    assert not same_weights(weights(flips), weights(shifted))
    assert json.loads((shifted / "config.json").read_text())["augment_shift"] == 2
    with pytest.raises(InputError, match="augment_shift must be 0 to 8 pixels"):
        train(data, tmp_path / "far", tiny(augment_shift=9), progress=False)
    assert not (tmp_path / "far").exists()


def test_an_augmented_run_trains_and_differs_from_a_plain_one(tmp_path, data):
    plain = train(data, tmp_path / "plain", tiny(), progress=False)
    augmented = train(data, tmp_path / "aug", tiny(augment=True), progress=False)
    assert all(math.isfinite(float(r["validation_elbo"])) for r in log_rows(augmented))
    assert not same_weights(weights(plain), weights(augmented))


def test_batch_plan_covers_each_image_at_most_once_per_epoch_and_changes_with_the_epoch():
    plan = batch_plan(103, 10, seed=0, epoch=1)
    assert plan.shape == (10, 10) and len(set(plan.flatten().tolist())) == 100
    assert not torch.equal(plan, batch_plan(103, 10, seed=0, epoch=2))
    assert torch.equal(plan, batch_plan(103, 10, seed=0, epoch=1))
    assert batch_plan(6, 10, seed=0, epoch=1).shape == (1, 6)


def test_threads_follow_the_setting_then_omp_num_threads_then_the_cores():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1, DistributedContext(), env={}) == 1
        torch.set_num_threads(1)
        assert configure_threads(0, DistributedContext(), env={"OMP_NUM_THREADS": "1"}) == 1
        cores = training.available_cores()
        assert configure_threads(0, DistributedContext(), env={}) == cores
        two_per_node = DistributedContext(2, 0, 0, 2, "localhost", 29500)
        assert configure_threads(0, two_per_node, env={}) == max(1, cores // 2)
    finally:
        torch.set_num_threads(before)


def test_device_choice():
    assert choose_device("auto", DistributedContext()) == torch.device(
        "cuda:0" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu", DistributedContext()) == torch.device("cpu")
    with pytest.raises(InputError, match="device must be"):
        choose_device("tpu", DistributedContext())
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            choose_device("cuda", DistributedContext())


def test_bad_settings_are_input_errors(tmp_path, data):
    for changes, name in (({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                          ({"learning_rate": -1.0}, "learning_rate"), ({"mc_samples": 0}, "mc_samples")):
        with pytest.raises(InputError, match=name):
            train(data, tmp_path / "run", tiny(**changes), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, data):
    with pytest.raises(training.TrainingDivergedError, match="lower --learning-rate"):
        train(data, tmp_path / "run", tiny(learning_rate=1e12), progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_bf16_and_several_samples_train_to_finite_elbos(tmp_path, data):
    run = train(data, tmp_path / "run", tiny(precision="bf16", mc_samples=3), progress=False)
    assert all(math.isfinite(float(r["validation_elbo"])) for r in log_rows(run))


def test_cli_trains_and_reports_an_existing_run_in_one_line(tmp_path, data, capsys):
    out = tmp_path / "run"
    argv = ["-q", "train", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--hidden", "16", "--compile", "off", "--seed", "3", "--no-augment"]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 3
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--resume" in err and len(err.splitlines()) == 1
    assert main(argv[:-1] + ["--resume", "--epochs", "2"]) == 0
    assert [r["epoch"] for r in log_rows(out)] == ["1", "2"]


def test_cli_reports_a_bad_data_set_in_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "run")]) == 2
    assert "missing.h5: no such data-set file" in capsys.readouterr().err
    assert issubclass(DatasetError, InputError)


def test_cli_resume_keeps_the_runs_own_epochs_unless_more_are_asked_for(tmp_path):
    data = write_blob_dataset(tmp_path / "d.h5", n=40, n_held_out=8)
    run = tmp_path / "run"
    small = ["--batch-size", "16", "--hidden", "16", "--compile", "off"]
    assert main(["-q", "train", str(data), "--out", str(run), "--epochs", "2", *small]) == 0
    assert main(["-q", "train", str(data), "--out", str(run), "--resume"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert main(["-q", "train", str(data), "--out", str(run), "--resume", "--epochs", "3"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3
    with open(run / "log.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]


def test_the_validation_subset_is_a_seeded_part_of_the_training_split():
    train_index = np.arange(3, 503)
    fitted, validation = training.validation_split(train_index, 0.02, seed=4)
    assert (len(fitted), len(validation)) == (490, 10)
    assert np.array_equal(np.sort(np.concatenate([fitted, validation])), train_index)
    again, same = training.validation_split(train_index, 0.02, seed=4)
    assert np.array_equal(fitted, again) and np.array_equal(validation, same)
    assert not np.array_equal(validation, training.validation_split(train_index, 0.02, seed=5)[1])
    assert len(training.validation_split(np.arange(10), 0.001, seed=0)[1]) == 1   # never empty
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(InputError, match="validation_fraction"):
            training.validation_split(train_index, fraction, seed=0)


def test_the_held_out_split_does_not_influence_training(tmp_path):
    """Changing or removing the held-out images leaves every weight, checkpoint and log entry unchanged."""
    images = gaussian_blobs(49, seed=0)
    held_out = choose_held_out(49, 8, 0)
    attrs = {"source": "t", "pixel_units": "x", "pixel_scale_arcsec": 0.4, "sky_subtracted": True}
    changed = images.copy()
    changed[held_out] = 10 * gaussian_blobs(8, seed=9)
    paths = {"original": write_dataset(tmp_path / "a.h5", images, held_out, attrs=attrs),
             "changed": write_dataset(tmp_path / "b.h5", changed, held_out, attrs=attrs),
             "without": write_dataset(tmp_path / "c.h5", images[~held_out], np.zeros(41, bool), attrs=attrs)}
    runs = {name: train(path, tmp_path / name, tiny(epochs=3), progress=False) for name, path in paths.items()}
    columns = ("epoch", "step", "train_loss", "validation_elbo")
    for name in ("changed", "without"):
        for checkpoint in ("best", "last"):
            assert same_weights(weights(runs["original"], checkpoint), weights(runs[name], checkpoint)), name
        assert [[r[c] for c in columns] for r in log_rows(runs[name])] == [
            [r[c] for c in columns] for r in log_rows(runs["original"])]


def test_a_run_from_before_the_validation_subset_cannot_be_resumed(tmp_path, data):
    run = train(data, tmp_path / "run", tiny(epochs=1), progress=False)
    config = json.loads((run / "config.json").read_text())
    del config["validation_fraction"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="chosen on the held-out split"):
        train(data, run, tiny(epochs=2), resume=True, progress=False)
    assert [r["epoch"] for r in log_rows(run)] == ["1"]


def test_the_validation_mse_is_logged_and_can_choose_the_checkpoint(tmp_path, data):
    run = train(data, tmp_path / "run", tiny(epochs=4, checkpoint_metric="mse", validation_fraction=0.2),
                progress=False)
    rows = log_rows(run)
    mse = [float(r["validation_mse"]) for r in rows]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 1 + int(np.argmin(mse))
    dataset = read_dataset(data)
    _, validation = training.validation_split(dataset.train_index, 0.2, seed=0)
    images = dataset.images[validation]
    reconstruction = load_run(run, device="cpu", checkpoint="last").reconstruct(images)
    independent = float(np.mean(np.mean((reconstruction.astype(np.float64) - images) ** 2, axis=(1, 2))))
    assert mse[-1] == pytest.approx(independent, rel=1e-4)
    with pytest.raises(InputError, match="checkpoint_metric"):
        train(data, tmp_path / "bad", tiny(checkpoint_metric="loss"), progress=False)
