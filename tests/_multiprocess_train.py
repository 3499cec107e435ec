"""Run by tests/test_multiprocess.py under torchrun: train, then print this rank's LoRA checksum."""

import json
import os
import sys

from musubi_tuner.architectures import get_architecture
from musubi_tuner.cli import setup_logging
from musubi_tuner.training.cli import parse_training_args
from musubi_tuner.training.trainer import NetworkTrainer

setup_logging()
arch = get_architecture("wan")
trainer = NetworkTrainer(arch, parse_training_args(arch, json.loads(sys.argv[1])))
trainer.train()
checksum = sum(float(p.detach().double().sum()) for p in trainer.network.parameters())
print(f"rank {os.environ['RANK']} checksum {checksum!r}", flush=True)
