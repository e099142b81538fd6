"""A run folder belongs to the loop that wrote its checkpoints: vp2o sft keeps only its newest
checkpoint and vp2o train prunes to train.keep_last and resumes from the newest, so neither may
start in the other's folder (sft used to delete a train run's checkpoints there; train stopped
with a KeyError on an SFT checkpoint). Checked before any process group or model exists."""

from __future__ import annotations

import json

import pytest

from vp2o import session as session_module
from vp2o import sft as sft_module
from vp2o import train as train_module
from vp2o.config import ConfigError, load_config
from vp2o.mcore.checkpoint import CheckpointError


def _fake_checkpoint(root, step, kind):
    """A complete checkpoint as far as the folder checks read it (its marker)."""
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "complete.json").write_text(json.dumps({"step": step, "world_size": 1, "kind": kind}))
    return path


@pytest.fixture
def no_start(monkeypatch):
    started = []
    monkeypatch.setattr(session_module.parallel, "initialize", lambda cfg: started.append(cfg))
    return started


@pytest.mark.parametrize(("loop", "other"), [("sft", "train"), ("train", "sft")])
def test_a_loop_refuses_the_folder_of_the_other(tmp_path, no_start, loop, other):
    ckpts = tmp_path / "run" / "checkpoints"
    kept = [_fake_checkpoint(ckpts, step, other) for step in (3, 4)]
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}"])
    run = sft_module.sft if loop == "sft" else train_module.train
    with pytest.raises(ConfigError) as err:
        run(cfg)
    message = str(err.value)
    assert message.startswith(f"train.run_dir = '{tmp_path / 'run'}': expected a new folder")
    assert f"2 checkpoint(s) written by vp2o {other} (newest step_00000004)" in message
    if loop == "train":
        assert f"train.init_checkpoint={kept[-1]}" in message
    assert no_start == [] and all(p.is_dir() for p in kept)


def test_a_loop_continues_in_its_own_folder(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(ckpts, 5, "train")
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}"])
    session_module.claim_run_dir(cfg, "train")  # no error
    with pytest.raises(ConfigError, match="written by vp2o train"):
        session_module.claim_run_dir(cfg, "sft")


def test_resuming_from_an_sft_checkpoint_names_it_and_the_way_to_start_from_it(tmp_path):
    sft_ckpt = _fake_checkpoint(tmp_path / "sft" / "checkpoints", 40, "sft")
    cfg = load_config(None, [f"train.resume={sft_ckpt}"])
    with pytest.raises(CheckpointError) as err:
        train_module._resume_path(cfg, tmp_path / "run" / "checkpoints")
    assert str(err.value) == (
        f"train.resume = '{sft_ckpt}': checkpoint {sft_ckpt} was written by vp2o sft, not vp2o "
        f"train (it has no trainer state to resume); to start from its weights: "
        f"train.init_checkpoint={sft_ckpt}"
    )
    train_ckpt = _fake_checkpoint(tmp_path / "run" / "checkpoints", 7, "train")
    auto = load_config(None, [])
    assert train_module._resume_path(auto, tmp_path / "run" / "checkpoints") == train_ckpt


def test_a_resume_value_that_is_no_directory_names_the_key(tmp_path):
    cfg = load_config(None, ["train.resume=Auto"])
    with pytest.raises(CheckpointError) as err:
        train_module._resume_path(cfg, tmp_path / "run" / "checkpoints")
    assert str(err.value) == ("train.resume = 'Auto': expected auto, never, or a checkpoint "
                              "directory (step_*) that exists")


def test_an_init_checkpoint_folder_without_a_complete_checkpoint_names_what_it_holds(tmp_path):
    """It used to say the folder itself had no complete.json and to suggest a Python function."""
    from types import SimpleNamespace

    folder = tmp_path / "ckpts"
    (folder / "step_00000003").mkdir(parents=True)  # a save that did not finish
    with pytest.raises(CheckpointError) as err:
        session_module.load_initial_weights(SimpleNamespace(model=None), folder)
    assert str(err.value) == (f"train.init_checkpoint = '{folder}': no complete checkpoint in it "
                              "(step_00000003: no readable complete.json, saves that did not "
                              "finish?)")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="expected a step_\\* checkpoint, a folder of them"):
        session_module.load_initial_weights(SimpleNamespace(model=None), empty)


@pytest.mark.parametrize("launcher", [{"RANK": "0", "WORLD_SIZE": "2"},
                                      {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}],
                         ids=["torchrun", "srun"])
def test_sft_checks_its_batch_against_the_data_parallel_size_before_starting(tmp_path, no_start,
                                                                             monkeypatch,
                                                                             launcher):
    """It used to raise only after the model and optimizer were built. The world comes from
    the launcher's variables as parallel.initialize reads them."""
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, ["sft.batch_size=3", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^sft.batch_size = 3: expected a multiple of the "
                                          r"data-parallel size \(2\)$"):
        sft_module.sft(cfg)
    assert no_start == []
