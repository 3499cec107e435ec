"""The LoRA training loop, shared by every architecture.

`NetworkTrainer.train()` reads as a list of named steps; the per-step body is `_train_step`. Only the
`Architecture` contract is called for model-specific work, so there are no family branches here.

Exact resume: the data order is a pure function of (seed, epoch) (see dataset.batches), noise and
timesteps come from one dedicated generator, and the state folder stores every RNG, the optimizer,
the scheduler and the counters, so a resumed run continues bit-for-bit where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from musubi_tuner.architectures.base import Architecture
from musubi_tuner.errors import TrainingAborted, UserError
from musubi_tuner.training import checkpoint_files as names
from musubi_tuner.training.optimizers import optimizer_eval_mode, optimizer_train_mode
from musubi_tuner.training.state import LoadedState, StateError, TrainProgress, apply_state, resume_flags, save_state

logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; carries what was reached and saved, and the state folder to resume from."""

    def __init__(self, summary: str, last_state: str | None):
        super().__init__(summary)
        self.summary, self.last_state = summary, last_state


class NetworkTrainer:
    def __init__(self, arch: Architecture, args: argparse.Namespace):
        self.arch = arch
        self.args = args
        self.progress = TrainProgress()
        self.samples = None
        self.validation = None
        self.validation_history: list[tuple[int, dict[str, float]]] = []
        """(step, logs) of each validation this run (for tests and the demo's summary)."""
        self.max_norm_stats: tuple[int, float, float] | None = None
        self.log_with: list[str] | None = None
        self.session_id = random.SystemRandom().randint(0, 2**32 - 1)  # ss_session_id, as the reference
        self.started_at = time.time()
        self.resume_state: LoadedState | None = None
        self._last_saved: str | None = None
        self._last_state: str | None = None

    # ---- the run, as named steps -------------------------------------------------------------
    def train(self) -> Path:
        self._setup_accelerator()
        self._clean_interrupted_saves()
        self._build_data()
        self._read_resume_state()  # a damaged or mismatching state fails here, before any model loads
        self._prepare_sampling()  # encodes the sample prompts and frees the text encoders before the DiT loads
        self._load_dit()
        self._build_network()
        self._build_optimizer()
        self._resume_if_asked()
        self._start_logging()
        try:
            if self.args.sample_at_first and self.progress.global_step == 0:
                self._sample(epoch=0)
            self._run_epochs()
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._interrupt_summary(), self._last_state) from None
        return self._finish()

    # ---- set-up --------------------------------------------------------------------------------
    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        args = self.args
        if args.seed is None:
            args.seed = random.randint(0, 2**31 - 1)
        from musubi_tuner.training.logging_utils import tracker_plan

        log_with, run_dir = tracker_plan(args.logging_dir, args.log_with, args.log_prefix)
        self.log_with = log_with
        if log_with and not args.logging_dir:
            raise UserError("--log_with needs --logging_dir (the folder for TensorBoard/W&B logs)")
        if log_with and "wandb" in log_with:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("--log_with wandb needs the wandb package: pip install wandb (or pip install musubi-tuner[wandb])") from None
        project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=run_dir)
        handlers = []
        if args.ddp_timeout:
            from datetime import timedelta

            from accelerate.utils import InitProcessGroupKwargs

            handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
        # no --mixed_precision: accelerate's own launch flag / config decides (as in the reference)
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=log_with, project_config=project,
                                       kwargs_handlers=handlers)
        args.mixed_precision = self.accelerator.mixed_precision
        self.device = self.accelerator.device
        if args.cuda_allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if args.cuda_cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed % 2**32)
        # noise and timesteps: one generator per process, saved in the state for exact resume
        self.noise_generator = torch.Generator("cpu").manual_seed(args.seed + self.accelerator.process_index)

    def _clean_interrupted_saves(self) -> None:
        if self.accelerator.is_main_process:
            names.clean_interrupted_saves(self.args.output_dir, self.args.output_name)

    def _build_data(self) -> None:
        from musubi_tuner.dataset.batches import CachedBatches
        from musubi_tuner.dataset.config import load_dataset_config

        if not self.args.dataset_config:
            raise UserError("--dataset_config is required (the dataset TOML used for caching)")
        all_specs = load_dataset_config(self.args.dataset_config, self.arch.traits, with_validation=True)
        specs = self.dataset_specs = [s for s in all_specs if not s.is_validation]
        self.batches = CachedBatches(specs, self.arch.traits, seed=self.args.seed,
                                     text_cache_command=self.arch.script_name("cache_text_encoder_outputs"))
        self._build_validation([s for s in all_specs if s.is_validation])
        if len(self.batches) == 0:
            raise UserError(f"{self.args.dataset_config}: no cached items found; run the caching scripts first")
        accum = self.args.gradient_accumulation_steps
        shards = self.accelerator.num_processes
        self.steps_per_epoch = math.ceil(math.ceil(len(self.batches) / shards) / accum)
        if self.args.max_train_epochs:
            self.total_steps = self.args.max_train_epochs * self.steps_per_epoch
        else:
            self.total_steps = self.args.max_train_steps
        logger.info("%d batches per epoch, %d steps per epoch, %d steps in total",
                    len(self.batches), self.steps_per_epoch, self.total_steps)
        from musubi_tuner.dataset.cache_files import read_cache_shapes

        samples = {str(b.entries[0].latent_path): set(read_cache_shapes(b.entries[0].latent_path))
                   for b in self.batches.buckets}
        self.arch.check_training_caches(samples, self.args)

    def _build_validation(self, specs: list) -> None:
        args = self.args
        if not (args.validate_every_n_steps or args.validate_every_n_epochs):
            if specs:
                logger.info("%s has [[validation_datasets]]; add --validate_every_n_steps or --validate_every_n_epochs "
                            "to compute the validation loss", args.dataset_config)
            return
        if not specs:
            flag = "--validate_every_n_steps" if args.validate_every_n_steps else "--validate_every_n_epochs"
            raise UserError(f"{flag}: {args.dataset_config} has no [[validation_datasets]]; add one (same keys as "
                            "[[datasets]]) and run the caching scripts, or drop the flag")
        from musubi_tuner.dataset.batches import CachedBatches
        from musubi_tuner.training.validation import ValidationLoss

        seed = args.validation_seed if args.validation_seed is not None else args.seed
        batches = CachedBatches(specs, self.arch.traits, seed=seed,
                                text_cache_command=self.arch.script_name("cache_text_encoder_outputs"))
        self.validation = ValidationLoss(batches, seed)

    def _load_dit_weights(self, args: argparse.Namespace) -> torch.nn.Module:
        """The DiT named by these flags with --base_weights merged and fp8 storage applied (also each extra expert)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision or "no", torch.float32)
        # with fp8 or block swap the full model never has to fit on the GPU: load (and convert) on the CPU, then move
        load_device = torch.device("cpu") if args.fp8_base or args.blocks_to_swap else self.device
        dit = self.arch.load_dit(args, load_device, dtype)
        if args.base_weights:
            from musubi_tuner.inference.lora_merge import merge_loras_into_dit

            merge_loras_into_dit(self.arch, dit, args.base_weights, args.base_weights_multiplier or [],
                                 flag="--base_weights")
        if args.fp8_base:
            from musubi_tuner.memory.fp8 import store_dit_in_fp8

            store_dit_in_fp8(dit, self.arch, scaled=args.fp8_scaled)
        return dit

    def _load_dit(self) -> None:
        args = self.args
        load_device = torch.device("cpu") if args.fp8_base or args.blocks_to_swap else self.device
        self.dit = self._load_dit_weights(args)
        if args.blocks_to_swap:
            from musubi_tuner.memory.block_swap import BlockSwapOptions, enable_block_swap

            enable_block_swap(self.dit, args.blocks_to_swap, self.device, BlockSwapOptions.from_args(args),
                              blocks=self.arch.swapped_blocks(self.dit, args.blocks_to_swap))
        elif load_device != self.device:
            self.dit.to(self.device)
        self.arch.attach_expert_dits(self.dit, self._load_dit_weights, args, self.device)
        if args.img_in_txt_in_offloading:  # after placement: these modules go back to CPU memory
            from musubi_tuner.memory.module_offload import offload_input_modules

            offload_input_modules(self.arch, self.dit, self.device)
        if args.gradient_checkpointing:
            from musubi_tuner.memory.activation_offload import checkpoint_with_cpu_offload

            offload = checkpoint_with_cpu_offload if args.gradient_checkpointing_cpu_offload else None
            self.dit.enable_gradient_checkpointing(offload)
        self.dit.requires_grad_(False)
        from musubi_tuner.memory.attention import apply_attention_backend
        from musubi_tuner.training.args import attention_mode

        apply_attention_backend(self.dit, attention_mode(args), "attention flag")
        if args.split_attn:  # after the backend, so the split processors keep it
            from musubi_tuner.memory.attention import apply_split_attention

            apply_split_attention(self.dit)

    def _build_network(self) -> None:
        from musubi_tuner.training.network_setup import build_network

        self.network = build_network(self.arch, self.dit, self.args)
        self.network.to(self.device)
        self.network.train()
        if self.args.compile:  # after the LoRA wrappers are in place, so they are compiled with the blocks
            from musubi_tuner.memory.attention import compile_dit_from_flags

            compile_dit_from_flags(self.dit, self.args)

    def _build_optimizer(self) -> None:
        from musubi_tuner.training.lr_schedulers import build_lr_scheduler
        from musubi_tuner.training.optimizers import build_optimizer

        ratio = getattr(self.network, "loraplus_lr_ratio", None)
        groups = self.network.prepare_optimizer_params(self.args.learning_rate, ratio)
        self.optimizer, self.optimizer_info = build_optimizer(self.args, groups)
        # accelerate steps a prepared scheduler once per process, so it is sized for all of them
        self.lr_scheduler = build_lr_scheduler(self.args, self.optimizer, self.total_steps * self.accelerator.num_processes,
                                               self.optimizer_info)
        # the network is not wrapped in DDP (its forward is never called); gradients are averaged by hand
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.optimizer, self.lr_scheduler)

    def _read_resume_state(self) -> None:
        """--resume: read and check the state (ours or the reference's) now; it is applied once the network exists."""
        from musubi_tuner.training.reference_state import read_reference_state
        from musubi_tuner.training.state import read_state

        if self.args.resume == "auto":
            latest = names.find_latest_complete_state(self.args.output_dir, self.args.output_name)
            if latest is None:
                logger.info("--resume auto: no complete state of %s in %s; starting at step 0",
                            self.args.output_name, self.args.output_dir)
                return
            self.args.resume = str(latest)
        if not self.args.resume:
            return
        folder = Path(self.args.resume)
        if names.is_reference_state(folder):
            state = read_reference_state(folder, self.steps_per_epoch, self.args.gradient_accumulation_steps,
                                         self.args)
        else:
            state = read_state(folder, self.args, self.accelerator.process_index)
        if state.progress.global_step >= self.total_steps:
            flag = "--max_train_epochs" if self.args.max_train_epochs else "--max_train_steps"
            raise StateError(f"--resume {folder}: the state is at step {state.progress.global_step}, which already "
                             f"reaches the {self.total_steps} steps of {flag}; nothing is left to train. Raise {flag} "
                             "to train further")
        self.resume_state = state

    def _resume_if_asked(self) -> None:
        if self.resume_state is None:
            return
        saved = self.resume_state.progress
        self.progress = apply_state(self.resume_state, network=self.network, optimizer=self.optimizer,
                                    lr_scheduler=self.lr_scheduler, noise_generator=self.noise_generator)
        self.resume_state = None  # the tensors now live in the network and optimizer
        if saved.batches_per_epoch and saved.batches_per_epoch != len(self.batches):
            logger.warning("the dataset changed since %s was saved (%d batches per epoch then, %d now): "
                           "the data order will differ from the interrupted run", self.args.resume,
                           saved.batches_per_epoch, len(self.batches))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", self.args.resume, self.progress.global_step,
                    self.progress.epoch + 1, self.progress.batch_in_epoch)

    def _prepare_sampling(self) -> None:
        if not self.args.sample_prompts:
            return
        self.samples = self.arch.training_sampler(self.args, self.device)

    def _start_logging(self) -> None:
        args = self.args
        if not self.log_with:
            return
        config = {k: v for k, v in vars(args).items()
                  if isinstance(v, (int, float, str, bool)) and "key" not in k and "token" not in k} if args.log_config else {}
        init_kwargs = {}
        if args.log_tracker_config:
            import toml

            init_kwargs = toml.load(args.log_tracker_config)
        if args.log_with in ("wandb", "all"):
            if args.wandb_api_key:
                import wandb

                wandb.login(key=args.wandb_api_key)
            if args.wandb_run_name:
                init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
        from musubi_tuner.training.logging_utils import TRACKER_NAME

        # --log_prefix names the run folder (see tracker_plan), not the tracker, as in the reference
        self.accelerator.init_trackers(args.log_tracker_name or TRACKER_NAME, config=config, init_kwargs=init_kwargs)

    # ---- the loop ------------------------------------------------------------------------------
    def _run_epochs(self) -> None:
        from musubi_tuner.training.logging_utils import MovingAverage

        self.loss_average = MovingAverage()
        if self.progress.loss_window:
            self.loss_average.load_state_dict(self.progress.loss_window)
        self.bar = tqdm(total=self.total_steps, initial=self.progress.global_step, desc="steps",
                        disable=not self.accelerator.is_local_main_process)
        optimizer_train_mode(self.optimizer)
        while self.progress.global_step < self.total_steps:
            if self._run_epoch(self.progress.epoch):
                self._end_epoch()
        self.bar.close()

    def _run_epoch(self, epoch: int) -> bool:
        """Run the rest of `epoch`; True when all its batches were used (False: the step budget ran out)."""
        accum = self.args.gradient_accumulation_steps
        batches = self._my_batches(epoch)
        pool = self._timestep_pool(epoch, batches)
        start = self.progress.batch_in_epoch
        for group_start in range(start, len(batches), accum):
            if self.progress.global_step >= self.total_steps:
                return False
            group = batches[group_start:group_start + accum]
            uniforms = None if pool is None else [pool[i, :len(b)] for i, b in enumerate(group, start=group_start)]
            loss = self._train_step(group, uniforms)
            self.progress.batch_in_epoch = group_start + len(group)
            self._after_step(loss)
        return True

    def _my_batches(self, epoch: int) -> list[Any]:
        """This process's share of the epoch's batches (round-robin over processes). The list is first padded
        with its own head to a multiple of the process count, so every process runs the same number of steps
        (the gradient all-reduce pairs them up)."""
        batches = self.batches.batches_for_epoch(epoch)
        processes = self.accelerator.num_processes
        if processes == 1:
            return batches
        padded = batches + batches[: (-len(batches)) % processes]
        return padded[self.accelerator.process_index::processes]

    def _timestep_pool(self, epoch: int, batches: list[Any]) -> torch.Tensor | None:
        """--num_timestep_buckets: stratified uniforms for the epoch, from (seed, epoch) so resume sees the same."""
        if not self.args.num_timestep_buckets:
            return None
        from musubi_tuner.training.timesteps import stratified_timestep_pool

        gen = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        width = max(len(b) for b in batches)
        return stratified_timestep_pool(self.args.num_timestep_buckets, len(batches), width, gen)

    def _train_step(self, group: list[Any], uniforms: list[torch.Tensor] | None = None) -> float:
        total, bad_caches = 0.0, []
        for index, entries in enumerate(group):
            batch = self.batches.load_batch(entries)
            if not self.batches.inputs_are_finite(batch):  # a broken cache, not a divergence: name it
                bad_caches += self.batches.non_finite_caches(entries)
                total = math.nan
                continue
            loss = self._loss(batch, None if uniforms is None else uniforms[index]) / len(group)
            self.accelerator.backward(loss)  # scales the loss when fp16 uses a gradient scaler
            total += loss.item()
        if not self._all_finite(total):  # every process gets here, so all stop together
            raise TrainingAborted(self._non_finite_message(total, bad_caches))
        self._average_gradients()
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.args.max_grad_norm:
            self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)  # unscales first under fp16
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.args.scale_weight_norms:
            self.max_norm_stats = self.network.apply_max_norm_regularization(self.args.scale_weight_norms, self.device)
        return total

    def _loss(self, batch: dict[str, Any], uniform: torch.Tensor | None = None) -> torch.Tensor:
        from musubi_tuner.dataset.masks import MASK_CONTENT
        from musubi_tuner.training.loss import per_sample_loss
        from musubi_tuner.training.timesteps import compute_loss_weighting

        latents = self.arch.latents_from_cache(batch["latents"].to(self.device, torch.float32))
        noise = torch.randn(latents.shape, generator=self.noise_generator).to(self.device)
        seq_len = self.arch.timestep_shift_sequence_length(tuple(latents.shape[1:]))
        noisy, timesteps, _ = self.arch.sample_noisy_input(self.args, latents, noise, self.noise_generator, seq_len,
                                                           uniform)
        batch = {**batch, **self.arch.training_conditioning(self.args)}
        with self._predict_context():
            pred = self.arch.predict(self.dit, batch, noisy, timesteps)
        loss = per_sample_loss(pred, noise - latents, batch.get(MASK_CONTENT))
        loss = loss * compute_loss_weighting(self.args.weighting_scheme, timesteps).to(loss.device)
        return loss.mean()

    def _non_finite_message(self, total: float, bad_caches: list[str]) -> str:
        where = (f"at step {self.progress.global_step + 1} (epoch {self.progress.epoch + 1}); nothing was saved after "
                 f"it, last saved LoRA: {self._last_saved or 'none yet'}.")
        if bad_caches:
            return (f"NaN/Inf in the training input {where} Cache file(s): {', '.join(bad_caches)}; delete them and "
                    "run the caching scripts again with --skip_existing to re-cache those items.")
        what = f"loss is {total}" if not math.isfinite(total) else "loss is not finite on another process"
        return f"{what} {where} Lower --learning_rate or use --mixed_precision bf16 instead of fp16."

    def _all_finite(self, loss: float) -> bool:
        """Whether the step's loss is finite on every process (they must stop together, or the rest would hang)."""
        bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=self.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bad.item() == 0

    def _predict_context(self) -> contextlib.ExitStack:
        """Autocast plus the block-swap recompute context, around every DiT forward."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.autocast())
        stack.enter_context(self._forward_context())
        return stack

    def _forward_context(self):
        if self.args.blocks_to_swap:
            from musubi_tuner.memory.block_swap import full_recompute

            return full_recompute()
        return contextlib.nullcontext()

    def _average_gradients(self) -> None:
        """Mean of the LoRA gradients over processes, in one all-reduce (a missing grad, e.g. after module
        dropout, counts as zero so every process sends the same layout)."""
        if self.accelerator.num_processes == 1:
            return
        params = [p for p in self.network.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def _after_step(self, loss: float) -> None:
        self.progress.global_step += 1
        step = self.progress.global_step
        self.loss_average.add(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{self.loss_average.value:.4f}")
        if self.log_with:
            from musubi_tuner.training.logging_utils import step_logs

            scaled, mean_norm, max_norm = self.max_norm_stats or (None, None, None)
            logs = step_logs(loss, self.loss_average.value, self.lr_scheduler.get_last_lr(),
                             optimizer_type=self.args.optimizer_type, param_groups=self.optimizer.param_groups,
                             keys_scaled=scaled, mean_norm=mean_norm, max_norm=max_norm)
            self.accelerator.log(logs, step=step)
        if self.args.save_every_n_steps and step % self.args.save_every_n_steps == 0 and step < self.total_steps:
            self._save(names.step_ckpt_name(self.args.output_name, step), kind="step", number=step)
        if self.args.sample_every_n_steps and step % self.args.sample_every_n_steps == 0:
            self._sample(step=step)
        if self.args.validate_every_n_steps and step % self.args.validate_every_n_steps == 0:
            self._validate(step)

    def _end_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0
        epoch = self.progress.epoch
        self.loss_average.new_epoch()
        last_epoch = self.args.max_train_epochs and epoch >= self.args.max_train_epochs
        if self.args.save_every_n_epochs and epoch % self.args.save_every_n_epochs == 0 and not last_epoch:
            self._save(names.epoch_ckpt_name(self.args.output_name, epoch), kind="epoch", number=epoch)
        if self.args.sample_every_n_epochs and epoch % self.args.sample_every_n_epochs == 0:
            self._sample(epoch=epoch)
        if self.args.validate_every_n_epochs and epoch % self.args.validate_every_n_epochs == 0:
            self._validate(self.progress.global_step)

    # ---- saving --------------------------------------------------------------------------------
    def _run_metadata(self) -> dict[str, str]:
        from musubi_tuner.networks.lora_metadata import run_metadata

        items = sum(len(b.entries) * b.num_repeats for b in self.batches.buckets)
        batches = math.ceil(len(self.batches) / self.accelerator.num_processes)  # one process's share, as the loader's
        return run_metadata(self.dataset_specs, num_train_items=items, batches_per_epoch=batches,
                            num_epochs=math.ceil(self.total_steps / self.steps_per_epoch),
                            optimizer=self.optimizer_info.metadata_value)

    def _save(self, lora_file: str, *, kind: str, number: int | None) -> bool:
        """Write the LoRA (and the state when asked) into --output_dir. False when a write failed (disk full,
        permissions): that is logged and training goes on, the next save point tries again."""
        with_state = self.args.save_state or (kind == "final" and self.args.save_state_on_train_end)
        rng_states = self._gather_rng_states() if with_state else None  # collective: every process, once
        if not self.accelerator.is_main_process:
            return True
        self._save_rng_states = rng_states
        out = Path(self.args.output_dir)
        saved = self._write_save(out, lora_file, kind, number, rng_states)
        if saved and kind in ("epoch", "step"):  # never prune older saves after a failed one
            for stale in names.stale_saves(out, self.args, kind, number):
                names.remove_path(stale)
        return saved

    def _write_save(self, out: Path, lora_file: str, kind: str, number: int | None,
                    rng_states: list[dict[str, Any]] | None) -> bool:
        from musubi_tuner.training.network_setup import save_network
        from musubi_tuner.utils.output_location import describe_os_error

        target = out / lora_file
        optimizer_eval_mode(self.optimizer)  # schedule-free optimizers: save the averaged weights
        try:
            save_network(self.network, self.arch, self.args, target, self.progress, self.session_id, self.started_at,
                         extra=self._run_metadata())
            self._last_saved = str(target)
            logger.info("saved %s", target)
            if rng_states is not None:
                target = out / names.state_dir_name(self.args.output_name, kind, number)
                self.progress.batches_per_epoch = len(self.batches)
                self.progress.loss_window = self.loss_average.state_dict()
                save_state(target, network_sd=self.network.state_dict(), optimizer=self.optimizer,
                           lr_scheduler=self.lr_scheduler, rng_states=rng_states, progress=self.progress,
                           flags=resume_flags(self.args))
                self._last_state = str(target)
                logger.info("saved state %s", target)
        except OSError as exc:
            logger.error("could not save %s at step %d: %s. Training goes on with its state in memory; the next save "
                         "point tries again", target, self.progress.global_step, describe_os_error(exc))
            return False
        finally:
            optimizer_train_mode(self.optimizer)
        return True

    def _save_to_fallback(self, wanted: Path) -> Path:
        """The final save failed: rather than lose the run, write it to the temp dir or the current folder."""
        import tempfile

        for base in (Path(tempfile.gettempdir()), Path.cwd()):
            folder = base / f"musubi_tuner_rescued_{self.args.output_name}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if self._write_save(folder, wanted.name, "final", None, self._save_rng_states):
                logger.error("the final LoRA could not be written to %s; it was saved to %s instead. Move it (and "
                             "its state, if any) somewhere safe", wanted, folder / wanted.name)
                return folder / wanted.name
        raise TrainingAborted(f"the final LoRA could not be written to {wanted}, nor to the temp folder or the current "
                              f"folder (see the errors above); last LoRA saved during training: "
                              f"{self._last_saved or 'none'}")

    def _interrupt_summary(self) -> str:
        lines = [f"training interrupted at step {self.progress.global_step} of {self.total_steps} "
                 f"(epoch {self.progress.epoch + 1})",
                 f"last saved LoRA: {self._last_saved or 'none'}",
                 f"last saved state: {self._last_state or 'none'}"]
        if self._last_state is None:
            lines.append("no state to resume from: add --save_state (with --save_every_n_steps/epochs) to be able to "
                         "resume; a saved LoRA can seed a new run with --network_weights")
        return "\n".join(lines)

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        """Every process's RNG state (a collective call: all processes must reach it)."""
        from accelerate.utils import gather_object

        from musubi_tuner.training.state import capture_rng

        state = capture_rng(self.noise_generator)
        return [state] if self.accelerator.num_processes == 1 else gather_object([state])

    def _sample(self, *, epoch: int | None = None, step: int | None = None) -> None:
        if self.samples is not None and self.accelerator.is_main_process:
            self.network.eval()  # no LoRA dropout while sampling
            try:  # the DiT under the training step's autocast: the LoRA stays fp32 beside a bf16/fp16 DiT
                self.samples.run(self.dit, epoch=epoch, step=step, autocast=self.accelerator.autocast)
            finally:
                self.network.train()

    def _validate(self, step: int) -> None:
        """The validation loss (main process only; it draws nothing from the training RNG streams)."""
        if self.validation is None or not self.accelerator.is_main_process:
            return
        from musubi_tuner.training.validation import describe

        self.network.eval()  # no LoRA dropout
        try:
            logs = self.validation.evaluate(self.arch, self.dit, self.device, self._predict_context,
                                           self.arch.training_conditioning(self.args))
        finally:
            self.network.train()
        self.validation_history.append((step, logs))
        self.bar.write(f"validation loss at step {step}: {describe(logs)}")
        if self.log_with:
            self.accelerator.log(logs, step=step)

    def _finish(self) -> Path:
        self.accelerator.wait_for_everyone()
        path = Path(self.args.output_dir) / names.last_ckpt_name(self.args.output_name)
        if not self._save(path.name, kind="final", number=None):
            path = self._save_to_fallback(path)
        self.accelerator.end_training()
        # accelerate keeps mixed precision in a process-wide singleton; forget it so a later run in the same
        # process (tests, notebooks) may choose another (the distributed set-up itself is kept)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        return path
