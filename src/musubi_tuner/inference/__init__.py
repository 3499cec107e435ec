"""Architecture-neutral inference: flow schedulers, the denoising loop with CFG, prompt files, outputs.

Generation scripts and samples during training both call exactly this code; the architecture only
supplies `predict`, the latent shape and the decoder.
"""
