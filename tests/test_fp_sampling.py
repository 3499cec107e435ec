"""FramePack section loops on a tiny packed DiT: the reference's order of sections, history bookkeeping, which
prompt/image each section sees, and one-frame layouts."""

import pytest
import torch
from fp_gen_fixtures import section_image, text_condition

from musubi_tuner.architectures.framepack import sampling
from musubi_tuner.architectures.framepack.generation_sections import plan_sections
from musubi_tuner.architectures.framepack.packed_forward import packed_forward
from musubi_tuner.architectures.framepack.sampling import SamplerSettings, VideoRequest
from musubi_tuner.architectures.framepack.tiny import tiny_framepack_dit

WINDOW = 3
SETTINGS = {"steps": 3, "dtype": torch.float32, "progress": False}


class Recorder:
    """Wraps a forward and records the inputs of every call."""

    def __init__(self, forward):
        self.forward, self.calls = forward, []

    def __call__(self, dit, **kwargs):
        self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        return self.forward(dit, **kwargs)


def _request(sections, f1, prompts=None, images=None, end_latent=None):
    return VideoRequest(height=32, width=32, latent_window_size=WINDOW, plan=plan_sections(sections, f1),
                        prompts=prompts or {0: text_condition(1)}, negative=text_condition(9),
                        images=images or {0: section_image(2)}, end_latent=end_latent)


@pytest.fixture(scope="module")
def dit():
    return tiny_framepack_dit()


def test_section_sigmas_follow_the_shift():
    sig = sampling.section_sigmas(4, 9, 80, 80, flow_shift=None)  # 14400 tokens: mu capped at log 7
    expected = [7 * t / (1 + 6 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert sig.tolist() == pytest.approx(expected, abs=1e-6)
    sig = sampling.section_sigmas(2, 1, 16, 16, flow_shift=3.0)
    assert sig.tolist() == pytest.approx([1.0, 0.75, 0.0], abs=1e-6)


def test_vanilla_order_history_and_reproducibility(dit):
    rec = Recorder(packed_forward)
    end = torch.full((1, 16, 1, 4, 4), 0.5)
    req = _request(3, f1=False, end_latent=end)
    out = sampling.sample_vanilla(dit, req, SamplerSettings(**SETTINGS), torch.Generator().manual_seed(7), rec)
    assert out.shape == (1, 16, 3 * WINDOW + 1, 4, 4)
    assert torch.equal(out[:, :, :1], req.images[0].latent)  # the start image's latent leads the video
    assert len(rec.calls) == 3 * SETTINGS["steps"]
    first, second = rec.calls[0], rec.calls[SETTINGS["steps"]]
    # paddings 2, 1, 0 for 3 sections: the first section sampled sits 2 windows after the start image
    assert first["latent_indices"].tolist() == [1 + 2 * WINDOW + i for i in range(WINDOW)]
    assert torch.equal(first["latents_clean"][:, :, 1:2], end)  # it sees the end image as the 1x post latent
    assert first["guidance"].tolist() == [10000.0]
    # the second section sees the first one's first latent as its post latent
    assert torch.allclose(second["latents_clean"][:, :, 1:2], out[:, :, 1 + 2 * WINDOW:2 + 2 * WINDOW])
    again = sampling.sample_vanilla(dit, req, SamplerSettings(**SETTINGS), torch.Generator().manual_seed(7),
                                    packed_forward)
    assert torch.equal(out, again)


def test_f1_runs_forward_from_the_start_image(dit):
    rec = Recorder(packed_forward)
    req = _request(2, f1=True)
    out = sampling.sample_f1(dit, req, SamplerSettings(**SETTINGS), torch.Generator().manual_seed(3), rec)
    assert out.shape == (1, 16, 1 + 2 * WINDOW, 4, 4)
    assert torch.equal(out[:, :, :1], req.images[0].latent)
    second = rec.calls[SETTINGS["steps"]]
    # the second section's 1x history is the last latent of the first section
    assert torch.allclose(second["latents_clean"][:, :, 1:2], out[:, :, WINDOW:WINDOW + 1])
    assert second["latent_indices"].tolist() == [20, 21, 22]


def test_section_prompts_and_images_reach_their_sections(dit):
    prompts = {0: text_condition(1, "zero"), 1: text_condition(2, "one"), -1: text_condition(3, "last")}
    images = {0: section_image(4), 1: section_image(5)}
    seen = []
    req = _request(3, f1=False, prompts=prompts, images=images)
    req.on_section = lambda step, prompt: seen.append((step.section_index, prompt))
    rec = Recorder(packed_forward)
    sampling.sample_vanilla(dit, req, SamplerSettings(**SETTINGS), torch.Generator().manual_seed(0), rec)
    assert seen == [(2, "last"), (1, "one"), (0, "zero")]
    middle = rec.calls[SETTINGS["steps"]]
    assert torch.equal(middle["image_embeddings"], images[1].image_embeddings)
    assert torch.equal(middle["encoder_hidden_states"], prompts[1].llama_vec)


def test_cfg_runs_a_negative_pass_and_rescale_matches_std(dit):
    rec = Recorder(packed_forward)
    settings = SamplerSettings(**{**SETTINGS, "guidance_scale": 3.0, "guidance_rescale": 0.7})
    sampling.sample_f1(dit, _request(1, f1=True), settings, torch.Generator().manual_seed(0), rec)
    assert len(rec.calls) == 2 * SETTINGS["steps"]
    pos = torch.randn(2, 3, 4)
    guided = 2 * pos + 1
    full = sampling.rescale_guidance(guided, pos, 1.0)
    assert torch.allclose(full.std(dim=(1, 2)), pos.std(dim=(1, 2)), atol=1e-6)
    assert torch.equal(sampling.rescale_guidance(guided, pos, 0.0), guided)
