"""FramePack's --custom_system_prompt: the LLM template with its system text replaced, cropped after the new prefix."""

import torch

from musubi_tuner.models.hunyuan_video.prompt_template import VIDEO_TEMPLATE, system_prompt_template, template_crop
from musubi_tuner.models.hunyuan_video.text_encoders import encode_llm, load_llm_tokenizer
from musubi_tuner.models.hunyuan_video.tiny_text import build_tiny_llm_tokenizer, tiny_llm

VIDEO_SYSTEM_TEXT = VIDEO_TEMPLATE.split("<|end_header_id|>\n\n", 1)[1].split("<|eot_id|>", 1)[0]


def test_template_with_the_video_system_text_is_the_video_template():
    assert system_prompt_template(VIDEO_SYSTEM_TEXT) == VIDEO_TEMPLATE


def test_custom_system_prompt_changes_the_crop_not_the_prompt_tokens(tmp_path):
    tok = load_llm_tokenizer(str(build_tiny_llm_tokenizer(tmp_path)))
    template = system_prompt_template("Describe the cat.")
    assert template_crop(tok, template) < template_crop(tok, VIDEO_TEMPLATE)
    llm = tiny_llm()
    custom, mask = encode_llm(llm, tok, ["a red cat"], template=template)
    default, default_mask = encode_llm(llm, tok, ["a red cat"])
    assert torch.equal(mask, default_mask)  # the same prompt tokens are kept after either crop
    assert not torch.allclose(custom, default)  # but they attended to another system text
    assert torch.equal(encode_llm(llm, tok, ["a red cat"], template=VIDEO_TEMPLATE)[0], default)
