"""Adapters between vitos_ext and RL frameworks.

* verl-style packed (remove-padding) batches: :func:`prune_packed_batch` (no extra dependency).
* TRL: reward functions with GRPOTrainer's signature and :class:`ViToSGRPOTrainer`, a GRPOTrainer whose rollouts
  and training forward see only the visual tokens inside per-sample evidence boxes (``vitos_ext.integrations.trl``,
  imported on first use because it needs ``trl``).
"""

from __future__ import annotations

from .packed import PackedPrunedBatch, packed_inputs_embeds, prune_packed_batch

__all__ = [
    "PackedPrunedBatch",
    "TRL_REWARD_FUNCS",
    "ViToSGRPOTrainer",
    "packed_inputs_embeds",
    "prune_packed_batch",
    "trl_accuracy_reward",
    "trl_format_reward",
    "trl_iou_reward",
]

_TRL_NAMES = {"TRL_REWARD_FUNCS", "ViToSGRPOTrainer", "trl_accuracy_reward", "trl_format_reward", "trl_iou_reward"}


def __getattr__(name: str):
    if name in _TRL_NAMES:  # keep `import vitos_ext.integrations` free of the trl import (and its start-up cost)
        from . import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
