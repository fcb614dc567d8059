"""Data parallelism through torchrun + DDP, on the CPU with the gloo backend and 2 processes."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from galaxyvae.config import ModelConfig, TrainConfig
from galaxyvae.errors import InputError
from galaxyvae.runs import load_checkpoint
from galaxyvae.training import DistributedContext, train
from tests.helpers import write_blob_dataset

TORCHRUN_ENV = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "node7", "MASTER_PORT": "29517"}


def test_the_torchrun_environment_is_read():
    context = DistributedContext.from_env(TORCHRUN_ENV)
    assert context == DistributedContext(world_size=4, rank=3, local_rank=1, local_world_size=2,
                                         master_addr="node7", master_port=29517)
    assert context.distributed and not context.is_main


def test_without_torchrun_variables_there_is_one_process():
    context = DistributedContext.from_env({})
    assert not context.distributed and context.is_main and context.world_size == 1
    assert DistributedContext.from_env({"WORLD_SIZE": "1"}) == context


@pytest.mark.parametrize("change, message", [
    ({"MASTER_PORT": None}, "MASTER_PORT is not set"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({"MASTER_PORT": "70000"}, "not a TCP port"),
    ({"MASTER_ADDR": None}, "MASTER_ADDR is not set"),
    ({"RANK": None}, "RANK is not set"),
    ({"RANK": "4"}, "inconsistent torchrun environment"),
])
def test_a_broken_torchrun_environment_is_an_input_error(change, message):
    env = dict(TORCHRUN_ENV)
    for name, value in change.items():
        if value is None:
            del env[name]
        else:
            env[name] = value
    with pytest.raises(InputError, match=message):
        DistributedContext.from_env(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_like_one_process_seeing_the_whole_batch(tmp_path):
    data = write_blob_dataset(tmp_path / "blobs.h5", n=41, n_held_out=8)  # 32 fitted, 1 for validation
    options = ["--epochs", "2", "--batch-size", "8", "--hidden", "16", "--compile", "off", "--device", "cpu"]
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "galaxyvae.cli", "-q", "train", str(data), "--out", str(tmp_path / "ddp"), *options]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE", "RANK")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[:6000]

    execution = json.loads((tmp_path / "ddp" / "versions.json").read_text())["execution"]
    assert execution["world_size"] == 2 and execution["master_port"] == port
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "checkpoints", "config.json", "data.json", "log.csv", "versions.json"]

    config = TrainConfig(epochs=2, batch_size=8, compile="off", device="cpu", threads=1, model=ModelConfig(hidden=16))
    single = train(data, tmp_path / "single", config, progress=False)
    ddp, one = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (tmp_path / "ddp", single))
    assert ddp["world_size"] == 2 and ddp["step"] == one["step"] == 8
    for name, weight in one["model_state"].items():
        if name.startswith("pixel_"):
            assert torch.equal(weight, ddp["model_state"][name])
            continue
        difference = (ddp["model_state"][name] - weight).norm()
        assert difference <= 1e-3 * weight.norm() + 1e-5, name
    assert abs(ddp["history"][-1]["validation_elbo"] - one["history"][-1]["validation_elbo"]) < 1e-3 * abs(
        one["history"][-1]["validation_elbo"])
