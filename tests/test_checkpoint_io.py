"""models/checkpoint_io: safe reading (safetensors, weights-only pickles, shards), prefixes, atomic saving."""

import collections
import os

import pytest
import torch
from safetensors.torch import save_file

from musubi_tuner.errors import CheckpointError
from musubi_tuner.models import checkpoint_io
from musubi_tuner.models.checkpoint_io import (
    load_state_dict,
    read_keys_and_shapes,
    read_safetensors_keys,
    save_state_dict,
    strip_prefix,
)


class NotATensor:
    """Module-level so torch.save can pickle it; the weights-only reader must refuse it."""


def _sd():
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5), "steps": torch.tensor([7], dtype=torch.int64)}


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_safetensors_round_trip_and_dtype_cast(tmp_path):
    sd = _sd()
    save_state_dict(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    _assert_same(load_state_dict(tmp_path / "m.safetensors"), sd)
    cast = load_state_dict(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert cast["a.weight"].dtype == torch.bfloat16
    assert cast["steps"].dtype == torch.int64  # integers are never cast
    assert torch.equal(cast["a.weight"], sd["a.weight"].to(torch.bfloat16))
    assert read_safetensors_keys(tmp_path / "m.safetensors") == {"a.weight": (3, 4), "b.bias": (5,), "steps": (1,)}


@pytest.mark.parametrize("wrapper", [None, "module", "state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickle_unwraps_common_wrappers(tmp_path, wrapper, suffix):
    sd = _sd()
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3, "note": "x"}
    torch.save(obj, tmp_path / f"m{suffix}")
    _assert_same(load_state_dict(tmp_path / f"m{suffix}"), sd)
    assert read_keys_and_shapes(tmp_path / f"m{suffix}")["a.weight"] == (3, 4)


def test_pickle_is_read_weights_only_and_memory_mapped(tmp_path, monkeypatch):
    torch.save(_sd(), tmp_path / "m.pth")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "load", spy)
    load_state_dict(tmp_path / "m.pth")
    assert calls and calls[0]["weights_only"] is True and calls[0]["mmap"] is True


def test_legacy_pickle_format_still_loads_weights_only(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    _assert_same(load_state_dict(tmp_path / "old.pth"), sd)


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "payload": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "evil.pth", flag="--vae")
    msg = str(err.value)
    assert "--vae" in msg and "evil.pth" in msg and "weights_only" in msg and "NotATensor" in msg


class RunsCode:
    """Unpickling this would call os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("echo should-never-run",))


@pytest.mark.parametrize("write", ["torch_save", "raw_pickle_protocol_4"])
def test_pickle_that_holds_code_is_refused_as_such_not_as_corrupt(tmp_path, write):
    import pickle

    path = tmp_path / "lora.pt"
    payload = {"w": torch.ones(2), "payload": RunsCode()}
    if write == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path, flag="--dit")
    msg = str(err.value)
    assert "--dit" in msg and "lora.pt" in msg
    assert "contains code/objects that are not plain tensors" in msg and "refusing to unpickle" in msg
    assert "safetensors" in msg and "re-download" not in msg
    if write == "torch_save":
        assert "system" in msg  # names what it tried to call


def test_allowed_containers_still_load(tmp_path):
    torch.save({"w": torch.ones(2), "stats": collections.OrderedDict(x=1)}, tmp_path / "ok.pth")
    assert list(load_state_dict(tmp_path / "ok.pth")) == ["w"]


def test_missing_and_broken_files_name_path_and_flag(tmp_path):
    with pytest.raises(CheckpointError, match=r"--dit .*nope\.safetensors: file not found"):
        load_state_dict(tmp_path / "nope.safetensors", flag="--dit")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="cut.safetensors.*re-download"):
        load_state_dict(tmp_path / "cut.safetensors", flag="--dit")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_safetensors_keys(tmp_path / "cut.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError, match="junk.pth.*not a readable"):
        load_state_dict(tmp_path / "junk.pth", flag="--t5")
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_state_dict(tmp_path / "m.gguf")
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no tensors"):
        load_state_dict(tmp_path / "empty.pt")


def test_sharded_safetensors_expand_from_any_shard(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        sd = load_state_dict(tmp_path / shard)
        assert set(sd) == {"a", "b"}
        assert read_safetensors_keys(tmp_path / shard) == {"a": (2,), "b": (3,)}
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="missing model-00002-of-00002.safetensors"):
        load_state_dict(tmp_path / "model-00001-of-00002.safetensors", flag="--dit")


def test_strip_prefix():
    comfy = {"model.diffusion_model.blocks.0.w": 1, "model.diffusion_model.head.w": 2, "vae.x": 3}
    assert strip_prefix(comfy) == {"blocks.0.w": 1, "head.w": 2}  # the other models' keys are dropped
    assert strip_prefix({"diffusion_model.a": 1}) == {"a": 1}
    plain = {"blocks.0.w": 1}
    assert strip_prefix(plain) == plain and strip_prefix(plain) is not plain
    assert strip_prefix({"vae.a": 1, "b": 2}, ("vae.",)) == {"a": 1}


def test_save_is_atomic_and_keeps_metadata(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "sub" / "out.safetensors"
    save_state_dict({"x": torch.arange(6.0).view(2, 3).t()}, path, metadata={"ss_network_dim": "4"})  # non-contiguous
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "4"}
        assert torch.equal(f.get_tensor("x"), torch.arange(6.0).view(2, 3).t())
    sd = _sd()
    save_state_dict(sd, tmp_path / "out.pth")
    _assert_same(load_state_dict(tmp_path / "out.pth"), sd)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["out.pth", "out.safetensors"]
    with pytest.raises(CheckpointError, match="cannot save"):
        save_state_dict(_sd(), tmp_path / "out.txt")
