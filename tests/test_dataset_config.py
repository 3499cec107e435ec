"""Dataset config schema, key by key, and the message of each bad input."""

import json
import logging
from pathlib import Path

import pytest

from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.dataset.traits import DatasetTraits
from musubi_tuner.errors import DatasetConfigError

WAN = DatasetTraits(cache_code="wan", architecture="wan", frame_stride=4, target_fps=16.0, control="optional")
KONTEXT = DatasetTraits(cache_code="fk", architecture="flux_kontext", frame_stride=None, target_fps=None,
                        control="required")
IMAGES_ONLY_NO_CONTROL = DatasetTraits(cache_code="img", architecture="img", frame_stride=None, control="none")


@pytest.fixture
def dirs(tmp_path):
    for name in ("img", "vid", "ctrl", "img2"):
        (tmp_path / name).mkdir()
    (tmp_path / "meta.jsonl").write_text("")
    return tmp_path


def write(tmp_path: Path, text: str, name="ds.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load(tmp_path, text, traits=WAN):
    return load_dataset_config(write(tmp_path, text), traits)


def test_general_fallbacks_and_defaults(dirs):
    specs = load(dirs, f"""
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 2
enable_bucket = true

[[datasets]]
image_directory = "{dirs/'img'}"
cache_directory = "{dirs/'cache1'}"
num_repeats = 3

[[datasets]]
video_directory = "{dirs/'vid'}"
cache_directory = "{dirs/'cache2'}"
batch_size = 1
resolution = 512
target_frames = [1, 25, 45]
frame_extraction = "slide"
frame_stride = 10
source_fps = 30.0
""")
    img, vid = specs
    assert (img.index, img.kind, vid.index, vid.kind) == (0, "image", 1, "video")
    assert img.resolution == (960, 544) and img.batch_size == 2 and img.num_repeats == 3
    assert img.enable_bucket is True and img.bucket_no_upscale is False and img.caption_extension == ".txt"
    assert img.image_directory == dirs / "img" and img.cache_directory == dirs / "cache1"
    assert vid.resolution == (512, 512) and vid.batch_size == 1 and vid.num_repeats == 1
    assert vid.target_frames == (1, 25, 45) and vid.frame_extraction == "slide" and vid.frame_stride == 10
    assert vid.source_fps == 30.0 and vid.frame_sample == 1 and vid.max_frames == 129
    assert vid.video_directory == dirs / "vid"


def test_reference_defaults(dirs):
    (spec,) = load(dirs, f'[[datasets]]\nvideo_directory = "{dirs/"vid"}"\ncaption_extension = ".txt"\n')
    assert spec.resolution == (960, 544) and spec.enable_bucket is False and spec.batch_size == 1
    assert spec.target_frames == (1,) and spec.frame_extraction == "head" and spec.max_frames == 129
    assert spec.source_fps is None and spec.fp_latent_window_size == 9
    # no cache_directory: the media directory, as the reference does
    assert spec.cache_directory == dirs / "vid"


def test_json_config(dirs):
    p = dirs / "ds.json"
    p.write_text(json.dumps({"general": {"caption_extension": ".txt"},
                             "datasets": [{"image_directory": str(dirs / "img"), "resolution": [256, 256]}]}))
    (spec,) = load_dataset_config(p, WAN)
    assert spec.resolution == (256, 256) and spec.kind == "image"


def test_relative_paths_fall_back_to_config_folder(dirs, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    (spec,) = load(dirs, '[[datasets]]\nimage_directory = "img"\ncaption_extension = ".txt"\n')
    assert spec.image_directory == dirs / "img"


def test_relative_cache_and_control_follow_the_media_root(dirs, monkeypatch, tmp_path_factory):
    """Media found beside the config: the cache (not created yet) and the controls go under the same root."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    (spec,) = load(dirs, '[[datasets]]\nimage_directory = "img"\ncaption_extension = ".txt"\n'
                         'cache_directory = "cache/img"\ncontrol_directory = "ctrl"\n')
    assert spec.cache_directory == dirs / "cache/img" and spec.control_directory == dirs / "ctrl"
    assert not (elsewhere / "cache").exists()


def test_relative_paths_found_in_the_working_directory_stay_there(dirs, monkeypatch, tmp_path_factory):
    """The reference's rule: one root, the working directory, when the media is found there."""
    here = tmp_path_factory.mktemp("here")
    (here / "img").mkdir()
    monkeypatch.chdir(here)
    (spec,) = load(dirs, '[[datasets]]\nimage_directory = "img"\ncaption_extension = ".txt"\n'
                         'cache_directory = "cache"\n')
    assert spec.image_directory.resolve() == here / "img" and spec.cache_directory.resolve() == here / "cache"
    with pytest.raises(DatasetConfigError, match="control_directory 'ctrl' is not an existing directory"):
        load(dirs, '[[datasets]]\nimage_directory = "img"\ncaption_extension = ".txt"\ncontrol_directory = "ctrl"\n')


def test_target_frames_rounded_with_warning(dirs, caplog):
    with caplog.at_level(logging.WARNING):
        (spec,) = load(dirs, f'[[datasets]]\nvideo_directory = "{dirs/"vid"}"\ncaption_extension = ".txt"\n'
                             "target_frames = [24, 1, 25, 8]\n")
    assert spec.target_frames == (1, 5, 21, 25)
    assert "rounded down to [1, 5, 21, 25]" in caplog.text


def test_uniform_with_one_sample_becomes_head(dirs, caplog):
    with caplog.at_level(logging.WARNING):
        (spec,) = load(dirs, f'[[datasets]]\nvideo_directory = "{dirs/"vid"}"\ncaption_extension = ".txt"\n'
                             'frame_extraction = "uniform"\n')
    assert spec.frame_extraction == "head" and "uniform" in caplog.text


def test_deprecated_keys_renamed(dirs, caplog):
    with caplog.at_level(logging.WARNING):
        (spec,) = load(dirs, f'[[datasets]]\nimage_directory = "{dirs/"img"}"\ncaption_extension = ".txt"\n'
                             f'control_directory = "{dirs/"ctrl"}"\n'
                             "flux_kontext_no_resize_control = true\nqwen_image_edit_control_resolution = [512, 384]\n",
                       KONTEXT)
    assert spec.no_resize_control is True and spec.control_resolution == (512, 384)
    assert "'flux_kontext_no_resize_control' renamed" in caplog.text


def test_control_directory_ignored_without_control(dirs, caplog):
    with caplog.at_level(logging.WARNING):
        (spec,) = load(dirs, f'[[datasets]]\nimage_directory = "{dirs/"img"}"\ncaption_extension = ".txt"\n'
                             f'control_directory = "{dirs/"ctrl"}"\n', IMAGES_ONLY_NO_CONTROL)
    assert spec.control_directory is None and "control_directory is ignored" in caplog.text


def test_fp_keys_accepted(dirs):
    (spec,) = load(dirs, f'[[datasets]]\nimage_directory = "{dirs/"img"}"\ncaption_extension = ".txt"\n'
                         "fp_latent_window_size = 5\nfp_1f_clean_indices = [0, 10]\nfp_1f_target_index = 1\n"
                         "fp_1f_no_post = true\n")
    assert spec.fp_1f_clean_indices == (0, 10) and spec.control_count == 2 and spec.fp_latent_window_size == 5


BAD = [
    ("no datasets", "[general]\nbatch_size = 1\n", "no [[datasets]]"),
    ("top-level", "foo = 1\n[[datasets]]\nimage_directory = 'IMG'\n", "unknown top-level key(s) ['foo']"),
    ("unknown key", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nbatchsize = 2\n",
     "[[datasets]][0]: unknown key(s) ['batchsize']; keys allowed in an image dataset: alpha_mask, batch_size"),
    ("video key in general", "[general]\ntarget_frames = [1]\n[[datasets]]\nimage_directory = 'IMG'\n",
     "[general]: unknown key(s) ['target_frames']"),
    ("video key in image ds", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nmax_frames = 9\n",
     "unknown key(s) ['max_frames']"),
    ("image key in video ds", "[[datasets]]\nvideo_directory = 'VID'\ncaption_extension='.txt'\n"
     "no_resize_control = true\n", "unknown key(s) ['no_resize_control']; keys allowed in a video dataset"),
    ("two sources", "[[datasets]]\nimage_directory = 'IMG'\nvideo_directory = 'VID'\n", "give exactly one of"),
    ("no source", "[[datasets]]\nbatch_size = 1\n", "(found none)"),
    ("missing dir", "[[datasets]]\nimage_directory = 'nope'\n", "image_directory 'nope' is not an existing directory"),
    ("bad type", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nbatch_size = '2'\n",
     "[[datasets]][0]: batch_size: must be an integer, got '2'"),
    ("bool not int", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nnum_repeats = true\n",
     "num_repeats: must be an integer"),
    ("zero batch", "[general]\nbatch_size = 0\n[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\n",
     "[general]: batch_size: must be >= 1, got 0"),
    ("bad resolution", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nresolution = [1, 2, 3]\n",
     "resolution: must be an integer or [width, height]"),
    ("bad bool", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nenable_bucket = 'yes'\n",
     "enable_bucket: must be true or false"),
    ("bad mode", "[[datasets]]\nvideo_directory = 'VID'\ncaption_extension='.txt'\nframe_extraction = 'all'\n",
     "frame_extraction: must be one of head, chunk, slide, uniform, full, got 'all'"),
    ("bad target_frames", "[[datasets]]\nvideo_directory = 'VID'\ncaption_extension='.txt'\ntarget_frames = []\n",
     "target_frames: must be a non-empty list of integers"),
    ("zero frames", "[[datasets]]\nvideo_directory = 'VID'\ncaption_extension='.txt'\ntarget_frames = [0]\n",
     "target_frames: must be >= 1"),
    ("bad fps", "[[datasets]]\nvideo_directory = 'VID'\ncaption_extension='.txt'\nsource_fps = -1.0\n",
     "source_fps: must be a positive number"),
    ("no caption ext", "[[datasets]]\nimage_directory = 'IMG'\n", "caption_extension is required"),
    ("caption ext dot", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension = 'txt'\n", "write \".txt\""),
    ("jsonl no cache", "[[datasets]]\nimage_jsonl_file = 'JSONL'\n",
     "cache_directory is required with image_jsonl_file"),
    ("shared cache", "[general]\ncaption_extension='.txt'\n[[datasets]]\nimage_directory = 'IMG'\n"
     "cache_directory = 'C'\n[[datasets]]\nimage_directory = 'IMG2'\ncache_directory = 'C'\n",
     "[[datasets]][1]: cache_directory"),
    ("shared media dir", "[general]\ncaption_extension='.txt'\n[[datasets]]\nimage_directory = 'IMG'\n"
     "[[datasets]]\nimage_directory = 'IMG'\n", "also used by [[datasets]][0]"),
    ("fixed res step", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nresolution = [1000, 562]\n",
     "resolution 1000x562 must be multiples of 16 when enable_bucket is false; use e.g. resolution = [992, 560]"),
    ("multiple_target", "[[datasets]]\nimage_directory = 'IMG'\ncaption_extension='.txt'\nmultiple_target = true\n",
     "multiple_target: multiple targets"),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_file_index_and_key(dirs, name, text, message):
    text = (text.replace("'IMG2'", repr(str(dirs / "img2"))).replace("'IMG'", repr(str(dirs / "img")))
            .replace("'VID'", repr(str(dirs / "vid"))).replace("'JSONL'", repr(str(dirs / "meta.jsonl")))
            .replace("'C'", repr(str(dirs / "c"))))
    path = write(dirs, text)
    with pytest.raises(DatasetConfigError) as err:
        load_dataset_config(path, WAN)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_video_dataset_for_image_only_architecture(dirs):
    path = write(dirs, f'[[datasets]]\nvideo_directory = "{dirs/"vid"}"\ncaption_extension = ".txt"\n')
    with pytest.raises(DatasetConfigError, match="trains on images only"):
        load_dataset_config(path, KONTEXT)


def test_required_control_needs_control_directory(dirs):
    path = write(dirs, f'[[datasets]]\nimage_directory = "{dirs/"img"}"\ncaption_extension = ".txt"\n')
    with pytest.raises(DatasetConfigError, match="needs a control image per item; add control_directory"):
        load_dataset_config(path, KONTEXT)


def test_file_problems(dirs):
    with pytest.raises(DatasetConfigError, match="dataset config not found"):
        load_dataset_config(dirs / "missing.toml", WAN)
    with pytest.raises(DatasetConfigError, match="unsupported config format '.yaml'"):
        load_dataset_config(write(dirs, "a: 1", "ds.yaml"), WAN)
    with pytest.raises(DatasetConfigError, match="cannot parse TOML"):
        load_dataset_config(write(dirs, "[[datasets]\n"), WAN)
    with pytest.raises(DatasetConfigError, match="cannot parse JSON"):
        load_dataset_config(write(dirs, "{", "ds.json"), WAN)
