"""HunyuanVideo's LLM prompt templates and how many template tokens are cropped off the embeddings.

The LLM reads the user's prompt wrapped in a chat template; only the hidden states of the prompt itself
(and what follows it) are kept. The reference hard-codes the crop (95 tokens for the video template, 36 for
the image one, BOS included, with the LLaVA-LLaMA-3 tokenizer); we count it with the tokenizer in use, so
the same code serves the tiny test tokenizer and the real one gives those same numbers.
"""

from __future__ import annotations

VIDEO_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
"""What the reference encodes every caption and prompt with (caching, training samples, generation)."""

IMAGE_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
"""HunyuanVideo's image template; the reference defines it but never uses it (its caching is video-only)."""

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
"""LLaMA-3 special tokens a tokenizer needs for these templates (the tiny test tokenizer has them too)."""


def system_prompt_template(system_prompt: str) -> str:
    """The video template with its system text replaced (FramePack's `--custom_system_prompt`); the crop is counted
    from the new prefix as for the built-in templates."""
    return ("<|start_header_id|>system<|end_header_id|>\n\n" + system_prompt.replace("{}", "{ }") +
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")


def apply_template(template: str, prompt: str) -> str:
    return template.replace("{}", prompt, 1)


def template_crop(tokenizer, template: str) -> int:
    """Tokens before the prompt in `template`, counting the special tokens the tokenizer adds in front (BOS).

    The template's text before `{}` is tokenized with and without special tokens; the crop ends where
    the plain tokens end inside the full sequence (so a tokenizer that also appends EOS is handled).
    """
    prefix = template.split("{}", 1)[0]
    plain = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start + len(plain)
    raise ValueError("the tokenizer's special tokens break up the template's prefix; is this a LLaMA tokenizer?")
