"""ViToS dual-stream GRPO trainer (reference implementation): SFT warm-up, grounding and token-sparse branches,
cross-feedback rewards, "stages" / "alternate" schedules, exact resume, held-out two-pass evaluation.

    from vitos_ext.trainer import DualStreamGRPOTrainer, TrainerConfig, prepare_training_data
    trainer = DualStreamGRPOTrainer(model, processor, prepare_training_data("train.json"), TrainerConfig(...))
    trainer.train()

The embedded CPU demo: ``vitos_ext.trainer.cli.run_preset("tiny-phantom")`` (``train_main(argv)`` parses a CLI).
"""

from .config import GroundingRewardWeights, SparseRewardWeights, TrainerConfig
from .data import DataOrder, TrainingData, TrainingExample, build_prompt_text, gold_completion, prepare_training_data
from .evaluate import EvalResult, evaluate_policy, format_eval_table
from .grpo import aggregate_token_loss, clipped_surrogate_loss, group_advantages, group_statistics, k3_kl
from .logprobs import SparseSelection, completion_logprobs
from .metrics import MetricsLogger, plot_curves, read_metrics
from .rollout import Rollouts, SamplingSettings, generate_completions, sparse_selection
from .scoring import NonFiniteError, RewardTerms, grounding_rewards, sparse_rewards
from .trainer import PHASE_LABELS, DualStreamGRPOTrainer

__all__ = [
    "DataOrder",
    "DualStreamGRPOTrainer",
    "EvalResult",
    "GroundingRewardWeights",
    "MetricsLogger",
    "NonFiniteError",
    "PHASE_LABELS",
    "RewardTerms",
    "Rollouts",
    "SamplingSettings",
    "SparseRewardWeights",
    "SparseSelection",
    "TrainerConfig",
    "TrainingData",
    "TrainingExample",
    "aggregate_token_loss",
    "build_prompt_text",
    "clipped_surrogate_loss",
    "completion_logprobs",
    "evaluate_policy",
    "format_eval_table",
    "generate_completions",
    "gold_completion",
    "group_advantages",
    "group_statistics",
    "grounding_rewards",
    "k3_kl",
    "plot_curves",
    "prepare_training_data",
    "read_metrics",
    "sparse_rewards",
    "sparse_selection",
]
