"""Data-parallel training of the ViToS trainer with torch.distributed: DDP or FSDP2, launched by torchrun.

    torchrun --nproc_per_node 2 -m vitos_ext.cli train --model DIR --train-file train.json --eval-file test.json \
        --output-dir runs/x --set prompts_per_step=8 ...

:class:`~vitos_ext.trainer.DualStreamGRPOTrainer` picks torchrun's environment up by itself (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR/PORT -- or a default process group the caller already initialized), the way Hugging Face's
Trainer does; pass ``distributed=DistributedConfig(strategy="fsdp2")`` (or a :class:`DataParallel` from
:func:`setup_distributed`) to choose the strategy. One process = one rank = one device (``cuda:LOCAL_RANK`` with
NCCL when the model is on CUDA, CPU with gloo otherwise). Every rank must see the same data and output folder
(a shared filesystem), as with any torchrun job.

What is sharded, and why the result equals one process with the same global batch (tested on CPU/gloo, 2 ranks):
  * Prompts: every rank holds the same seeded data order and draws the same global batch of ``prompts_per_step``
    prompts; rank r takes the r-th contiguous block of ``prompts_per_step / world_size`` (SFT likewise with
    ``sft_batch_size``). Whole GRPO groups stay on one rank: a prompt's G grounding rollouts and their G x G' sparse
    rollouts are generated, scored (cross-feedback links O_i with its O'_{i,j}) and trained where the prompt is,
    so no rollout ever crosses ranks.
  * Rollouts: sampled row-seeded (:class:`~vitos_ext.trainer.rollout.RowSeededSampler`): a rollout's random stream
    is keyed by (seed, global step, rollout call, *global* row index), so it is the same on any rank and in any
    generate() batch -- the union of the ranks' rollouts is the one-process rollout batch.
  * Advantages: group ids are *global* prompt slots; the ranks all-gather (reward, group id) and every rank runs
    group_advantages on the global batch, then keeps its rows. Per-group statistics would be local anyway (whole
    groups per rank), but "batch" advantage scaling uses the std over all groups, and the gathered rewards also give
    exact global reward metrics.
  * Loss: gradients are averaged over ranks (DDP all-reduce / FSDP2 reduce-scatter divide by world_size), so each
    rank normalizes its token (or sequence) sum by the *global* count of its global mini-batch divided by
    world_size: the averaged gradient is then the gradient of the one-process loss. ``mini_batch_size`` is global
    (verl's convention): each rank takes ``mini_batch_size / world_size`` of its rows per optimizer step, so every
    rank runs the same number of optimizer steps. (The k-th global mini-batch is then the union of every rank's k-th
    chunk: the same rollouts as one process, partitioned differently unless a mini-batch is the whole batch.)
    ``prompts_per_step``, ``sft_batch_size`` and ``mini_batch_size`` must be divisible by world_size.
  * Clipping / NaN stops: the gradient norm is that of the synchronized gradient (identical on every rank); a
    non-finite loss or reward on any rank stops every rank at the same step (a collective decision, no hang).
  * Checkpoints: rank 0 writes them (the per-rank RNG states are gathered into ``rng_ranks.pt``); every rank
    resumes from the same folder. Metrics, progress bars, reports and the final model are written by rank 0 only.
  * Evaluation: sharded (each rank decodes a contiguous slice of the held-out examples); the per-sample means are
    combined weighted by sample counts, so the numbers are those of one process.

Strategies
  * "ddp" (default): :class:`torch.nn.parallel.DistributedDataParallel` around the training forward
    (:class:`~vitos_ext.trainer.logprobs.TrainingForward`: the packed forward calls the policy's vision tower,
    language model and LM head directly, which a wrapper around the policy's own forward would never see).
    Rollouts, evaluation and no-grad forwards use the replicated policy as is.
  * "fsdp2": :func:`torch.distributed.fsdp.fully_shard` on every transformer block the model names in
    ``_no_split_modules`` (decoder layers, vision blocks) and on the training forward as root; parameters,
    gradients and optimizer states are sharded. Rollouts and evaluation run with the parameters gathered for their
    duration (:meth:`DataParallel.gathered_parameters`, like TRL's unwrap-for-generation); checkpoints gather full
    state dicts to rank 0 (torch.distributed.checkpoint.state_dict). The KL reference (beta > 0) is an unsharded
    frozen replica per rank. FSDP2 runs on CPU/gloo too (that is how it is tested here).
    Memory: during rollouts every rank holds the full policy (as TRL / verl do when generating with the training
    engine rather than a separate inference engine); training-time memory is sharded.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "STRATEGIES",
    "DataParallel",
    "DistributedConfig",
    "TorchDistributed",
    "setup_distributed",
]

logger = logging.getLogger("vitos_ext.trainer")

STRATEGIES = ("ddp", "fsdp2")


@dataclass
class DistributedConfig:
    """How the trainer runs data-parallel under torchrun.

    Attributes:
        strategy: "ddp" (replicated parameters, all-reduced gradients) or "fsdp2" (fully sharded parameters,
            gradients and optimizer states).
        backend: process-group backend when the trainer initializes the group itself; None: "nccl" for a CUDA
            model, "gloo" otherwise.
        timeout_minutes: collective timeout of a process group the trainer initializes.
        find_unused_parameters: DDP's flag (needed only if some trainable parameter takes no part in the loss).
        reshard_after_forward: FSDP2's flag for the transformer blocks (True frees gathered parameters after each
            block's forward, ZeRO-3 style; False keeps them until backward, ZeRO-2 style).
    """

    strategy: str = "ddp"
    backend: str | None = None
    timeout_minutes: float = 30.0
    find_unused_parameters: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.backend is not None and self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {self.backend!r}")
        if not self.timeout_minutes > 0:
            raise ValueError(f"timeout_minutes must be > 0, got {self.timeout_minutes!r}")


# ----------------------------------------------------------------------------------------------------------------
# the single-process context (also the interface)


class DataParallel:
    """The trainer's view of data parallelism. This base class is one process: every operation is the identity,
    so a single-process run executes exactly the reference trainer's arithmetic.

    Attributes:
        world_size, rank, local_rank: torch.distributed's numbers (1, 0, 0 here).
        strategy: "none", "ddp" or "fsdp2".
    """

    world_size = 1
    rank = 0
    local_rank = 0
    strategy = "none"

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs metrics."""
        return self.rank == 0

    # --- sharding -------------------------------------------------------------------------------------------

    def shard(self, count: int, name: str) -> tuple[int, int]:
        """(start, stop) of this rank's equal contiguous block of ``count`` items (``name`` for the error when
        ``count`` is not divisible by world_size)."""
        if count % self.world_size:
            raise ValueError(f"{name}={count} must be divisible by the number of processes ({self.world_size})")
        size = count // self.world_size
        return self.rank * size, (self.rank + 1) * size

    def split(self, count: int) -> tuple[int, int]:
        """(start, stop) of this rank's part of ``count`` items split as evenly as possible (uneven allowed)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    # --- collectives ----------------------------------------------------------------------------------------

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 in rank order (sizes may differ); same on all ranks."""
        return tensor

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a float64 CPU tensor."""
        return values

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return bool(flag)

    def barrier(self) -> None:
        """Wait for every rank."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (on every rank)."""
        return [obj]

    def mean(self, values: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        """Weighted mean over ranks of per-rank means (``weight`` = what each rank's mean is over)."""
        return dict(values)

    def loss_normalizer(self, local_count: torch.Tensor | float) -> float | None:
        """The denominator that makes this rank's share of a summed loss give, after gradient averaging over ranks,
        the gradient of the global mean: global count / world_size. None in one process (the loss keeps its own)."""
        return None

    # --- models ---------------------------------------------------------------------------------------------

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The training-forward module, wrapped for gradient synchronization."""
        return module

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Full parameters available to direct calls of the policy (generate(), evaluation) inside the block."""
        yield

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the (synchronized) gradients; returns their total norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen, eval-mode copy of the policy (the KL reference)."""
        return _freeze(copy.deepcopy(model))

    def model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The policy's full state dict for a checkpoint (collective), or None: use ``model.state_dict()``."""
        return None

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer's full state dict for a checkpoint (collective), or None: use ``optimizer.state_dict()``."""
        return None

    def state_loaders(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~vitos_ext.trainer.checkpoint.load_checkpoint_weights` that load full state
        dicts into this strategy's (possibly sharded) policy and optimizer; empty: the plain loaders."""
        return {}

    def close(self) -> None:
        """Destroy the process group if this context created it."""


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def setup_distributed(config: DistributedConfig | None = None, device: torch.device | str | None = None
                      ) -> DataParallel:
    """The data-parallel context of this process.

    Uses a default process group that is already initialized, else initializes one from torchrun's environment
    (WORLD_SIZE > 1): "nccl" for a CUDA ``device`` (cuda:LOCAL_RANK is made current), "gloo" otherwise. With one
    process (no torchrun, or --nproc_per_node 1) it returns the single-process :class:`DataParallel`.

    Args:
        config: strategy and group options (default: DDP).
        device: the policy's device (chooses the backend).
    """
    config = config or DistributedConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if world <= 1:
        return DataParallel()
    return TorchDistributed(config, device)


# ----------------------------------------------------------------------------------------------------------------
# torch.distributed


class TorchDistributed(DataParallel):
    """Data parallelism over a torch.distributed process group (see the module docstring)."""

    def __init__(self, config: DistributedConfig, device: torch.device | str | None = None):
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        self.config = config
        self.strategy = config.strategy
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._owns_group = False
        if not dist.is_initialized():
            backend = config.backend or ("nccl" if device.type == "cuda" else "gloo")
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=config.timeout_minutes))
            self._owns_group = True
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        backend = dist.get_backend()
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")
        if device.type == "cuda" and device.index is not None and backend == "nccl" \
                and device.index != torch.cuda.current_device():
            raise ValueError(f"rank {self.rank}: the model is on {device} but this rank's device is "
                             f"cuda:{torch.cuda.current_device()} (move the model to cuda:LOCAL_RANK)")
        self.device = device
        self._root: torch.nn.Module | None = None
        self._units: list[torch.nn.Module] = []
        logger.info("data parallel: rank %d of %d (%s, %s backend)", self.rank, self.world_size, self.strategy,
                    backend)

    # --- collectives ----------------------------------------------------------------------------------------

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        source_device = tensor.device
        local = tensor.detach().to(self.comm_device).contiguous()
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.comm_device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=self.comm_device))
        sizes = [int(s) for s in sizes]
        longest = max(sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(source_device)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        reduced = values.detach().to(self.comm_device, torch.float64).clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.cpu()

    def any(self, flag: bool) -> bool:
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64))[0] > 0)

    def barrier(self) -> None:
        if self.comm_device.type == "cuda":
            dist.barrier(device_ids=[self.comm_device.index])
        else:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        objects: list[Any] = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def mean(self, values: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        keys = sorted(values)
        local = torch.tensor([float(values[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64)
        total = self.sum(local)
        denominator = float(total[-1])
        if denominator == 0:
            return {k: 0.0 for k in keys}
        return {k: float(total[i]) / denominator for i, k in enumerate(keys)}

    def loss_normalizer(self, local_count: torch.Tensor | float) -> float:
        count = float(self.sum(torch.tensor([float(local_count)], dtype=torch.float64))[0])
        return max(count, 1.0) / self.world_size

    # --- models ---------------------------------------------------------------------------------------------

    def _broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank start from rank 0's parameters and buffers."""
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                if self.comm_device == tensor.device:
                    dist.broadcast(tensor.data, src=0)
                else:
                    buffer = tensor.data.to(self.comm_device)
                    dist.broadcast(buffer, src=0)
                    tensor.data.copy_(buffer)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self._root is not None:
            raise RuntimeError("wrap() was already called: one training forward per context")
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None \
                else None
            # DDP broadcasts rank 0's parameters at construction; buffers (rotary tables) are constants: no
            # per-forward buffer broadcast (that flag was renamed in recent torch)
            no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
                inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False}
            self._root = DistributedDataParallel(module, device_ids=device_ids,
                                                 find_unused_parameters=self.config.find_unused_parameters,
                                                 **no_buffer_sync)
            return self._root
        return self._fully_shard(module)

    def _fully_shard(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self._broadcast_module(module)
        mesh = init_device_mesh(self.comm_device.type, (self.world_size,))
        policy = getattr(module, "policy", module)
        block_names = set(getattr(policy, "_no_split_modules", None) or [])
        if not block_names:
            raise ValueError(f"{type(policy).__name__} names no transformer blocks (_no_split_modules): "
                             "FSDP2 needs units to shard")
        self._units = [m for m in policy.modules() if type(m).__name__ in block_names]
        if not self._units:
            raise ValueError(f"no module of {type(policy).__name__} is one of its _no_split_modules {block_names}")
        for unit in self._units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.config.reshard_after_forward)
        self._root = fully_shard(module, mesh=mesh, reshard_after_forward=self.config.reshard_after_forward)
        # FSDP2 makes the first module that runs forward its root. Rollouts call the policy's generate() (inside
        # the wrapper) before any training forward may have run -- e.g. right after a resume -- so initialize now,
        # with the training-forward wrapper as root (every unit is sharded at this point, as lazy init requires).
        self._root._get_fsdp_state()._lazy_init()
        return self._root

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        if self.strategy != "fsdp2" or self._root is None:
            yield
            return
        modules = [self._root, *self._units]
        for module in modules:
            module.unshard()
        for unit in self._units:
            unit.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for unit in self._units:
                unit.set_reshard_after_forward(self.config.reshard_after_forward)
            for module in modules:
                module.reshard()

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.strategy != "fsdp2":
            return super().frozen_copy(model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..patching import is_patched, patch_model

        # every rank gathers the full weights (collective) into a plain, unsharded replica
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        with torch.random.fork_rng(devices=[]):  # the throw-away initialization must not move the RNG streams
            reference = type(model)._from_config(model.config)
        reference.load_state_dict(full, strict=True)
        reference.to(self.device)
        reference.generation_config = copy.deepcopy(model.generation_config)
        if is_patched(model):
            patch_model(reference, model.__dict__["_vitos_state"].attention)
        return _freeze(reference)

    def model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        if self.strategy != "fsdp2":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        if self.strategy != "fsdp2":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self._root, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_loaders(self) -> dict[str, Any]:
        if self.strategy != "fsdp2":
            return {}
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        def load_model_state(model, tensors):
            result = set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
            return result.missing_keys, result.unexpected_keys

        def load_optimizer_state(optimizer, state):
            set_optimizer_state_dict(self._root, optimizer, state, options=StateDictOptions(full_state_dict=True))

        return {"load_model_state": load_model_state, "load_optimizer_state": load_optimizer_state}

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
