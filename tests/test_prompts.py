"""Prompt specs: every option of the line syntax, prompt files, defaults, interactive input."""

import io
import json
import logging

import pytest

from musubi_tuner.errors import UserError
from musubi_tuner.inference.prompts import (
    PromptSpec,
    interactive_prompts,
    load_prompt_file,
    parse_prompt_line,
)

FULL_LINE = (
    "a cat walks, slowly --w 832 --h 480 --f 81 --d 42 --s 30 --l 5.5 --g 6.0 --fs 3.0 --n blurry, bad hands"
    " --i start.png --ei end.png --cn ctrl.mp4 --ci a.png --ci b.png --of target_index=1,control_index=0"
    " --im mask.png --cim m1.png --cim m2.png --vs 3"
)


def test_every_option():
    spec = parse_prompt_line(FULL_LINE)
    assert spec == PromptSpec(
        prompt="a cat walks, slowly",
        width=832,
        height=480,
        frames=81,
        seed=42,
        steps=30,
        guidance_scale=5.5,
        embedded_guidance=6.0,
        flow_shift=3.0,
        negative_prompt="blurry, bad hands",
        image_path="start.png",
        end_image_path="end.png",
        control_path="ctrl.mp4",
        control_image_paths=["a.png", "b.png"],
        one_frame="target_index=1,control_index=0",
        image_mask_path="mask.png",
        control_image_mask_paths=["m1.png", "m2.png"],
        video_sections=3,
    )


def test_options_are_case_insensitive_and_prompt_stripped():
    spec = parse_prompt_line("  a dog  --W 64 --H 32  ")
    assert (spec.prompt, spec.width, spec.height) == ("a dog", 64, 32)


@pytest.mark.parametrize("line", ["", "   ", "# a comment --w 64", "   # indented comment"])
def test_blank_and_comment_lines(line):
    assert parse_prompt_line(line) is None


@pytest.mark.parametrize("line,option", [
    ("x --s 0", "--s"), ("x --s 5000", "--s"), ("x --w 0", "--w"), ("x --h -16", "--h"), ("x --f 0", "--f"),
    ("x --w wide", "--w"), ("x --l nan", "--l"), ("x --d -1", "--d"), ("x --vs 0", "--vs"), ("x --zz 3", "--zz"),
])
def test_bad_option_or_value_is_an_error_naming_where_and_the_option(line, option):
    # the reference skipped these with a warning (or clamped --s): a typo then went unnoticed until a sample
    with pytest.raises(UserError) as err:
        parse_prompt_line(line, where="p.txt line 4")
    assert str(err.value).startswith(f"p.txt line 4: {option}")


def test_steps_in_range_are_kept():
    assert parse_prompt_line("x --s 1").steps == 1 and parse_prompt_line("x --s 1000").steps == 1000


def test_defaults_fill_missing_fields_and_are_not_mutated():
    defaults = PromptSpec(width=256, height=256, frames=1, seed=0, steps=20, negative_prompt="neg",
                          control_image_paths=["d.png"])
    spec = parse_prompt_line("x --w 512 --ci c.png", defaults)
    assert (spec.width, spec.height, spec.frames, spec.steps, spec.negative_prompt) == (512, 256, 1, 20, "neg")
    assert spec.control_image_paths == ["c.png"]
    assert parse_prompt_line("y", defaults).control_image_paths == ["d.png"]
    assert defaults.control_image_paths == ["d.png"] and defaults.prompt == ""


def test_g_means_cfg_for_generate_scripts():
    spec = parse_prompt_line("x --g 4.0", g_means_cfg=True)
    assert spec.guidance_scale == 4.0 and spec.embedded_guidance is None


def test_txt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\nfirst --d 1\n  \nsecond --w 64 --d 2\n#x --d 3\n", encoding="utf-8")
    specs = load_prompt_file(path, PromptSpec(width=32))
    assert [(s.prompt, s.seed, s.width, s.index) for s in specs] == [("first", 1, 32, 0), ("second", 2, 64, 1)]


def test_toml_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        """
[prompt]
width = 640
height = 360
sample_steps = 25
negative_prompt = "ugly"

[[prompt.subset]]
prompt = "a cat"
seed = 1
cfg_scale = 4.0

[[prompt.subset]]
prompt = "a dog"
width = 320
frame_count = 17
guidance_scale = 6.0
discrete_flow_shift = 7.0
control_image_path = ["a.png", "b.png"]
image_path = "i.png"
end_image_path = "e.png"
control_video_path = "c.mp4"
one_frame = "target_index=1"
""",
        encoding="utf-8",
    )
    cat, dog = load_prompt_file(path)
    assert (cat.prompt, cat.width, cat.height, cat.steps, cat.seed, cat.guidance_scale, cat.negative_prompt) == (
        "a cat", 640, 360, 25, 1, 4.0, "ugly")
    assert (dog.width, dog.frames, dog.embedded_guidance, dog.flow_shift) == (320, 17, 6.0, 7.0)
    assert dog.guidance_scale is None
    assert dog.control_image_paths == ["a.png", "b.png"]
    assert (dog.image_path, dog.end_image_path, dog.control_path, dog.one_frame) == ("i.png", "e.png", "c.mp4",
                                                                                     "target_index=1")
    assert (cat.index, dog.index) == (0, 1)


def test_toml_without_subsets(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[prompt]\nprompt = "x"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"\[\[prompt.subset\]\]"):
        load_prompt_file(path)


def test_json_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a", "width": 128, "sample_steps": 200.0, "control_image_path": "c.png"},
                                "b --h 96", "# comment"]), encoding="utf-8")
    a, b = load_prompt_file(path, PromptSpec(height=64))
    assert (a.prompt, a.width, a.height, a.steps, a.control_image_paths) == ("a", 128, 64, 200, ["c.png"])
    assert (b.prompt, b.height, b.index) == ("b", 96, 1)


def test_file_errors(tmp_path, caplog):
    with pytest.raises(UserError, match="does not exist"):
        load_prompt_file(tmp_path / "none.txt")
    (tmp_path / "p.yaml").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=".txt, .toml or .json"):
        load_prompt_file(tmp_path / "p.yaml")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        load_prompt_file(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"prompt": "x"}', encoding="utf-8")
    with pytest.raises(UserError, match="list"):
        load_prompt_file(tmp_path / "obj.json")
    (tmp_path / "val.json").write_text('[{"prompt": "x", "width": "wide"}]', encoding="utf-8")
    with pytest.raises(UserError, match="'width'"):
        load_prompt_file(tmp_path / "val.json")
    (tmp_path / "key.json").write_text('[{"prompt": "x", "colour": 1}]', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert load_prompt_file(tmp_path / "key.json")[0].prompt == "x"
    assert "colour" in caplog.text


def test_interactive_reads_until_eof():
    stream = io.StringIO("first --d 3\n\n# skip\nsecond --w 64\n")
    specs = list(interactive_prompts(stream, PromptSpec(seed=9)))
    assert [(s.prompt, s.seed, s.width, s.index) for s in specs] == [("first", 3, None, 0), ("second", 9, 64, 1)]
    assert list(interactive_prompts(io.StringIO(""))) == []


def test_prompt_file_errors_name_the_file_line_and_option(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\na cat --w 64\n\na dog --w 0 --h 64\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts.txt line 4: --w '0': must be >= 1"):
        load_prompt_file(path)


def test_interactive_reports_a_bad_line_and_goes_on(capsys):
    specs = list(interactive_prompts(io.StringIO("first --s 0\nsecond --s 2\n")))
    assert [(s.prompt, s.steps) for s in specs] == [("second", 2)]
    assert "input line 1: --s" in capsys.readouterr().err
