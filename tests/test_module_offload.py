"""--img_in_txt_in_offloading: HunyuanVideo's img_in/txt_in live in CPU memory and get device weights only for their
own forward, through the shared memory layer; the numbers equal the plain model's exactly."""

import logging

import torch

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit
from musubi_tuner.memory.module_offload import offload_input_modules, offload_modules
from test_block_swap import RecordingEngine

HV = get_architecture("hunyuan_video")


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 12, dtype=torch.int64)
    mask[:, :7] = 1
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, 32, generator=g), guidance=torch.tensor([1000.0]),
                return_dict=False)


class FakeDeviceEngine(RecordingEngine):
    """Stands for a GPU: each "device copy" is a fresh clone, so its storage differs from the CPU master's."""

    def start(self, slot):
        super().start(slot)
        self.copies[slot.index] = [m.clone() for m in slot.masters]


def test_hunyuan_video_names_img_in_and_txt_in_and_other_families_none():
    dit = tiny_hv_dit()
    assert HV.offloaded_input_modules(dit) == [dit.x_embedder, dit.context_embedder]
    assert get_architecture("wan").offloaded_input_modules(dit) == []


def test_weights_are_on_the_device_only_during_their_own_forward_and_outputs_are_exact():
    reference, model, engine = tiny_hv_dit(), tiny_hv_dit(), FakeDeviceEngine()
    with torch.no_grad():
        expected = reference(**_inputs())[0]
    offload = offload_modules(HV.offloaded_input_modules(model), torch.device("cpu"), engine=engine)
    masters = {id(m): [p.data_ptr() for p in m.parameters()] for m in (model.x_embedder, model.context_embedder)}
    during = {}
    for name, module in (("img_in", model.x_embedder), ("txt_in", model.context_embedder)):
        def record(m, a, name=name):  # runs after the offload's own pre-hook, i.e. as the forward starts
            engine.log.append(f"run {name}")
            during[name] = [p.data_ptr() for p in m.parameters()]

        module.register_forward_pre_hook(record)
    with torch.no_grad():
        for _ in range(2):  # two denoising steps: each copies again and releases after use
            assert torch.equal(model(**_inputs())[0], expected)
    step = ["start0", "ready0", "run img_in", "finish0", "start1", "ready1", "run txt_in", "finish1"]
    assert engine.log == step + step
    assert not engine.copies  # nothing stays on the "device" between steps
    for module in (model.x_embedder, model.context_embedder):
        assert [p.data_ptr() for p in module.parameters()] == masters[id(module)]  # back on the CPU masters
    assert not set(during["img_in"]) & set(masters[id(model.x_embedder)])  # ran on the device copies
    assert not set(during["txt_in"]) & set(masters[id(model.context_embedder)])
    offload.remove()


def test_training_gradients_through_the_blocks_are_unchanged():
    reference, model = tiny_hv_dit(), tiny_hv_dit()
    offload_modules(HV.offloaded_input_modules(model), torch.device("cpu"), engine=FakeDeviceEngine())
    grads = []
    for dit in (reference, model):
        dit.train()
        weight = dit.transformer_blocks[0].attn.to_q.weight
        weight.requires_grad_(True)
        dit(**_inputs())[0].square().mean().backward()
        grads.append(weight.grad)
    assert torch.equal(grads[0], grads[1])


def test_device_copies_of_placed_modules_are_released_to_cpu_masters():
    model = tiny_hv_dit().to(torch.float64)  # a "placed" model: its tensors are replaced by CPU masters
    before = [p.data_ptr() for p in model.context_embedder.parameters()]
    offload_modules([model.context_embedder], torch.device("cpu"))
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 for p in model.context_embedder.parameters())
    assert [p.data_ptr() for p in model.context_embedder.parameters()] == before  # CPU -> CPU: no copy made


def test_a_family_without_input_modules_warns_that_the_flag_has_no_effect(caplog):
    from musubi_tuner.architectures.wan.tiny import make_tiny_dit

    with caplog.at_level(logging.WARNING, logger="musubi_tuner"):
        assert offload_input_modules(get_architecture("wan"), make_tiny_dit(), torch.device("cpu")) is None
    assert "--img_in_txt_in_offloading has no effect for wan" in caplog.text
