"""`--network_module networks.lora`: LoRA for HunyuanVideo (names as in the official checkpoint).

The reference's `networks.lora` is its generic module, whose target classes (`MMDoubleStreamBlock`,
`MMSingleStreamBlock`) exist only in HunyuanVideo; so the name resolves to this family here.
"""

from musubi_tuner.networks.lora import architecture_entry_points

ARCHITECTURE = "hunyuan_video"

create_network, create_network_from_weights = architecture_entry_points(ARCHITECTURE)
