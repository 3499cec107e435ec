"""Architecture-neutral training pieces: flags and config files, timestep sampling and loss weighting,
optimizers, LR schedulers, checkpoint names and pruning, step logs. The loop itself is `trainer.py`."""
