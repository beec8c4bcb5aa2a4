"""The ViToS dual-stream GRPO trainer: SFT warm-up, then cross-feedback sequential optimization of one policy.

    trainer = DualStreamGRPOTrainer(model, processor, train_data, config, eval_data=held_out)
    results = trainer.train()                 # or trainer.train(resume=True) after an interruption

One GRPO step (see :meth:`DualStreamGRPOTrainer.grpo_step`) is four separable stages, each a method that a
distributed trainer can wrap (shard rows, all-gather rewards and group ids before the advantages):
    1. rollouts   :meth:`rollout_grounding`, :meth:`rollout_sparse`        (no grad, patched generate())
    2. rewards    :meth:`score`                                             (format / IoU / accuracy / cross)
    3. advantages :func:`vitos_ext.trainer.grpo.group_advantages`           (per group id)
    4. update     :meth:`update_branch`                                     (clipped surrogate, optimizer steps)
With ``dynamic_sampling`` (DAPO), stages 1-2 repeat over rounds of new prompts until the batch holds prompts whose
rewards differ within their group (:meth:`DualStreamGRPOTrainer.collect_rollouts`).
Gradient isolation: an update runs the training forward of its own branch's rollouts only; the other branch's
rollouts enter as detached rewards (cross-feedback) or, for the sparse branch, as the boxes that select tokens.

The training forward (:class:`~vitos_ext.trainer.logprobs.TrainingForward`) runs the packed layout -- all rows' kept
tokens in one sequence through varlen attention, LM head at completion rows only -- where a fast varlen kernel exists
(CUDA), else the padded one (``forward_layout``: "auto", "packed", "padded"). Under torchrun the trainer runs data-parallel (DDP or FSDP2, see
vitos_ext/trainer/distributed.py): prompts are sharded by whole groups, rewards and group ids are all-gathered for
the advantages, the loss is normalized by global counts, and rank 0 alone writes checkpoints, metrics and reports.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..patching import inner_model, is_patched, patch_model
from ..profiling import nvtx_range
from .batching import PromptBatch, build_sequences
from .checkpoint import (
    capture_rng_state,
    check_lora_exportable,
    load_checkpoint_weights,
    read_tracker,
    save_checkpoint,
    save_model_folder,
    write_tracker,
)
from .config import TrainerConfig
from .data import DataOrder, TrainingData, gold_completion, jitter_boxes
from .distributed import DataParallel, DistributedConfig, setup_distributed
from .evaluate import EvalResult, evaluate_policy, format_eval_table
from .grpo import clipped_surrogate_loss, group_advantages, informative_groups
from .logprobs import (
    FORWARD_LAYOUTS,
    SparseSelection,
    TrainingForward,
    autocast_context,
    completion_logprobs,
    mixed_precision_dtype,
    resolve_forward_layout,
)
from .metrics import MetricsLogger, make_sinks, plot_curves
from .rollout import (
    Rollouts,
    SamplingSettings,
    concat_rollouts,
    generate_completions,
    make_rollouts,
    rollout_row_seeds,
    sparse_selection,
    special_token_ids,
    vision_geometry,
)
from .scoring import NonFiniteError, RewardTerms, basic_terms, grounding_rewards, precision_terms, sparse_rewards

__all__ = ["DualStreamGRPOTrainer", "PHASE_LABELS"]

logger = logging.getLogger("vitos_ext.trainer")

# evaluation label written after each phase
PHASE_LABELS = {"sft": "after SFT", "grounding": "after stage 1", "sparse": "after stage 2",
                "alternate": "after alternate"}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _NoMetrics:
    """The metrics sink of ranks other than 0 (rank 0 alone writes metrics.jsonl)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, global_step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class DualStreamGRPOTrainer:
    """Trains one policy on the ViToS grounding and token-sparse branches.

    Args:
        model: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL *ForConditionalGeneration (patched in place with patch_model if it
            is not already), or a PEFT model wrapping one: only its trainable parameters (e.g. LoRA) are optimized.
        processor: its processor (tokenizer with a pad token, chat template, image processor).
        train_data: :class:`~vitos_ext.trainer.data.TrainingData` (bad rows already reported and skipped).
        config: :class:`TrainerConfig`.
        eval_data: optional held-out data, evaluated at the end of every phase (and every ``eval_every`` steps).
        sft_data: optional examples of the SFT warm-up (default: ``train_data``). GRPO then samples prompts the
            warm-up never saw, as when cold-start SFT data and RL prompts are separate sets.
        system_prompt: optional system message for every prompt.
        forward_layout: the training forward's layout, "auto" (packed on CUDA or when the language model already
            runs varlen attention, else padded), "packed" or "padded" (vitos_ext/trainer/logprobs.py). None: ``config.forward_layout``.
        distributed: a :class:`~vitos_ext.trainer.distributed.DistributedConfig` (strategy "ddp" or "fsdp2") or a
            ready :class:`~vitos_ext.trainer.distributed.DataParallel`. None: DDP when launched by torchrun with
            more than one process (or inside an initialized process group), a single process otherwise.
        row_seeded_sampling: sample every rollout row from its own random stream keyed by (seed, step, global row)
            (:class:`~vitos_ext.trainer.rollout.RowSeededSampler`), so rollouts do not depend on batching or on the
            number of processes. None: on in data-parallel runs, off otherwise (the global torch generator).
    """

    def __init__(self, model, processor, train_data: TrainingData, config: TrainerConfig,
                 eval_data: TrainingData | None = None, system_prompt: str | None = None, *,
                 sft_data: TrainingData | None = None,
                 forward_layout: str | None = None, distributed: DistributedConfig | DataParallel | None = None,
                 row_seeded_sampling: bool | None = None):
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        if not isinstance(train_data, TrainingData) or len(train_data) == 0:
            raise ValueError("train_data must be a non-empty TrainingData (every row was skipped? see its report)")
        if eval_data is not None and len(eval_data) == 0:
            raise ValueError("eval_data is empty (every row was skipped? see its report)")
        if sft_data is not None and (not isinstance(sft_data, TrainingData) or len(sft_data) == 0):
            raise ValueError("sft_data must be None or a non-empty TrainingData (every row was skipped? see its "
                             "report)")
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        _seed_everything(config.seed)
        self.model = model if is_patched(model) else patch_model(model)
        self.processor = processor
        self.train_data, self.eval_data = train_data, eval_data
        self.sft_data = sft_data if sft_data is not None else train_data
        self._separate_sft_data = sft_data is not None
        from .batching import PromptEncoder  # local import keeps the module graph flat

        self.encoder = PromptEncoder(processor, system_prompt, cache_bytes=config.prompt_cache_mb * 2**20)
        self.tokenizer = processor.tokenizer
        self.device = next(model.parameters()).device
        self.patch_size, self.merge_size = vision_geometry(model)
        self.eos_ids, _ = special_token_ids(model)
        self.eos_token = self.tokenizer.convert_ids_to_tokens(self.eos_ids[0])

        self.dist = distributed if isinstance(distributed, DataParallel) else setup_distributed(distributed,
                                                                                                self.device)
        self.is_main = self.dist.is_main
        if inner_model(model) is not model and self.dist.strategy == "fsdp2":
            raise ValueError("a PEFT policy trains in one process or with DDP (DistributedConfig(strategy='ddp')); "
                             "FSDP2 is not supported for it")
        check_lora_exportable(model)  # final/ merges the adapters: an unmergeable kind fails now, not after training
        self._check_data_parallel_sizes()
        self.forward_layout = forward_layout if forward_layout is not None else \
            config.forward_layout
        if self.forward_layout not in FORWARD_LAYOUTS:
            raise ValueError(f"forward_layout must be one of {FORWARD_LAYOUTS}, got {self.forward_layout!r}")
        resolve_forward_layout(self.model, self.forward_layout)  # "packed" that cannot run fails here, not mid-run
        self.row_seeded_sampling = self.dist.distributed if row_seeded_sampling is None else bool(row_seeded_sampling)

        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics: MetricsLogger | _NoMetrics = _NoMetrics()
        if self.is_main:
            sinks = make_sinks(config.report_to, self.output_dir, config.run_name, config.to_dict())
            self.metrics = MetricsLogger(self.output_dir / "metrics.jsonl", sinks)
            config.save(self.output_dir / "config.json")
            self._write_data_report()

        self.autocast_dtype = mixed_precision_dtype(config.mixed_precision, model)
        if self.is_main:
            self._report_precision()
        # the module every gradient-carrying policy forward goes through (DDP / FSDP2 wrap it when data-parallel)
        self.training_forward = self.dist.wrap(TrainingForward(self.model, self.forward_layout, self.autocast_dtype))
        self._prompt_offset = 0  # first global prompt slot of this rank's share of the current step
        self._group_base = 0  # first global prompt slot of the current sampling round (dynamic sampling)
        self._rollout_calls = 0  # rollout generate() calls in the current step (a row-seeding stream id)
        self.order = DataOrder(len(train_data), config.seed)
        # one data order for SFT and GRPO unless the warm-up has its own examples
        self.sft_order = DataOrder(len(sft_data), config.seed) if sft_data is not None else self.order
        self.optimizer: torch.optim.Optimizer | None = None
        self.reference: torch.nn.Module | None = None
        self.state: dict[str, Any] = {"phase": None, "phase_step": 0, "global_step": 0, "phase_complete": False,
                                      "completed_phases": [], "eval_results": {}, "optimizer_steps": 0}

    # ------------------------------------------------------------------------------------------------------
    # bookkeeping

    @property
    def phases(self) -> list[str]:
        """Phases of this run, in order: "sft" (if sft_steps > 0), then "grounding", "sparse" or "alternate"."""
        phases = ["sft"] if self.config.sft_steps > 0 else []
        return phases + (["grounding", "sparse"] if self.config.schedule == "stages" else ["alternate"])

    def _phase_steps(self, phase: str) -> int:
        return {"sft": self.config.sft_steps, "grounding": self.config.grounding_steps,
                "sparse": self.config.sparse_steps, "alternate": self.config.alternate_steps}[phase]

    def _check_data_parallel_sizes(self) -> None:
        """Global batch sizes must split evenly over the ranks (each rank runs the same number of steps)."""
        if not self.dist.distributed:
            return
        config = self.config
        self.dist.shard(config.prompts_per_step, "prompts_per_step")
        if config.sft_steps:
            self.dist.shard(config.sft_batch_size, "sft_batch_size")
        if config.mini_batch_size is not None:
            self.dist.shard(config.mini_batch_size, "mini_batch_size")

    def _write_data_report(self) -> None:
        reports = {"train": self.train_data.report.to_dict()}
        if self._separate_sft_data:
            reports["sft"] = self.sft_data.report.to_dict()
        if self.eval_data is not None:
            reports["eval"] = self.eval_data.report.to_dict()
        (self.output_dir / "skipped_samples.json").write_text(json.dumps(reports, indent=1) + "\n")
        for split, report in reports.items():
            if report["skipped"]:
                logger.warning("%s data: %d of %d rows skipped: %s", split, len(report["skipped"]), report["total"],
                               report["skipped_by_reason"])

    def _report_precision(self) -> None:
        low = sorted({str(p.dtype) for p in self._trainable_parameters() if p.dtype in (torch.bfloat16, torch.float16)})
        if low:  # e.g. from_pretrained(..., dtype=torch.bfloat16) and full fine-tuning
            logger.warning("trainable parameters in %s: AdamW updates smaller than ~1/256 of a weight are lost in "
                           "that format; load the model in float32 (mixed_precision='auto' then runs the forwards "
                           "under bf16 autocast on CUDA) or train LoRA adapters", " / ".join(low))
        if self.autocast_dtype is not None:
            logger.info("mixed precision: forwards under torch.autocast(%s), weights and optimizer states in %s",
                        self.autocast_dtype, next(self.model.parameters()).dtype)

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _new_optimizer(self, phase: str) -> torch.optim.Optimizer:
        lr = self._base_lr(phase)
        return torch.optim.AdamW(self._trainable_parameters(), lr=lr, betas=self.config.adam_betas,
                                 weight_decay=self.config.weight_decay)

    def _base_lr(self, phase: str) -> float:
        config = self.config
        if phase == "sft":
            return config.sft_lr
        if phase == "sparse" and config.sparse_lr is not None:
            return config.sparse_lr
        return config.lr

    def _learning_rate(self, phase: str, step: int) -> float:
        """SFT: linear warm-up then cosine decay to 10%; GRPO: linear warm-up then constant."""
        config = self.config
        if phase == "sft":
            warm = min(1.0, (step + 1) / config.sft_warmup_steps) if config.sft_warmup_steps else 1.0
            progress = step / max(config.sft_steps, 1)
            return config.sft_lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
        warm = min(1.0, (step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
        return self._base_lr(phase) * warm

    def _start_phase(self, phase: str) -> None:
        self.state.update(phase=phase, phase_step=0, phase_complete=False)
        self.optimizer = self._new_optimizer(phase)
        self.reference = None
        if phase != "sft" and self.config.beta > 0:
            self.reference = self.dist.frozen_copy(self.model)  # frozen KL reference: the policy at phase start

    def _state_for_checkpoint(self) -> dict[str, Any]:
        orders = {"data_order": self.order.state_dict()}
        if self._separate_sft_data:
            orders["sft_data_order"] = self.sft_order.state_dict()
        return {**self.state, **orders, "config": self.config.to_dict()}

    def save(self, name: str, keep: bool = False) -> Path:
        """Save a checkpoint ``checkpoints/<name>`` and point the tracker at it; older step checkpoints beyond
        ``keep_checkpoints`` are deleted unless ``keep`` (stage ends are always kept)."""
        # collectives first (every rank): gathered weights / optimizer state (FSDP2), every rank's RNG states
        rng_states = self.dist.gather_objects(capture_rng_state()) if self.dist.distributed else None
        model_state = self.dist.model_state_dict(self.model)
        optimizer_state = self.dist.optimizer_state_dict(self.optimizer) if self.optimizer is not None else None
        path = self.checkpoint_dir / name
        if self.is_main:
            save_checkpoint(path, self.model, self._state_for_checkpoint(), optimizer=self.optimizer,
                            processor=self.processor, reference=self.reference, model_state=model_state,
                            optimizer_state=optimizer_state, rng_states=rng_states)
            write_tracker(self.checkpoint_dir, name, self.state)
            if not keep:
                self._rotate_step_checkpoints(name)
        self.dist.barrier()  # no rank moves on (or resumes) before the checkpoint and its tracker exist
        return path

    def _rotate_step_checkpoints(self, current: str) -> None:
        steps = sorted(p for p in self.checkpoint_dir.glob("*-step-*") if p.is_dir() and not p.name.endswith(".partial"))
        stale = [p for p in steps if p.name != current][: max(0, len(steps) - self.config.keep_checkpoints)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    def resume(self, checkpoint: str | Path = "latest") -> dict[str, Any]:
        """Restore model, optimizer, reference, RNG states, counters and data order from a checkpoint.

        Args:
            checkpoint: "latest" (the tracker file in ``<output_dir>/checkpoints``) or a checkpoint folder.

        Returns:
            The restored trainer state. Raises FileNotFoundError when there is nothing to resume from.
        """
        if checkpoint == "latest":
            info = read_tracker(self.checkpoint_dir)
            if info is None:
                raise FileNotFoundError(f"no checkpoint tracker in {self.checkpoint_dir} to resume from")
            path, saved = info.path, info.state
        else:
            path = Path(checkpoint)
            saved = json.loads((path / "trainer_state.json").read_text())
        phase = saved["phase"]
        self.optimizer = self._new_optimizer(phase) if phase and not saved["phase_complete"] else None
        self.reference = None
        if phase and phase != "sft" and self.config.beta > 0 and not saved["phase_complete"]:
            self.reference = self.dist.frozen_copy(self.model)
        saved = load_checkpoint_weights(path, self.model, optimizer=self.optimizer, reference=self.reference,
                                        rank=self.dist.rank, **self.dist.state_loaders())
        self.order.load_state_dict(saved.pop("data_order"))
        sft_order = saved.pop("sft_data_order", None)
        if self._separate_sft_data:
            if sft_order is None:
                raise ValueError(f"{path} was saved without separate sft_data; resume it without sft_data")
            self.sft_order.load_state_dict(sft_order)
        saved.pop("config", None)
        self.state = saved
        self.metrics.truncate_after(self.state["global_step"])
        if self.is_main:
            logger.info("resumed from %s (phase %s, step %d)", path, phase, self.state["phase_step"])
        return self.state

    # ------------------------------------------------------------------------------------------------------
    # training loop

    def train(self, resume: bool | str | Path = False, stop_at_step: int | None = None) -> dict[str, dict]:
        """Run every remaining phase; returns the held-out evaluation results by label.

        Args:
            resume: False (start fresh), True / "latest" (continue from the tracker's checkpoint) or a folder.
            stop_at_step: save a checkpoint and return once the global step reaches this (for tests and
                preemptible jobs).

        Raises:
            NonFiniteError: a NaN/inf reward, loss or gradient; the message names the last good checkpoint, which
                is left untouched (the failing step is never applied), and ``<output_dir>/FAILED.json`` records it.
        """
        if resume:
            self.resume("latest" if resume is True else resume)
        try:
            for phase in self.phases:
                if phase in self.state["completed_phases"]:
                    continue
                if self._run_phase(phase, stop_at_step):
                    return self.state["eval_results"]
            self._finish()
        except NonFiniteError as error:
            self._record_failure(error)
            self.metrics.close()
            raise
        finally:
            self.metrics.flush()
        return self.state["eval_results"]

    def _run_phase(self, phase: str, stop_at_step: int | None) -> bool:
        """Run one phase to its end (or to stop_at_step: returns True when stopped early)."""
        if self.state["phase"] != phase:
            self._resume_from_previous_stage(phase)
            self._start_phase(phase)
        total = self._phase_steps(phase)
        progress = _progress_bar(total, self.state["phase_step"], phase, self.config.progress and self.is_main)
        try:
            while self.state["phase_step"] < total:
                if stop_at_step is not None and self.state["global_step"] >= stop_at_step:
                    self.save(f"{phase}-step-{self.state['global_step']:06d}")
                    return True
                started = time.perf_counter()
                step_metrics = self.sft_step() if phase == "sft" else self.grpo_step(phase)
                self.state["phase_step"] += 1
                self.state["global_step"] += 1
                step_metrics.update(phase=phase, phase_step=self.state["phase_step"],
                                    global_step=self.state["global_step"], seconds=time.perf_counter() - started)
                self._after_step(phase, step_metrics, progress)
        finally:
            if progress is not None:
                progress.close()
        self._complete_phase(phase)
        return False

    def _resume_from_previous_stage(self, phase: str) -> None:
        """Stage 2 starts from the stage-1 checkpoint named by the tracker (a no-op in the same process, where the
        weights already are those; a new process gets them through :meth:`train` with resume)."""
        info = read_tracker(self.checkpoint_dir)
        if phase == "sparse" and info is not None and info.state.get("phase") == "grounding" and self.is_main:
            logger.info("stage 2 starts from %s", info.path)

    def _after_step(self, phase: str, step_metrics: dict[str, Any], progress) -> None:
        config, step = self.config, self.state["global_step"]
        if step % config.log_every == 0 or self.state["phase_step"] == self._phase_steps(phase):
            self.metrics.log(step_metrics)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(_postfix(step_metrics), refresh=False)
        if phase != "sft" and config.eval_every and self.state["phase_step"] % config.eval_every == 0 \
                and self.state["phase_step"] < self._phase_steps(phase):
            self.evaluate(label=None)
        if config.save_every and step % config.save_every == 0:
            self.save(f"{phase}-step-{step:06d}")

    def _complete_phase(self, phase: str) -> None:
        if self.eval_data is not None:
            self.evaluate(label=PHASE_LABELS[phase])
        self.state["phase_complete"] = True
        self.state["completed_phases"].append(phase)
        self.optimizer = None  # the next phase starts a fresh optimizer: no need to store this one
        self.save(f"{phase}-final", keep=True)

    def _finish(self) -> None:
        model_state = self.dist.model_state_dict(self.model)  # collective under FSDP2
        if self.is_main:
            save_model_folder(self.output_dir / "final", self.model, self.processor, state_dict=model_state,
                              merge_adapters=True)
            results = self.state["eval_results"]
            if results:
                (self.output_dir / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
                (self.output_dir / "eval_table.md").write_text(format_eval_table(results) + "\n")
            plot_curves(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")
        self.metrics.close()
        self.dist.barrier()

    def _record_failure(self, error: Exception) -> None:
        info = read_tracker(self.checkpoint_dir)
        last_good = str(info.path) if info is not None else None
        record = {"error": str(error), "phase": self.state["phase"], "global_step": self.state["global_step"],
                  "last_good_checkpoint": last_good}
        if self.is_main:
            (self.output_dir / "FAILED.json").write_text(json.dumps(record, indent=1) + "\n")
        error.args = (f"{error} -- training stopped at global step {self.state['global_step']} "
                      f"(phase {self.state['phase']}); last good checkpoint: {last_good or 'none saved yet'}",)
        if self.is_main:
            logger.error("%s", error.args[0])

    # ------------------------------------------------------------------------------------------------------
    # evaluation

    def evaluate(self, label: str | None = None) -> EvalResult:
        """Two-pass greedy evaluation on the held-out data; logged as eval/* metrics and, with a label, stored in
        the results table. The training RNG streams are left untouched."""
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_data")
        examples = self.eval_data.examples[: self.config.eval_max_samples]
        keys = [("eval", i) for i in range(len(examples))]
        start, stop = self.dist.split(len(examples))  # data-parallel: each rank decodes its slice
        local = None
        with nvtx_range("vitos.trainer.evaluate"), torch.random.fork_rng(devices=[]), \
                self.dist.gathered_parameters(), self._mixed_precision():
            if stop > start:
                local = evaluate_policy(self.model, self.encoder, examples[start:stop], self.config.eval_batch_size,
                                        self.config.max_new_tokens, self.config.dilate, self.config.fuse_tokens,
                                        self.config.no_box_policy, cache_keys=keys[start:stop])
        result = self._combine_eval(local)
        record = {"global_step": self.state["global_step"], "phase": self.state["phase"], **result.as_dict("eval/")}
        if label is not None:
            record["eval/label"] = label
            self.state["eval_results"][label] = result.as_dict()
        self.metrics.log(record)
        if self.is_main:
            logger.info("eval %s: %s", label or f"step {self.state['global_step']}", result)
        return result

    def _combine_eval(self, local: EvalResult | None) -> EvalResult:
        """One process's view of a sharded evaluation: per-sample means weighted by each rank's sample count."""
        if not self.dist.distributed:
            return local
        parts = [p for p in self.dist.gather_objects(local.as_dict() if local is not None else None) if p]
        total = sum(p["num_samples"] for p in parts)
        fields = [k for k in parts[0] if k not in ("num_samples", "seconds")]
        means = {k: sum(p[k] * p["num_samples"] for p in parts) / total for k in fields}
        return EvalResult(num_samples=total, seconds=max(p["seconds"] for p in parts), **means)

    # ------------------------------------------------------------------------------------------------------
    # SFT

    def _sft_selection(self, examples: list, prompt: PromptBatch, first_row: int = 0,
                       total_rows: int | None = None) -> SparseSelection | None:
        """Keep mask of an SFT batch: the last ``sft_sparse_fraction`` of the (global) batch rows see only the
        visual tokens in their gold boxes, the others all tokens (one pruned forward serves both: a row keeping
        everything is the full-token forward). ``first_row`` / ``total_rows`` place this rank's rows in the global
        batch."""
        total_rows = len(examples) if total_rows is None else total_rows
        sparse_rows = round(total_rows * self.config.sft_sparse_fraction)
        if sparse_rows == 0:
            return None
        first_sparse = total_rows - sparse_rows
        boxes = [self._sft_boxes(e, first_row + row) if first_row + row >= first_sparse else []
                 for row, e in enumerate(examples)]
        selection, _ = sparse_selection(boxes, prompt.image_grid_thw.cpu(), self.merge_size, self.config.dilate,
                                        self.config.fuse_tokens, no_box_policy="all_visual_tokens")
        return SparseSelection(selection.keep.to(self.device), selection.fuse)

    def _sft_boxes(self, example, global_row: int) -> list[list[float]]:
        """The boxes that select a sparse SFT row's tokens: the gold boxes, jittered when ``sft_box_jitter`` > 0 by a
        generator keyed on (seed, step, global row), so the draws depend neither on the sharding nor on the global
        RNG."""
        amount = self.config.sft_box_jitter
        if amount == 0:
            return example.gold_boxes
        key = (self.config.seed * 1_000_003 + self.state["global_step"]) * 65_537 + global_row
        return jitter_boxes(example.gold_boxes, amount, torch.Generator().manual_seed(key))

    def sft_step(self) -> dict[str, float]:
        """One supervised step on gold outputs: -mean log p(gold completion tokens) over the batch (a fraction of
        the rows on their gold-box token-sparse view, see ``sft_sparse_fraction``)."""
        global_indices = self.sft_order.next_indices(self.config.sft_batch_size)
        start, stop = self.dist.shard(len(global_indices), "sft_batch_size")
        indices = global_indices[start:stop]
        examples = [self.sft_data[i] for i in indices]
        keys = [("sft", i) for i in indices] if self._separate_sft_data else indices  # prompt cache keys
        prompt = self.encoder.batch(examples, keys=keys).to(self.device)
        targets = [torch.tensor(self.tokenizer(gold_completion(e.sample, self.eos_token),
                                               add_special_tokens=False).input_ids) for e in examples]
        sequences = build_sequences(prompt, targets, self.encoder.pad_token_id)
        sequences = type(sequences)(sequences.prompt, sequences.completion_ids.to(self.device),
                                    sequences.completion_mask.to(self.device))
        self.model.train()
        selection = self._sft_selection(examples, prompt, start, len(global_indices))
        logprobs = self.training_forward(sequences, selection)
        mask = sequences.completion_mask.to(logprobs.dtype)
        normalizer = self.dist.loss_normalizer(mask.sum())  # data-parallel: global token count / world size
        loss = -(logprobs * mask).sum() / (mask.sum().clamp_min(1.0) if normalizer is None else normalizer)
        grad_norm = self._optimizer_step(loss, "sft")
        return {"sft/loss": self.dist.mean({"loss": loss.item()})["loss"], "sft/grad_norm": grad_norm,
                "lr": self._current_lr()}

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0

    def _optimizer_step(self, loss: torch.Tensor, phase: str) -> float:
        """Backward + clip + step, refusing to apply a non-finite loss or gradient."""
        finite = bool(torch.isfinite(loss))
        if self.dist.any(not finite):  # a collective decision: every rank stops at the same step
            where = "" if not self.dist.distributed else \
                f" on rank {self.dist.rank}" if not finite else " on another rank"
            raise NonFiniteError(f"non-finite {phase} loss ({loss.item()}){where}")
        self.optimizer.zero_grad(set_to_none=True)
        with nvtx_range("vitos.trainer.backward"):
            loss.backward()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        grad_norm = self.dist.clip_grad_norm(self._trainable_parameters(), max_norm)  # of the synchronized grads
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"non-finite {phase} gradient norm ({grad_norm})")
        lr = self._learning_rate(self.state["phase"] or phase, self.state["phase_step"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.state["optimizer_steps"] += 1
        return grad_norm

    # ------------------------------------------------------------------------------------------------------
    # GRPO: rollouts

    def _sampling(self) -> SamplingSettings:
        c = self.config
        return SamplingSettings(max_new_tokens=c.max_new_tokens, do_sample=True, temperature=c.temperature,
                                top_p=c.top_p, top_k=c.top_k, batch_size=c.generation_batch_size)

    def next_prompts(self) -> tuple[list[int], PromptBatch]:
        """The dataset indices of this rank's share of the next ``prompts_per_step`` prompts (data order; all of
        them in one process) and their encoded prompt batch."""
        global_indices = self.order.next_indices(self.config.prompts_per_step)
        start, stop = self.dist.shard(len(global_indices), "prompts_per_step")
        self._prompt_offset = start
        indices = global_indices[start:stop]
        prompt = self.encoder.batch([self.train_data[i] for i in indices], keys=indices).to(self.device)
        return indices, prompt

    def _row_seeds(self, first_row: int, count: int) -> torch.Tensor | None:
        """Per-row sampling seeds of the next rollout call (global rows first_row ..), or None (global RNG)."""
        stream = self._rollout_calls
        self._rollout_calls += 1
        if not self.row_seeded_sampling:
            return None
        return rollout_row_seeds(self.config.seed, self.state["global_step"], stream,
                                 torch.arange(first_row, first_row + count))

    def rollout_grounding(self, indices: list[int], prompt: PromptBatch) -> Rollouts:
        """G rollouts per prompt with all visual tokens (rows prompt-major: prompt p owns rows p*G .. p*G+G-1).
        Group ids are global prompt slots (this rank's first prompt is slot ``prompts_per_step / world * rank``)."""
        group = self.config.group_size
        rows = torch.arange(prompt.size).repeat_interleave(group)
        expanded = prompt.select(rows)
        row_offset = (self._group_base + self._prompt_offset) * group
        with nvtx_range("vitos.trainer.rollout.grounding"), self.dist.gathered_parameters(), self._mixed_precision():
            completions, truncated = generate_completions(self.model, expanded, self._sampling(),
                                                          merge_size=self.merge_size,
                                                          row_seeds=self._row_seeds(row_offset, rows.numel()))
        return make_rollouts("grounding", self.tokenizer, expanded.to("cpu"), completions, truncated,
                             group_ids=rows + self._group_base + self._prompt_offset,
                             example_ids=[indices[r] for r in rows.tolist()],
                             parent=torch.full((rows.numel(),), -1, dtype=torch.int64), selection=None,
                             kept_ratio=torch.ones(rows.numel()), patch_size=self.patch_size,
                             merge_size=self.merge_size, row_offset=row_offset)

    def rollout_sparse(self, grounding: Rollouts) -> Rollouts:
        """G' rollouts per grounding rollout O_i that see only the visual tokens inside O_i's boxes (rows
        parent-major: O_i owns rows i*G' .. i*G'+G'-1)."""
        config = self.config
        parent = torch.arange(grounding.size).repeat_interleave(config.sparse_group)
        prompt = grounding.sequences.prompt.select(parent)
        boxes = [grounding.boxes[i] for i in parent.tolist()]
        selection, kept_ratio = sparse_selection(boxes, prompt.image_grid_thw, self.merge_size, config.dilate,
                                                 config.fuse_tokens, config.no_box_policy)
        device_selection = type(selection)(selection.keep.to(self.device), selection.fuse)
        row_offset = grounding.row_offset * config.sparse_group
        with nvtx_range("vitos.trainer.rollout.sparse"), self.dist.gathered_parameters(), self._mixed_precision():
            completions, truncated = generate_completions(self.model, prompt.to(self.device), self._sampling(),
                                                          device_selection, self.merge_size,
                                                          row_seeds=self._row_seeds(row_offset, parent.numel()))
        return make_rollouts("sparse", self.tokenizer, prompt, completions, truncated,
                             group_ids=grounding.group_ids[parent],
                             example_ids=[grounding.example_ids[i] for i in parent.tolist()], parent=parent,
                             selection=selection, kept_ratio=kept_ratio, patch_size=self.patch_size,
                             merge_size=self.merge_size, row_offset=row_offset)

    # ------------------------------------------------------------------------------------------------------
    # GRPO: rewards

    def _image_sizes(self, rollouts: Rollouts) -> list[tuple[int, int]]:
        grid = rollouts.sequences.prompt.image_grid_thw.tolist()
        return [(w * self.patch_size, h * self.patch_size) for _, h, w in grid]

    def score(self, grounding: Rollouts, sparse: Rollouts | None) -> tuple[RewardTerms, RewardTerms | None]:
        """Reward terms of both branches (cross-feedback links them). Raises NonFiniteError on NaN/inf (on every
        rank when any rank has one)."""
        failure: NonFiniteError | None = None
        with nvtx_range("vitos.trainer.score"):
            try:
                terms = self._score(grounding, sparse)
            except NonFiniteError as error:
                failure = error
        if self.dist.any(failure is not None):
            raise failure if failure is not None else NonFiniteError("non-finite reward on another rank")
        return terms

    def _reward_means(self, terms: RewardTerms, prefix: str) -> dict[str, float]:
        """Means of every reward term over the global batch (one process: this batch)."""
        return self.dist.mean(terms.means(prefix), weight=terms.total.numel())

    def _score(self, grounding: Rollouts, sparse: Rollouts | None) -> tuple[RewardTerms, RewardTerms | None]:
        weights = self.config
        g_examples = [self.train_data[i] for i in grounding.example_ids]
        g_sizes = self._image_sizes(grounding)
        g_format, g_iou, g_accuracy = basic_terms(grounding.texts, g_examples, g_sizes)
        g_precision = precision_terms(grounding.texts, g_examples, g_sizes)
        if sparse is None:
            return grounding_rewards(g_format, g_iou, g_accuracy, None, weights.grounding_rewards, g_precision), None
        s_examples = [self.train_data[i] for i in sparse.example_ids]
        s_format, s_iou, s_accuracy = basic_terms(sparse.texts, s_examples, self._image_sizes(sparse))
        g_terms = grounding_rewards(g_format, g_iou, g_accuracy, s_accuracy.view(grounding.size, -1),
                                    weights.grounding_rewards, g_precision)
        s_terms = sparse_rewards(s_format, s_iou, s_accuracy, g_accuracy, sparse.parent, weights.sparse_rewards)
        return g_terms, s_terms

    # ------------------------------------------------------------------------------------------------------
    # GRPO: update

    def _branch_logprobs(self, model: torch.nn.Module, rollouts: Rollouts, rows: torch.Tensor) -> torch.Tensor:
        sequences, selection = rollouts.select(rows)
        sequences = type(sequences)(sequences.prompt.to(self.device), sequences.completion_ids.to(self.device),
                                    sequences.completion_mask.to(self.device))
        if selection is not None:
            selection = type(selection)(selection.keep.to(self.device), selection.fuse)
        if model is self.model:  # the policy: through the (data-parallel wrapped) training forward
            return self.training_forward(sequences, selection, self.config.temperature)
        with self._mixed_precision():  # the frozen reference
            return completion_logprobs(model, sequences, selection, self.config.temperature, self.forward_layout)

    def _mixed_precision(self):
        """The autocast context of the forwards outside the training forward: rollouts, evaluation, the reference."""
        return autocast_context(self.device, self.autocast_dtype)

    def _frozen_logprobs(self, model: torch.nn.Module, rollouts: Rollouts, batches: list[torch.Tensor]):
        """Per mini-batch log-probs under a frozen model (old policy or reference), no grad."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [self._branch_logprobs(model, rollouts, rows) for rows in batches]
        finally:
            model.train(was_training)

    def update_branch(self, rollouts: Rollouts, terms: RewardTerms) -> dict[str, float]:
        """GRPO update of one branch on its rollouts: group advantages, then ``updates_per_batch`` passes of
        clipped-surrogate optimizer steps over mini-batches. Only this branch's forward runs (gradient isolation).

        Returns:
            Metrics prefixed with the branch name.
        """
        config, branch = self.config, rollouts.branch
        # advantages over the global batch: all-gather (reward, group id) -- group ids are global prompt slots
        global_rewards, global_groups = self.dist.gather(terms.total), self.dist.gather(rollouts.group_ids)
        global_advantages = group_advantages(global_rewards, global_groups, config.advantage_scale,
                                             config.advantage_epsilon)
        first = int(self.dist.gather(torch.tensor([rollouts.size]))[:self.dist.rank].sum())
        advantages = global_advantages[first:first + rollouts.size]
        # mini_batch_size is global: each rank takes its share of every optimizer step
        size = (config.mini_batch_size // self.dist.world_size if config.mini_batch_size else None) or rollouts.size
        batches = [torch.arange(s, min(s + size, rollouts.size)) for s in range(0, rollouts.size, size)]
        needs_old = config.updates_per_batch > 1 or len(batches) > 1
        old = self._frozen_logprobs(self.model, rollouts, batches) if needs_old else None
        reference = self._frozen_logprobs(self.reference, rollouts, batches) if self.reference is not None else None
        losses, stats_sum, grad_norms = [], {}, []
        self.model.train()
        with nvtx_range(f"vitos.trainer.update.{branch}"):
            for _ in range(config.updates_per_batch):
                for index, rows in enumerate(batches):
                    logprobs = self._branch_logprobs(self.model, rollouts, rows)
                    sequences, _ = rollouts.select(rows)
                    mask = sequences.completion_mask.to(self.device).bool()
                    if config.mask_truncated_completions:
                        mask = mask & ~rollouts.truncated[rows].to(self.device)[:, None]
                    # data-parallel: this rank's share of the global mini-batch's mean (None in one process)
                    tokens = mask.sum()
                    normalizer = self.dist.loss_normalizer(tokens if config.loss_aggregation == "token-mean"
                                                           else rows.numel())
                    loss, stats = clipped_surrogate_loss(
                        logprobs, old[index] if old is not None else logprobs.detach(),
                        advantages[rows].to(self.device), mask, config.epsilon_low, config.epsilon_high,
                        ref_logprobs=reference[index] if reference is not None else None, beta=config.beta,
                        aggregation=config.loss_aggregation, normalizer=normalizer, max_length=config.max_new_tokens)
                    grad_norms.append(self._optimizer_step(loss, branch))
                    losses.append(self.dist.mean({"loss": loss.item()})["loss"])
                    for key, value in self.dist.mean(stats.as_dict(), weight=float(tokens)).items():
                        stats_sum[key] = stats_sum.get(key, 0.0) + value
        count = len(losses)
        lengths = rollouts.sequences.completion_mask.sum(1).float()
        metrics = {f"{branch}/loss": sum(losses) / count, f"{branch}/grad_norm": sum(grad_norms) / count,
                   f"{branch}/advantage_abs_mean": float(global_advantages.abs().mean()), "lr": self._current_lr()}
        metrics.update(self.dist.mean({f"{branch}/completion_length": float(lengths.mean()),
                                       f"{branch}/truncated_fraction": float(rollouts.truncated.float().mean()),
                                       f"{branch}/kept_ratio": float(rollouts.kept_ratio.mean())},
                                      weight=rollouts.size))
        metrics.update({f"{branch}/{key}": value / count for key, value in stats_sum.items()})
        return metrics

    def _sample_round(self, phase: str, round_index: int) -> _RolloutRound:
        """One rollout batch of a step: the next prompts, their grounding rollouts, the sparse rollouts when the
        phase or the cross-feedback needs them, and the rewards. Group ids of round r start at r * prompts_per_step
        (unique within the step)."""
        self._group_base = round_index * self.config.prompts_per_step
        indices, prompt = self.next_prompts()
        with nvtx_range("vitos.trainer.rollout"):
            grounding = self.rollout_grounding(indices, prompt)
            needs_sparse = phase != "grounding" or self.config.grounding_rewards.cross != 0
            sparse = self.rollout_sparse(grounding) if needs_sparse else None
        g_terms, s_terms = self.score(grounding, sparse)
        return _RolloutRound(grounding, sparse, g_terms, s_terms, len(indices))

    def _informative(self, phase: str, part: _RolloutRound) -> torch.Tensor:
        """bool [prompts of the round]: whose rewards differ within the group of the branch the step optimizes
        (the sparse branch in stage 2, else the grounding branch, whose update comes first in "alternate")."""
        if phase == "sparse":
            return informative_groups(part.sparse_terms.total, self.config.group_size * self.config.sparse_group)
        return informative_groups(part.grounding_terms.total, self.config.group_size)

    def collect_rollouts(self, phase: str) -> tuple[_RolloutRound, dict[str, float]]:
        """The rollouts a GRPO step trains on, and the metrics of every sampled rollout (reward means, kept ratio;
        with dynamic sampling also ``sampling/*``).

        Without ``dynamic_sampling``: one round of ``prompts_per_step`` prompts. With it (DAPO): rounds of
        ``prompts_per_step`` new prompts until this rank has its share of prompts whose rewards differ within the
        optimized branch's group, or ``max_sampling_rounds`` rounds ran (every rank runs the same number of rounds);
        the batch is then topped up with uninformative prompts of the earliest rounds, so every step (and rank)
        trains on exactly its share of ``prompts_per_step`` prompts.
        """
        config = self.config
        rounds = [self._sample_round(phase, 0)]
        if not config.dynamic_sampling:
            return rounds[0], self._reward_metrics(rounds)
        wanted = rounds[0].prompts
        flags = [self._informative(phase, rounds[0])]
        while len(rounds) < config.max_sampling_rounds and \
                self.dist.any(sum(int(f.sum()) for f in flags) < wanted):
            rounds.append(self._sample_round(phase, len(rounds)))
            flags.append(self._informative(phase, rounds[-1]))
        informative = [(r, p) for r, f in enumerate(flags) for p in f.nonzero().flatten().tolist()][:wanted]
        filler = [(r, p) for r, f in enumerate(flags) for p in (~f).nonzero().flatten().tolist()]
        chosen = sorted(informative + filler[:wanted - len(informative)])
        screened = torch.cat(flags).float()
        metrics = {"sampling/rounds": float(len(rounds)),
                   **self.dist.mean({"sampling/informative_fraction": float(screened.mean()),
                                     "sampling/informative_in_batch": len(informative) / wanted},
                                    weight=float(screened.numel())),
                   **self._reward_metrics(rounds)}
        return self._merge_rounds(rounds, chosen), metrics

    def _reward_metrics(self, rounds: list[_RolloutRound]) -> dict[str, float]:
        """Means of every reward term (and of the sparse kept ratio) over all rollouts of the step's rounds."""
        metrics = self._reward_means(RewardTerms.concat([part.grounding_terms for part in rounds]),
                                     "grounding/reward/")
        if rounds[0].sparse is not None:
            metrics.update(self._reward_means(RewardTerms.concat([part.sparse_terms for part in rounds]),
                                              "sparse/reward/"))
            kept = torch.cat([part.sparse.kept_ratio for part in rounds])
            metrics.update(self.dist.mean({"sparse/kept_ratio": float(kept.mean())}, weight=kept.numel()))
        return metrics

    def _merge_rounds(self, rounds: list[_RolloutRound], chosen: list[tuple[int, int]]) -> _RolloutRound:
        """The chosen (round, prompt) groups of several rounds as one batch, prompt-major like a single round."""
        group, sparse_group = self.config.group_size, self.config.sparse_group
        grounding_parts, sparse_parts, g_terms, s_terms = [], [], [], []
        for index, part in enumerate(rounds):
            prompts = torch.tensor([p for r, p in chosen if r == index], dtype=torch.int64)
            if not prompts.numel():
                continue
            g_rows = (prompts[:, None] * group + torch.arange(group)).flatten()
            grounding_parts.append(part.grounding.take(g_rows))
            g_terms.append(part.grounding_terms.take(g_rows))
            if part.sparse is not None:
                s_rows = (g_rows[:, None] * sparse_group + torch.arange(sparse_group)).flatten()
                sparse_parts.append(part.sparse.take(s_rows))
                s_terms.append(part.sparse_terms.take(s_rows))
        pad = int(self.tokenizer.pad_token_id)
        grounding = concat_rollouts(grounding_parts, pad)
        sparse = None
        if sparse_parts:
            parent = torch.arange(grounding.size).repeat_interleave(sparse_group)
            sparse = concat_rollouts(sparse_parts, pad, parent=parent)
        return _RolloutRound(grounding, sparse, RewardTerms.concat(g_terms),
                             RewardTerms.concat(s_terms) if s_terms else None, len(chosen))

    def grpo_step(self, phase: str) -> dict[str, float]:
        """One GRPO step of a phase: "grounding" (stage 1), "sparse" (stage 2) or "alternate" (grounding update,
        then a sparse update on fresh sparse rollouts from the updated policy and the same grounding boxes)."""
        if phase not in ("grounding", "sparse", "alternate"):
            raise ValueError(f"phase must be 'grounding', 'sparse' or 'alternate', got {phase!r}")
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        self._rollout_calls = 0
        batch, sampled_metrics = self.collect_rollouts(phase)
        grounding, sparse, g_terms, s_terms = batch.grounding, batch.sparse, batch.grounding_terms, batch.sparse_terms
        metrics["rollout_seconds"] = time.perf_counter() - started
        metrics.update(sampled_metrics)
        with nvtx_range("vitos.trainer.update"):
            if phase in ("grounding", "alternate"):
                metrics.update(self.update_branch(grounding, g_terms))
        if phase == "alternate":
            with nvtx_range("vitos.trainer.rollout"):
                sparse = self.rollout_sparse(grounding)
            _, s_terms = self.score(grounding, sparse)
            metrics.update(self._reward_means(s_terms, "sparse/reward/"))
        with nvtx_range("vitos.trainer.update"):
            if phase in ("sparse", "alternate"):
                metrics.update(self.update_branch(sparse, s_terms))
        return metrics


@dataclass
class _RolloutRound:
    """Rollouts of one sampling round (or of the chosen groups of several) with their rewards."""

    grounding: Rollouts
    sparse: Rollouts | None
    grounding_terms: RewardTerms
    sparse_terms: RewardTerms | None
    prompts: int


def _progress_bar(total: int, initial: int, phase: str, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, initial=initial, desc=phase, dynamic_ncols=True, leave=True)


def _postfix(metrics: dict[str, Any]) -> dict[str, str]:
    keys = {"sft/loss": "loss", "grounding/reward/total": "R_g", "grounding/reward/iou": "iou",
            "grounding/reward/accuracy": "acc", "sparse/reward/total": "R_s", "sparse/reward/accuracy": "acc_s"}
    return {short: f"{metrics[key]:.3f}" for key, short in keys.items() if key in metrics}
