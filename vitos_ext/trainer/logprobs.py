"""The training forward: log-probabilities of completion tokens, with all visual tokens or with a sparse selection.

Full-token branch: one forward over the [B, Lp + C] prompt + completion batch.

Token-sparse branch ("padded" forward, the one implemented): the patched model's forward with ``vitos_keep``
(and ``vitos_fuse``) prunes the visual tokens once, after the image features are placed, and runs the language
model on the *compacted* left-padded batch [B, L', V] with the kept tokens' original M-RoPE positions -- exactly
the sequence the KV cache held during generation. With ``patch_model(model, attention="varlen")`` (the default
"auto" on CUDA) the language model's attention unpads it and runs varlen attention over the packed kept tokens, so
attention does no padding work; the MLPs still see the padded [B, L'] layout. ``model.vitos_last_prefill`` tells
which source token every compacted row came from, which is how completion tokens are located in the compacted
sequence (no assumption about padding). A fully packed [1, T'] language-model call with cu_seqlens needs the
model's M-RoPE position computation outside its forward, which the patch API does not expose yet.

Only the last C + 1 positions get logits (``logits_to_keep``): completions are the rightmost tokens in both layouts.
"""

from __future__ import annotations

import torch

from .batching import SequenceBatch

__all__ = ["completion_logprobs", "SparseSelection"]


class SparseSelection:
    """Which visual tokens a sparse forward keeps.

    Args:
        keep: bool [N_visual] over all visual tokens of the batch, in row (image) order.
        fuse: fuse dropped tokens into their nearest kept token (ViToS token fusion) instead of dropping them.
    """

    def __init__(self, keep: torch.Tensor, fuse: bool = False):
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 1:
            raise ValueError("keep must be a 1-D bool tensor over the batch's visual tokens")
        self.keep, self.fuse = keep, bool(fuse)

    def model_kwargs(self) -> dict:
        """The vitos_* keyword arguments of the patched forward()/generate()."""
        kwargs = {"vitos_keep": self.keep}
        if self.fuse:
            kwargs["vitos_fuse"] = True
        return kwargs


def _completion_columns(batch: SequenceBatch) -> torch.Tensor:
    """int64 [B, Lp + C]: the completion column of each token of the concatenated sequence, -1 elsewhere."""
    prompt_length = batch.prompt.input_ids.shape[1]
    width = batch.completion_ids.shape[1]
    columns = torch.arange(prompt_length + width) - prompt_length
    columns = columns.expand(batch.completion_ids.shape[0], -1).clone()
    columns[:, :prompt_length] = -1
    columns[:, prompt_length:] = columns[:, prompt_length:].masked_fill(batch.completion_mask == 0, -1)
    return columns


def _compacted_columns(columns: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
    """Carry the completion-column map into the compacted layout ([B, L'], -1 at padding and prompt tokens)."""
    flat = columns.flatten()
    gathered = flat[source_index.clamp_min(0).flatten()].view_as(source_index)
    return gathered.masked_fill(source_index < 0, -1)


def completion_logprobs(
    model: torch.nn.Module,
    batch: SequenceBatch,
    selection: SparseSelection | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities of the completion tokens under ``model``.

    Args:
        model: a patched (vitos_ext.patch_model) Qwen-VL style model when ``selection`` is given; any HF VLM
            otherwise.
        batch: prompts (left-padded) + completions (right-padded); tensors on the model's device.
        selection: visual tokens to keep (token-sparse branch), or None for all visual tokens.
        temperature: the sampling temperature; logits are divided by it so the probabilities are those the
            rollouts were sampled from (as TRL does).

    Returns:
        float32 [B, C], 0 where completion_mask is 0. Differentiable when grad is enabled.
    """
    inputs = batch.model_inputs()
    width = batch.completion_ids.shape[1]
    kwargs = dict(inputs, use_cache=False, logits_to_keep=width + 1)
    if selection is not None:
        kwargs.update(selection.model_kwargs())
    logits = model(**kwargs).logits  # [B, K, V], the last K positions of the (compacted) sequence
    columns = _completion_columns(batch).to(logits.device)
    if selection is not None:
        pruned = getattr(model, "vitos_last_prefill", None)
        if pruned is None:
            raise RuntimeError("the sparse forward did not prune: is the model patched with vitos_ext.patch_model?")
        columns = _compacted_columns(columns, pruned.source_index)
    kept = logits.shape[1]
    tail = columns[:, -kept:]  # completion column of each position that has logits
    targets = tail[:, 1:]  # logits at position k predict the token at k + 1
    valid = targets >= 0
    log_probs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    token_ids = batch.completion_ids.to(logits.device).gather(1, targets.clamp_min(0))
    picked = log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    result = torch.zeros(batch.completion_ids.shape, dtype=picked.dtype, device=picked.device)
    result = result.scatter_add(1, targets.clamp_min(0), picked.masked_fill(~valid, 0.0))
    return result * batch.completion_mask.to(result.device, result.dtype)
