"""Saving, resuming and interrupting through the training CLI (tiny Wan): failed saves, damaged or
mismatching states, Ctrl-C, and states saved by the reference (accelerate's save_state layout)."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
from safetensors import safe_open

from musubi_tuner import wan_train_network
from wan_fixtures import make_cached_workspace, run


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_cached_workspace(tmp_path_factory.mktemp("wan_saves"))


@pytest.fixture(scope="module")
def saved_state(ws, tmp_path_factory):
    """A run of 2 steps with --save_state; its final state folder."""
    out = tmp_path_factory.mktemp("state_run")
    assert run(wan_train_network.main, ws.train_args(out, 2, "--save_state_on_train_end")) == 0
    return out / "lora-state"


@pytest.fixture
def no_dit(monkeypatch):
    """Any DiT load fails the test: the checks under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the DiT was loaded before the check")

    monkeypatch.setattr("musubi_tuner.architectures.wan.WanArchitecture.load_dit", refuse)


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_full_disk_at_a_save_point_is_logged_and_retried_at_the_next(ws, tmp_path, monkeypatch, caplog):
    import musubi_tuner.networks.lora_files as lora_files

    real, calls = lora_files.save_lora_file, []

    def full_once(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_files, "save_lora_file", full_once)
    out = tmp_path / "out"
    args = ws.train_args(out, 5, "--save_every_n_steps", "2", "--save_last_n_steps", "1")
    assert run(wan_train_network.main, args) == 0
    assert "could not save" in caplog.text and "lora-step00000002.safetensors" in caplog.text
    assert "no space left on device" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["lora-step00000004.safetensors", "lora.safetensors"]
    assert _metadata(out / "lora.safetensors")["ss_steps"] == "5"


def test_a_failed_final_save_goes_to_a_fallback_folder(ws, tmp_path, monkeypatch, caplog, capsys):
    import musubi_tuner.networks.lora_files as lora_files

    out, rescue_base = tmp_path / "out", tmp_path / "tmp"
    rescue_base.mkdir()
    real = lora_files.save_lora_file

    def read_only_output_dir(sd, path, *args, **kwargs):
        if path.parent == out:
            raise OSError(errno.EACCES, "Permission denied")
        return real(sd, path, *args, **kwargs)

    monkeypatch.setattr(lora_files, "save_lora_file", read_only_output_dir)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(rescue_base))
    assert run(wan_train_network.main, ws.train_args(out, 1)) == 0
    rescued = rescue_base / "musubi_tuner_rescued_lora" / "lora.safetensors"
    assert rescued.is_file() and _metadata(rescued)["ss_steps"] == "1"
    assert f"saved to {rescued}" in caplog.text
    assert f"LoRA saved: {rescued}" in capsys.readouterr().out


def test_ctrl_c_reports_the_step_the_saves_and_the_resume_command(ws, tmp_path, monkeypatch, capsys):
    from musubi_tuner.training.trainer import NetworkTrainer

    real, calls = NetworkTrainer._train_step, []

    def interrupted_at_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(NetworkTrainer, "_train_step", interrupted_at_third)
    out = tmp_path / "out"
    argv = ws.train_args(out, 6, "--save_every_n_steps", "1", "--save_state")
    assert run(wan_train_network.main, argv) == 130
    err = capsys.readouterr().err
    state = out / "lora-step00000002-state"
    assert "training interrupted at step 2 of 6 (epoch 1)" in err
    assert f"last saved LoRA: {out / 'lora-step00000002.safetensors'}" in err
    assert f"last saved state: {state}" in err
    assert f"--output_name lora --save_every_n_steps 1 --save_state --resume {state}" in err
    assert "--resume auto" in err and "Traceback" not in err


def test_ctrl_c_without_states_says_how_to_keep_going(ws, tmp_path, monkeypatch, capsys):
    from musubi_tuner.training.trainer import NetworkTrainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(NetworkTrainer, "_train_step", interrupted)
    assert run(wan_train_network.main, ws.train_args(tmp_path / "out", 3)) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 0 of 3" in err and "add --save_state" in err and "resume with" not in err


def test_output_dir_that_is_a_file_fails_before_any_model_loads(ws, tmp_path, no_dit, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert run(wan_train_network.main, ws.train_args(out, 1)) == 2
    assert "--output_dir" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "saved"), [("--network_dim", "8", "4"), ("--optimizer_type", "sgd", "adamw"),
                                                       ("--network_alpha", "2", "4.0")])
def test_resume_with_other_flags_is_refused_before_the_dit_loads(ws, tmp_path, saved_state, no_dit, capsys,
                                                                flag, value, saved):
    args = ws.train_args(tmp_path / "o", 4, "--resume", str(saved_state))
    args[args.index(flag) + 1] = value
    assert run(wan_train_network.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the state was saved with {flag} {saved}, this run has {flag} {value}" in err


@pytest.mark.parametrize("damaged", ["optimizer.pt", "network.safetensors", "rng.pt", "lr_scheduler.pt"])
def test_a_truncated_state_file_is_one_line_naming_it(ws, tmp_path, saved_state, no_dit, capsys, damaged):
    state = tmp_path / "lora-state"
    shutil.copytree(saved_state, state)
    data = (state / damaged).read_bytes()
    (state / damaged).write_bytes(data[: len(data) // 2])
    assert run(wan_train_network.main, ws.train_args(tmp_path / "o", 4, "--resume", str(state))) == 2
    err = capsys.readouterr().err
    assert f"error: --resume {state}: {damaged} is damaged" in err and "Traceback" not in err


def test_resuming_a_finished_state_says_so(ws, tmp_path, saved_state, no_dit, capsys):
    assert run(wan_train_network.main, ws.train_args(tmp_path / "o", 2, "--resume", str(saved_state))) == 2
    assert "the state is at step 2, which already reaches the 2 steps of --max_train_steps" in capsys.readouterr().err


def _reference_state(ws, folder, lora_plus: bool = False):
    """A state folder as the reference writes it: accelerate's save_state of the prepared LoRA network (its
    `lora_unet_...` state dict), an AdamW over each module's (down, up) pair in module order (LoRA+: downs,
    then ups), and a LambdaLR scheduler, after 2 optimizer steps. Returns (network, optimizer)."""
    from accelerate.checkpointing import save_accelerator_state

    from musubi_tuner.architectures.wan.dit_files import load_wan_dit
    from musubi_tuner.networks.lora import create_network

    torch.manual_seed(7)
    network = create_network("wan", load_wan_dit(ws.dit, dtype=torch.float32), 4, 4)
    downs = [m.lora_down.weight for m in network.loras]
    ups = [m.lora_up.weight for m in network.loras]
    groups = ([{"params": downs}, {"params": ups, "lr": 4e-3}] if lora_plus
              else [{"params": [p for pair in zip(downs, ups) for p in pair]}])
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(2):
        for p in downs + ups:
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    folder.mkdir(parents=True)  # Accelerator.save_state creates it before writing
    save_accelerator_state(str(folder), [network.state_dict()], [optimizer], [scheduler], [], 0, 0,
                           safe_serialization=True)
    return network, optimizer


@pytest.mark.parametrize("lora_plus", [False, True])
def test_a_reference_state_maps_weights_and_optimizer_by_name(ws, tmp_path, lora_plus):
    from musubi_tuner.architectures.wan.dit_files import load_wan_dit
    from musubi_tuner.networks.lora import create_network
    from musubi_tuner.training.checkpoint_files import is_reference_state
    from musubi_tuner.training.reference_state import read_reference_state
    from musubi_tuner.training.state import apply_state

    folder = tmp_path / "lora-step00000002-state"
    ref_net, ref_opt = _reference_state(ws, folder, lora_plus)
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= {
        p.name for p in folder.iterdir()}
    assert is_reference_state(folder)
    torch.manual_seed(8)
    args = ["loraplus_lr_ratio=4"] if lora_plus else None
    network = create_network("wan", load_wan_dit(ws.dit, dtype=torch.float32), 4, 4, network_args=args)
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(1e-3), lr=1e-3)  # our order: downs, then ups
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    progress = apply_state(read_reference_state(folder, steps_per_epoch=3, accumulation=1), network=network,
                           optimizer=optimizer, lr_scheduler=scheduler, noise_generator=torch.Generator())
    assert (progress.global_step, progress.epoch, progress.batch_in_epoch) == (2, 0, 2)
    assert scheduler.last_epoch == 2
    ref_params, params = dict(ref_net.named_parameters()), dict(network.named_parameters())
    for name in ("lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_1_ffn_2.lora_up.weight"):
        assert torch.equal(params[name], ref_params[name])
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[params[name]][key], ref_opt.state[ref_params[name]][key]), (name, key)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def test_training_resumes_from_a_reference_state(ws, tmp_path, caplog):
    out = tmp_path / "out"
    folder = out / "lora-step00000002-state"
    _reference_state(ws, folder)
    with caplog.at_level("INFO"):
        assert run(wan_train_network.main, ws.train_args(out, 4, "--resume", "auto")) == 0
    assert "step 2 taken from the folder name" in caplog.text
    assert "random number streams and the data order within the epoch do not" in caplog.text
    assert _metadata(out / "lora.safetensors")["ss_steps"] == "4"


def test_a_reference_state_of_another_rank_is_refused_before_the_dit_loads(ws, tmp_path, no_dit, capsys):
    folder = tmp_path / "lora-000001-state"
    _reference_state(ws, folder)
    args = ws.train_args(tmp_path / "o", 8, "--resume", str(folder))
    args[args.index("--network_dim") + 1] = "8"
    assert run(wan_train_network.main, args) == 2
    assert "the state's LoRA has rank 4, this run has --network_dim 8" in capsys.readouterr().err
