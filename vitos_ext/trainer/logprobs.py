"""The training forward: log-probabilities of completion tokens, with all visual tokens or with a sparse selection.

Two layouts compute the same numbers (tested to fp32 round-off, gradients included):

``"packed"`` (the default on GPU: Qwen2-VL / Qwen2.5-VL, see :func:`packed_forward_support`)
    The verl "remove padding" layout, plus token sparsity. Every row's valid tokens (prompt with its kept visual
    tokens, then the completion) are packed into ONE sequence [1, T'] with ``cu_seqlens``; padding never enters any
    layer. Steps: M-RoPE positions of the unpruned rows from the model's own ``get_rope_index`` (what its forward
    would compute), :func:`vitos_ext.integrations.prune_packed_batch` (one vision-tower pass, image features placed,
    visual tokens outside the selection dropped or fused, original positions *gathered*), the language model called
    with ``cu_seq_lens_q/k`` + ``max_length_q/k`` and attention "vitos_varlen" (vitos_ext.varlen_attention: the
    Triton kernel on CUDA, the reference on CPU), then the LM head applied ONLY to the rows that predict a completion
    token (no [B, L, V] logits for prompt rows), and the log-probs scattered back to [B, C].

``"padded"`` (the fallback)
    The patched model's forward on the left-padded [B, Lp + C] batch. With a selection (``vitos_keep`` /
    ``vitos_fuse``) it prunes once after the image features are placed and runs the language model on the
    *compacted*, re-padded batch [B, L', D] with the kept tokens' original positions -- exactly what the KV cache
    held during generation. MLPs (and, unless the model is patched with attention="varlen", attention) see padding.
    ``model.vitos_last_prefill`` says which source token every compacted row came from, which is how completion
    tokens are located. Only the last C + 1 positions get logits (``logits_to_keep``).

``"auto"`` picks "packed" when :func:`packed_forward_support` finds nothing in the way AND the varlen attention will
run a fast kernel: the model is on CUDA (the Triton kernel), or its language model already runs a varlen-capable
attention (``patch_model(model, attention="varlen")``, FlashAttention). On CPU the varlen backend is the plain-PyTorch
reference, which is slower than the padded batch's eager attention: at the tiny-phantom preset's shapes the packed
forward + backward takes 1.0-1.2x the padded time with it (1.5x *faster* with the "torch" backend, SDPA per sequence,
``vitos_ext.register_hf_attention(backend="torch")``); "auto" then keeps the padded layout and "packed" forces it.

In both layouts the logits at the last kept token before a completion token predict it; text tokens are never
dropped, so that is the previous token of the same row (the prompt's last token for the first completion token).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..profiling import nvtx_range
from .batching import SequenceBatch
from .config import FORWARD_LAYOUTS, MIXED_PRECISIONS

__all__ = [
    "FORWARD_LAYOUTS",
    "SparseSelection",
    "TrainingForward",
    "completion_logprobs",
    "packed_forward_support",
    "resolve_forward_layout",
]

logger = logging.getLogger("vitos_ext.trainer")

# model families whose packed forward is implemented (Qwen3-VL adds DeepStack features inside its language model,
# which prune_packed_batch does not carry; LLaVA has no M-RoPE positions to gather -- neither is a trainer model)
_PACKED_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
_VARLEN_CAPABLE = ("vitos_varlen",)  # attention implementations that read cu_seq_lens (besides any "flash*")


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


# ----------------------------------------------------------------------------------------------------------------
# layout selection


def _language_model_of(model: torch.nn.Module):
    from ..models import adapter_for
    from ..patching import inner_model

    model = inner_model(model)  # a PEFT policy: its adapters live inside the wrapped model's modules
    adapter = adapter_for(model)
    return adapter, adapter.language_model(model)


def _routes_varlen(implementation: str | None) -> bool:
    implementation = str(implementation or "")
    return implementation in _VARLEN_CAPABLE or "flash" in implementation


def packed_forward_support(model: torch.nn.Module) -> str | None:
    """Why the packed training forward cannot run on ``model`` (a sentence), or None when it can.

    It needs: a Qwen2-VL / Qwen2.5-VL model (M-RoPE positions computed outside the forward, no DeepStack), the
    "vitos_varlen" attention backend (vitos_ext.hf_attention), no attention dropout while training (the varlen
    kernels implement none), and -- when gradient checkpointing is on -- a language model that already runs a
    varlen-capable attention (the packed forward switches attention only for the duration of its own call, and a
    checkpointed layer re-runs its forward later, during backward).
    """
    try:
        adapter, language_model = _language_model_of(model)
    except TypeError as error:
        return str(error)
    if adapter.name not in _PACKED_FAMILIES:
        return f"the packed forward supports {', '.join(_PACKED_FAMILIES)} models, not {adapter.name}"
    try:
        from .. import hf_attention  # noqa: F401
    except ImportError as error:  # pragma: no cover - part of the package
        return f"vitos_ext.hf_attention is unavailable ({error})"
    config = language_model.config
    if model.training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return f"attention_dropout={config.attention_dropout} (varlen attention implements no dropout)"
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in language_model.modules())
    if checkpointing and not _routes_varlen(getattr(config, "_attn_implementation", None)):
        return ("gradient checkpointing is on and the language model's attention is "
                f"{config._attn_implementation!r}: load or patch it with a varlen attention "
                "(patch_model(model, attention='varlen')) to train packed")
    return None


def _fast_varlen(model: torch.nn.Module) -> bool:
    """Whether the packed forward's attention runs a fast kernel: a CUDA model (vitos_ext's Triton kernel, or torch's
    varlen attention), or a language model already routed to a varlen-capable implementation."""
    _, language_model = _language_model_of(model)
    if _routes_varlen(getattr(language_model.config, "_attn_implementation", None)):
        return True
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.device.type == "cuda"


_FALLBACK_REPORTED: set[str] = set()


def resolve_forward_layout(model: torch.nn.Module, layout: str = "auto") -> str:
    """The layout a training forward on ``model`` uses: "packed" or "padded".

    Args:
        layout: "auto" (packed when :func:`packed_forward_support` allows it and the attention kernel is a fast one,
            see the module docstring; padded otherwise, the reason logged once), "packed" (raises ValueError with the
            reason when it cannot run) or "padded".
    """
    if layout not in FORWARD_LAYOUTS:
        raise ValueError(f"layout must be one of {FORWARD_LAYOUTS}, got {layout!r}")
    if layout == "padded":
        return "padded"
    reason = packed_forward_support(model)
    if reason is None:
        if layout == "packed" or _fast_varlen(model):
            return "packed"
        reason = ("no fast varlen attention kernel for CPU tensors (the reference backend is slower than the padded "
                  "forward there); forward_layout='packed' forces the packed layout")
    elif layout == "packed":
        raise ValueError(f"layout='packed' cannot run: {reason}")
    if reason not in _FALLBACK_REPORTED:
        _FALLBACK_REPORTED.add(reason)
        logger.info("training forward falls back to the padded layout: %s", reason)
    return "padded"


# ----------------------------------------------------------------------------------------------------------------
# padded layout


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


def _padded_completion_logprobs(model, batch: SequenceBatch, selection: SparseSelection | None,
                                temperature: float) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------------------------
# packed layout


def _attention_configs(model: torch.nn.Module, adapter, language_model) -> list:
    """Every config object whose attention implementation drives the language model's attention layers."""
    configs = {id(c): c for c in adapter.language_model_configs(model)}
    for module in language_model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def _varlen_attention(model: torch.nn.Module, adapter, language_model):
    """Run the language model's attention through "vitos_varlen" for the duration of the block (no-op when it
    already runs a varlen-capable implementation, e.g. after patch_model(model, attention="varlen"))."""
    if _routes_varlen(getattr(language_model.config, "_attn_implementation", None)):
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..hf_attention import HF_ATTENTION_NAME, register_hf_attention

    if HF_ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        register_hf_attention()  # re-registering would reset a backend the user chose: only when missing
    backup = [(config, config._attn_implementation_internal)
              for config in _attention_configs(model, adapter, language_model)]
    for config, _ in backup:
        config._attn_implementation_internal = HF_ATTENTION_NAME
    try:
        yield
    finally:
        for config, previous in reversed(backup):
            config._attn_implementation_internal = previous


def _packed_completion_logprobs(model, batch: SequenceBatch, selection: SparseSelection | None,
                                temperature: float) -> torch.Tensor:
    from ..integrations.packed import prune_packed_batch
    from ..patching import inner_model

    # the wrapped model of a PEFT policy runs its LoRA layers itself (PEFT injects them into its modules)
    model = inner_model(model)
    adapter, language_model = _language_model_of(model)
    inputs = batch.model_inputs()
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    prompt_length, width = batch.prompt.input_ids.shape[1], batch.completion_ids.shape[1]
    length = input_ids.shape[1]
    with nvtx_range("vitos.trainer.packed.positions"):
        # the M-RoPE positions the model's own forward computes for this padded batch (valid tokens only)
        rope, _ = adapter.base_model(model).get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=attention_mask)
    keep = fuse = None
    if selection is not None:
        keep, fuse = selection.keep, (True if selection.fuse else None)
    pruned = prune_packed_batch(input_ids, rope, inputs["image_grid_thw"], attention_mask=attention_mask,
                                model=model, pixel_values=inputs["pixel_values"], vitos_keep=keep, vitos_fuse=fuse)
    with nvtx_range("vitos.trainer.packed.language_model"), _varlen_attention(model, adapter, language_model):
        hidden = language_model(**pruned.language_model_kwargs()).last_hidden_state[0]  # [T', D]
    with nvtx_range("vitos.trainer.packed.head"):
        source = pruned.source_index  # flat index into [B, Lp + C] of every packed row
        column = source % length - prompt_length  # completion column, < 0 for prompt tokens
        targets = (column >= 0).nonzero().squeeze(1)  # packed rows holding a completion token (padding is gone)
        rows, columns = source[targets] // length, column[targets]
        # the previous packed row predicts each completion token: the same sequence, since every row's prompt ends
        # with text tokens, which are never dropped
        logits = model.get_output_embeddings()(hidden.index_select(0, targets - 1))  # [N_completion, V]
        log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
        token_ids = batch.completion_ids.to(logits.device)[rows, columns]
        picked = log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        result = picked.new_zeros((batch.completion_ids.shape[0], width)).index_put((rows, columns), picked)
    return result * batch.completion_mask.to(result.device, result.dtype)


# ----------------------------------------------------------------------------------------------------------------
# entry points


def completion_logprobs(
    model: torch.nn.Module,
    batch: SequenceBatch,
    selection: SparseSelection | None = None,
    temperature: float = 1.0,
    layout: str = "auto",
) -> torch.Tensor:
    """Log-probabilities of the completion tokens under ``model``.

    Args:
        model: a patched (vitos_ext.patch_model) Qwen-VL style model when ``selection`` is given in the padded
            layout; any supported HF VLM otherwise.
        batch: prompts (left-padded) + completions (right-padded); tensors on the model's device.
        selection: visual tokens to keep (token-sparse branch), or None for all visual tokens.
        temperature: the sampling temperature; logits are divided by it so the probabilities are those the
            rollouts were sampled from (as TRL does).
        layout: "auto", "packed" or "padded" (see the module docstring and :func:`resolve_forward_layout`).

    Returns:
        float32 [B, C], 0 where completion_mask is 0. Differentiable when grad is enabled.
    """
    with nvtx_range("vitos.trainer.logprobs"):
        if resolve_forward_layout(model, layout) == "packed":
            return _packed_completion_logprobs(model, batch, selection, temperature)
        return _padded_completion_logprobs(model, batch, selection, temperature)


def mixed_precision_dtype(setting: str, model: torch.nn.Module) -> torch.dtype | None:
    """The autocast dtype of the policy's forwards for ``TrainerConfig.mixed_precision``, or None (no autocast).

    "bf16" -> torch.bfloat16 on any device; "no" -> None; "auto" -> torch.bfloat16 when the model's floating-point
    weights are float32 on a CUDA device with bfloat16 support (float32 master weights, bf16 matmuls and attention),
    else None (CPU runs, and weights already in a low-precision dtype, stay as they are).
    """
    if setting not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {setting!r}")
    if setting != "auto":
        return torch.bfloat16 if setting == "bf16" else None
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None or weight.device.type != "cuda" or weight.dtype != torch.float32:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on ``device`` with ``dtype``, or a no-op context when dtype is None. Wraps forwards only: the
    backward of a loss runs outside it (autocast's backward ops follow the forward's dtypes by themselves)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class TrainingForward(torch.nn.Module):
    """The policy's training forward as a module: ``forward(batch, selection, temperature) -> log-probs [B, C]``.

    A data-parallel wrapper (DistributedDataParallel, or FSDP2's root) needs one module whose ``forward`` is *the*
    training computation; the packed layout calls the policy's vision tower, language model and LM head directly,
    which a wrapper around the policy's own ``forward`` would never see. The policy is a registered submodule, so the
    wrapper's parameters are the policy's.

    Args:
        policy: the (patched) policy model.
        layout: "auto", "packed" or "padded" (:func:`completion_logprobs`).
        autocast_dtype: the forward runs under torch.autocast with this dtype (:func:`mixed_precision_dtype`); None:
            in the weights' dtype.
    """

    def __init__(self, policy: torch.nn.Module, layout: str = "auto", autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if layout not in FORWARD_LAYOUTS:
            raise ValueError(f"layout must be one of {FORWARD_LAYOUTS}, got {layout!r}")
        self.policy = policy
        self.layout = layout
        self.autocast_dtype = autocast_dtype

    def forward(self, batch: SequenceBatch, selection: SparseSelection | None = None,
                temperature: float = 1.0) -> torch.Tensor:
        with autocast_context(batch.completion_ids.device, self.autocast_dtype):
            return completion_logprobs(self.policy, batch, selection, temperature, self.layout)
