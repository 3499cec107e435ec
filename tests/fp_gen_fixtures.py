"""Tiny FramePack DiT and a forward for the generation tests.

`diffusers_forward` maps the packed_forward keywords onto diffusers' own forward; it needs every history input
(diffusers cannot leave 2x/4x out), so tests of no_2x/no_4x wait for fp-model's packed_forward."""

import torch

from musubi_tuner.architectures.hunyuan_video.tiny import TINY_DIT_CONFIG
from musubi_tuner.architectures.framepack.sampling import TextCondition

IMAGE_DIM = 24


def tiny_fp_dit(seed=0):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    config = {**TINY_DIT_CONFIG, "has_image_proj": True, "image_proj_dim": IMAGE_DIM, "has_clean_x_embedder": True}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HunyuanVideoFramepackTransformer3DModel.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def diffusers_forward(dit, *, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                      pooled_projections, image_embeddings, latent_indices, latents_clean=None,
                      clean_latent_indices=None, latents_clean_2x=None, clean_latent_2x_indices=None,
                      latents_clean_4x=None, clean_latent_4x_indices=None, guidance=None, rope_scaling=None):
    assert rope_scaling is None
    return dit(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
               encoder_attention_mask=encoder_attention_mask, pooled_projections=pooled_projections,
               image_embeds=image_embeddings, indices_latents=latent_indices, guidance=guidance,
               latents_clean=latents_clean, indices_latents_clean=clean_latent_indices,
               latents_history_2x=latents_clean_2x, indices_latents_history_2x=clean_latent_2x_indices,
               latents_history_4x=latents_clean_4x, indices_latents_history_4x=clean_latent_4x_indices,
               return_dict=False)[0]


def text_condition(seed, prompt="p", length=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :length] = 1
    return TextCondition(torch.randn(1, 8, TINY_DIT_CONFIG["text_embed_dim"], generator=g), mask,
                         torch.randn(1, TINY_DIT_CONFIG["pooled_projection_dim"], generator=g), prompt)


def section_image(seed, h=4, w=4):
    from musubi_tuner.architectures.framepack.sampling import SectionImage

    g = torch.Generator().manual_seed(seed)
    return SectionImage(torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 5, IMAGE_DIM, generator=g))
