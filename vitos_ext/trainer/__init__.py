"""ViToS dual-stream GRPO trainer (reference implementation): SFT warm-up, grounding and token-sparse branches,
cross-feedback rewards, "stages" / "alternate" schedules, exact resume, held-out two-pass evaluation.

    from vitos_ext.trainer import DualStreamGRPOTrainer, TrainerConfig, prepare_training_data
    trainer = DualStreamGRPOTrainer(model, processor, prepare_training_data("train.json"), TrainerConfig(...))
    trainer.train()

The embedded CPU demo: ``vitos_ext.trainer.cli.run_preset("tiny-phantom")`` (``train_main(argv)`` parses a CLI).

Data-parallel (DDP or FSDP2) under torchrun, picked up from the environment (see vitos_ext/trainer/distributed.py):
    torchrun --nproc_per_node 2 -m vitos_ext.cli train --model DIR --train-file train.json --output-dir runs/x
    DualStreamGRPOTrainer(..., distributed=DistributedConfig(strategy="fsdp2"))
"""

from .config import GroundingRewardWeights, SparseRewardWeights, TrainerConfig
from .data import (
    DataOrder,
    TrainingData,
    TrainingExample,
    build_prompt_text,
    gold_completion,
    jitter_boxes,
    prepare_training_data,
)
from .distributed import DataParallel, DistributedConfig, setup_distributed
from .evaluate import EvalResult, evaluate_policy, format_eval_table
from .grpo import (
    aggregate_token_loss,
    clipped_surrogate_loss,
    group_advantages,
    group_statistics,
    informative_groups,
    k3_kl,
)
from .logprobs import (
    FORWARD_LAYOUTS,
    SparseSelection,
    TrainingForward,
    completion_logprobs,
    packed_forward_support,
    resolve_forward_layout,
)
from .metrics import MetricsLogger, plot_curves, read_metrics
from .rollout import (
    Rollouts,
    RowSeededSampler,
    SamplingSettings,
    concat_rollouts,
    generate_completions,
    rollout_row_seeds,
    sparse_selection,
)
from .scoring import NonFiniteError, RewardTerms, grounding_rewards, sparse_rewards
from .trainer import PHASE_LABELS, DualStreamGRPOTrainer

__all__ = [
    "FORWARD_LAYOUTS",
    "DataOrder",
    "DataParallel",
    "DistributedConfig",
    "DualStreamGRPOTrainer",
    "EvalResult",
    "GroundingRewardWeights",
    "MetricsLogger",
    "NonFiniteError",
    "PHASE_LABELS",
    "RewardTerms",
    "Rollouts",
    "RowSeededSampler",
    "SamplingSettings",
    "SparseRewardWeights",
    "SparseSelection",
    "TrainerConfig",
    "TrainingData",
    "TrainingForward",
    "TrainingExample",
    "aggregate_token_loss",
    "build_prompt_text",
    "clipped_surrogate_loss",
    "completion_logprobs",
    "concat_rollouts",
    "evaluate_policy",
    "format_eval_table",
    "generate_completions",
    "gold_completion",
    "group_advantages",
    "group_statistics",
    "grounding_rewards",
    "informative_groups",
    "jitter_boxes",
    "k3_kl",
    "packed_forward_support",
    "plot_curves",
    "prepare_training_data",
    "read_metrics",
    "resolve_forward_layout",
    "rollout_row_seeds",
    "setup_distributed",
    "sparse_rewards",
    "sparse_selection",
]
