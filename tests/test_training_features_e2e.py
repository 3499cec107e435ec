"""Masks, caption dropout and validation loss through the Wan caching and training CLIs (tiny model)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_train_network
from wan_fixtures import make_workspace, run


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The Wan workspace with a mask for one image, caption dropout on the images and a validation dataset."""
    ws = make_workspace(tmp_path_factory.mktemp("wan_features"))
    data = ws.root / "data"
    masks, val = data / "masks", data / "val"
    masks.mkdir()
    val.mkdir()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    mask.save(masks / "red_dot.png")  # green_dot has none: it counts fully
    Image.open(data / "images" / "red_dot.png").transpose(Image.FLIP_LEFT_RIGHT).save(val / "flipped_dot.png")
    (val / "flipped_dot.txt").write_text("a red dot")
    text = ws.toml.read_text().replace(
        'cache_directory = "' + (data / "cache_img").as_posix() + '"',
        'cache_directory = "' + (data / "cache_img").as_posix() + '"\nmask_directory = "' + masks.as_posix()
        + '"\ncaption_dropout_rate = 0.5')
    ws.toml.write_text(text + f'\n[[validation_datasets]]\nimage_directory = "{val.as_posix()}"\n'
                              f'cache_directory = "{(data / "cache_val").as_posix()}"\n')
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args, "--device", "cpu"]) == 0
    assert run(wan_cache_text_encoder_outputs.main,
               ["--dataset_config", str(ws.toml), *ws.t5_args, "--device", "cpu"]) == 0
    return ws


def test_masks_and_the_empty_caption_are_cached_and_validation_items_too(ws):
    cache = ws.root / "data" / "cache_img"
    with safe_open(str(cache / "red_dot_0032x0032_wan.safetensors"), "pt") as f:
        mask = f.get_tensor("mask_float32")
    assert mask.shape == (1, 1, 4, 4)  # latents (16, 1, 4, 4): one weight per latent cell
    assert torch.equal(mask[0, 0], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))
    with safe_open(str(cache / "green_dot_0032x0032_wan.safetensors"), "pt") as f:
        assert "mask_float32" not in f.keys()
    with safe_open(str(cache / "wan_empty_caption_te.safetensors"), "pt") as f:
        assert f.metadata()["caption1"] == ""
    assert not (ws.root / "data" / "cache_vid" / "wan_empty_caption_te.safetensors").exists()  # no dropout there
    assert sorted(p.name for p in (ws.root / "data" / "cache_val").iterdir()) == [
        "flipped_dot_0032x0032_wan.safetensors", "flipped_dot_wan_te.safetensors"]


def test_validation_is_printed_and_leaves_training_and_resume_bit_exact(ws, tmp_path, capsys):
    extra = ["--save_every_n_steps", "2", "--save_state", "--network_dropout", "0.1"]
    plain, validated, resumed = tmp_path / "plain", tmp_path / "validated", tmp_path / "resumed"
    assert run(wan_train_network.main, ws.train_args(plain, 4, *extra)) == 0
    capsys.readouterr()
    assert run(wan_train_network.main, ws.train_args(validated, 4, *extra, "--validate_every_n_steps", "2")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("validation loss at step")]
    assert [line.split(":")[0] for line in lines] == ["validation loss at step 2", "validation loss at step 4"]
    assert "t0-250" in lines[0] and "t750-1000" in lines[0] and lines[0] != lines[1]
    assert run(wan_train_network.main,
               ws.train_args(resumed, 4, *extra, "--resume", str(plain / "lora-step00000002-state"))) == 0
    want = load_file(str(plain / "lora.safetensors"))
    for other in (validated, resumed):  # validation changes nothing; resume with caption dropout is exact
        got = load_file(str(other / "lora.safetensors"))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (other.name, key)


def test_validation_flag_without_validation_datasets_is_one_line(ws, tmp_path, capsys):
    toml = tmp_path / "no_validation.toml"
    toml.write_text(ws.toml.read_text().split("[[validation_datasets]]")[0])
    args = ws.train_args(tmp_path / "o", 1, "--validate_every_n_epochs", "1")
    args[args.index(str(ws.toml))] = str(toml)
    assert run(wan_train_network.main, args) == 2
    err = capsys.readouterr().err
    assert f"--validate_every_n_epochs: {toml} has no [[validation_datasets]]" in err and "Traceback" not in err
