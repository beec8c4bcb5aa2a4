"""Hugging Face transformers attention backend "vitos_varlen" backed by vitos_ext.varlen_attention.

    import vitos_ext
    vitos_ext.register_hf_attention()
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="vitos_varlen")

What the attention function handles (the cases FlashAttention-2 handles in transformers):
- padded batches: the registered mask function hands over the 2-D padding mask (or None when nothing is padded);
  queries/keys are unpadded, attended as packed sequences and padded back (padding rows come back as 0);
- packed batches: `cu_seq_lens_q/k` + `max_length_q/k` kwargs (e.g. from DataCollatorWithFlattening or a vision
  tower), or 2-D position ids that restart (a new sequence starts wherever position != previous + 1);
- decode / chunked prefill against a KV cache: lq < lk with bottom-right causal alignment.
- preallocated caches (StaticCache): the mask function builds transformers' 4-D SDPA mask over the slots and the
  attention runs SDPA (as attn_implementation="sdpa"), without a host read.
Custom 4-D masks fall back to transformers' SDPA function. Dropout, sliding windows, logit soft-capping and
attention sinks are not supported and raise.

Model-agnostic on purpose: one varlen call per *layer* for Qwen2.5-VL's windowed vision attention needs the
vision attention module to pass its cu_seqlens (transformers only does that for names containing "flash"); that
patch belongs in vitos_ext/models/.
"""

from __future__ import annotations

import functools
import logging

import torch

from vitos_ext._tensor_memo import TensorMemo, begin_forward
from vitos_ext.ops.attention import BACKENDS, cu_seqlens_from_lengths, varlen_attention
from vitos_ext.profiling import nvtx_annotate

__all__ = ["HF_ATTENTION_NAME", "register_hf_attention", "vitos_varlen_attention_forward", "vitos_varlen_mask"]

HF_ATTENTION_NAME = "vitos_varlen"
_settings = {"backend": "auto"}
logger = logging.getLogger(__name__)


def register_hf_attention(backend: str = "auto", name: str = HF_ATTENTION_NAME) -> str:
    """Register `name` (default "vitos_varlen") in transformers' AttentionInterface and AttentionMaskInterface.

    Idempotent: registering again just re-installs the same functions (and updates `backend`, one of
    vitos_ext.ops.attention.BACKENDS, used by every model that runs with this attention). Returns `name`, for
    `attn_implementation=` (or `model.set_attn_implementation(name)`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _settings["backend"] = backend
    AttentionInterface.register(name, vitos_varlen_attention_forward)
    AttentionMaskInterface.register(name, vitos_varlen_mask)
    return name


def vitos_varlen_mask(*args, attention_mask: torch.Tensor | None = None, kv_length: int | None = None,
                      q_length: int | None = None, q_offset: int | torch.Tensor | None = None, **kwargs):
    """Mask function for AttentionMaskInterface: the 2-D boolean padding mask [B, kv_length], or None if there
    is no padding (causality is applied inside the kernel, bottom-right aligned, so no 4-D mask is built).

    A preallocated cache (StaticCache) hands the attention all its slots, most of them not written yet: then the
    mask is transformers' own 4-D SDPA mask over the slots (built on the device, no host read, so compiled decoding
    stays one graph), and the attention runs SDPA with it, as attn_implementation="sdpa" would.
    """
    begin_forward()  # once per forward, before the layers: memo entries on inference tensors expire here
    if _has_unwritten_slots(kv_length, q_length, q_offset):
        from transformers.masking_utils import sdpa_mask

        kwargs.pop("allow_is_causal_skip", None)  # None would mean "no mask": the empty slots must be masked
        return sdpa_mask(*args, attention_mask=attention_mask, kv_length=kv_length, q_length=q_length,
                         q_offset=q_offset, allow_is_causal_skip=False, **kwargs)
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask
    if kv_length is not None:
        attention_mask = attention_mask[:, -kv_length:]
    attention_mask = attention_mask.bool()
    if (kv_length is None or attention_mask.shape[1] == kv_length) and bool(attention_mask.all()):
        return None
    return attention_mask


def _has_unwritten_slots(kv_length: int | None, q_length: int | None, q_offset: int | torch.Tensor | None) -> bool:
    """Whether the keys include cache slots past the tokens seen so far (q_offset + q_length < kv_length). A
    StaticCache reports its offset as a tensor (to stay graph-friendly): that alone says it is preallocated."""
    if isinstance(q_offset, torch.Tensor):
        return True
    return None not in (kv_length, q_length, q_offset) and q_offset + q_length < kv_length


# ----------------------------------------------------------------------------------------------------------
# unpad / pack helpers
# ----------------------------------------------------------------------------------------------------------


# one memo per derived value (see vitos_ext/_tensor_memo.py): computed at the first layer of a forward, reused by
# the others
_unpad_plans = TensorMemo()
_packing_plans = TensorMemo()
_validated_packings = TensorMemo()
_max_lengths = TensorMemo()


def _host_max_lengths(max_q: int | torch.Tensor, max_k: int | torch.Tensor) -> tuple[int, int]:
    """max_length_q/k as Python ints. Collators may hand them over as (device) tensors, and int() of one is a host
    sync: memoized per tensor object, so it happens once per forward, not once per layer."""
    tensors = [x for x in (max_q, max_k) if isinstance(x, torch.Tensor)]
    if not tensors:
        return int(max_q), int(max_k)
    return _max_lengths.get(tensors, None, lambda: (int(max_q), int(max_k)))


def _unpad_plan(attention_mask: torch.Tensor, len_q: int, len_k: int):
    """(indices_q [Nq], cu_q int32 [B+1], indices_k [Nk], cu_k int32 [B+1], coords_q, coords_k) for
    `attention_mask` [B, >=len_k]; coords are the (batch, position) pairs of the flat indices. Finding the kept rows
    needs a device->host sync (nonzero): memoized per mask object."""

    def compute():
        mask_k = attention_mask[:, -len_k:].bool()
        mask_q = attention_mask[:, -len_q:].bool()
        nonzero_k = mask_k.nonzero()
        nonzero_q = nonzero_k if len_q == len_k else mask_q.nonzero()
        indices_k = nonzero_k[:, 0] * len_k + nonzero_k[:, 1]
        indices_q = indices_k if len_q == len_k else nonzero_q[:, 0] * len_q + nonzero_q[:, 1]
        return (indices_q, cu_seqlens_from_lengths(mask_q.sum(dim=1)),
                indices_k, cu_seqlens_from_lengths(mask_k.sum(dim=1)),
                nonzero_q.unbind(1), nonzero_k.unbind(1))

    return _unpad_plans.get((attention_mask,), (len_q, len_k), compute)


def _gather_rows(x: torch.Tensor, indices: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rows `indices` of x [B, L, H, D] flattened to [B*L, H, D], in one gather. K/V read back from a KV cache are
    [B, H, L, D] storage seen as [B, L, H, D]: flattening them would copy the whole cache before the gather, so they
    are indexed by (batch, position) instead."""
    if x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1):
        return x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return x[coords]


def _packing_plan(position_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """:func:`_packed_cu_seqlens`, memoized per position_ids object (it reads the positions on the host)."""
    if position_ids is None or position_ids.dim() != 2 or length <= 1:
        return None
    return _packing_plans.get((position_ids,), (batch, length),
                              lambda: _packed_cu_seqlens(position_ids, batch, length))


def _packed_cu_seqlens(position_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """cu_seqlens of sequences packed along each row (positions restarting), or None when nothing is packed.

    Same rule as transformers' find_packed_sequence_indices: a new sequence starts where position != previous + 1.
    Reads the positions on the host (one small sync), as FlashAttention-2's integration does.
    """
    if position_ids is None or position_ids.dim() != 2 or length <= 1:
        return None
    position_ids = position_ids.expand(batch, -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    start_rows = starts.reshape(-1).nonzero().squeeze(1).to(torch.int32)
    return torch.cat([start_rows, start_rows.new_tensor([batch * length])])


@functools.lru_cache(maxsize=256)
def _equal_length_cu_seqlens(batch: int, len_q: int, len_k: int, device: torch.device):
    """int32 offsets of B equal-length rows, built once per shape instead of three kernel launches per layer (every
    decode step of every layer asks for the same few). Read-only: never modified in place."""
    row_starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return row_starts * len_q, row_starts * len_k


def _capturing(t: torch.Tensor) -> bool:
    """Inside CUDA-graph capture nothing is cached across calls (it would live in the graph's private pool)."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _as_int32(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)


def _reject_unsupported(module, dropout, sliding_window, softcap, kwargs) -> None:
    if dropout and dropout > 0.0:
        raise NotImplementedError(f"{HF_ATTENTION_NAME} attention does not implement attention dropout "
                                  f"(got dropout={dropout}); set the model's attention_dropout to 0")
    if sliding_window is not None:
        raise NotImplementedError(f"{HF_ATTENTION_NAME} attention does not implement sliding-window attention "
                                  f"(layer {getattr(module, 'layer_idx', '?')} asks for window {sliding_window})")
    if softcap is not None:
        raise NotImplementedError(f"{HF_ATTENTION_NAME} attention does not implement logit soft-capping")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{HF_ATTENTION_NAME} attention does not implement attention sinks (s_aux)")
    if kwargs.get("output_attentions"):  # like transformers' sdpa / flash backends: say so instead of a silent []
        _warn_no_attention_weights()


@functools.cache
def _warn_no_attention_weights() -> None:
    logger.warning(f"{HF_ATTENTION_NAME} attention does not return attention weights (output_attentions=True "
                   "gives none); load the model with attn_implementation='eager' to get them")


# ----------------------------------------------------------------------------------------------------------
# the attention function
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype inside torch.autocast (as SDPA there: a rotary table in float32
    promotes q and k to float32 while v stays in the autocast dtype), else the query's."""
    device = query.device.type
    if query.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


@nvtx_annotate("vitos.hf_attention")
def vitos_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, Lq, D], key/value [B, Hk, Lk, D] -> ([B, Lq, Hq, D], None).

    attention_mask: None, or the bool [B, Lk] padding mask from vitos_varlen_mask (a 4-D mask falls back to SDPA).
    kwargs may carry cu_seq_lens_q/k + max_length_q/k (packed rows) or position_ids [B, L] (packed if restarting).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    _reject_unsupported(module, dropout, sliding_window, softcap, kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    batch, _, len_q, _ = query.shape
    len_k = key.shape[2]
    dtype = _compute_dtype(query)
    # [B, L, H, D], FlashAttention's layout; a no-op .to() is still a dispatcher round trip, three times per layer
    q, k, v = (x.transpose(1, 2) if x.dtype == dtype else x.transpose(1, 2).to(dtype) for x in (query, key, value))
    call = dict(causal=causal, softmax_scale=scaling, backend=_settings["backend"])

    if attention_mask is not None:  # padded batch: unpad -> varlen -> pad back
        indices_q, cu_q, indices_k, cu_k, coords_q, coords_k = _unpad_plan(attention_mask, len_q, len_k)
        k_rows = _gather_rows(k, indices_k, coords_k)
        v_rows = _gather_rows(v, indices_k, coords_k)
        q_rows = _gather_rows(q, indices_q, coords_q)
        out_rows = varlen_attention(q_rows, k_rows, v_rows, cu_q, cu_k, len_q, len_k, check_values=False, **call)
        out = out_rows.new_zeros((batch * len_q, *out_rows.shape[1:])).index_put((indices_q,), out_rows)
        return out.view(batch, len_q, *out.shape[1:]), None

    q_rows = q.reshape(-1, *q.shape[2:])
    k_rows = k.reshape(-1, *k.shape[2:])
    v_rows = v.reshape(-1, *v.shape[2:])
    packed = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in packed):  # caller-provided packing: validated once per forward
        # keyed on the caller's tensors: int64 offsets are converted (and checked) once per forward, not per layer
        max_q, max_k = _host_max_lengths(packed[2], packed[3])
        checked, converted = _validated_packings.lookup((packed[0], packed[1]), (max_q, max_k))
        cu_q, cu_k = converted if checked else (_as_int32(packed[0]), _as_int32(packed[1]))
        out = varlen_attention(q_rows, k_rows, v_rows, cu_q, cu_k, max_q, max_k, check_values=not checked, **call)
        _validated_packings.store((packed[0], packed[1]), (max_q, max_k), (cu_q, cu_k))  # reached only if valid
        return out.view(batch, len_q, *out.shape[1:]), None

    cu = _packing_plan(kwargs.get("position_ids"), batch, len_q) if len_q == len_k else None
    if cu is not None:  # sequences packed along rows, found from restarting positions
        out = varlen_attention(q_rows, k_rows, v_rows, cu, cu, len_q, len_k, check_values=False, **call)
    else:  # B equal-length rows; lq < lk is decode / chunked prefill against a cache
        make = _equal_length_cu_seqlens.__wrapped__ if _capturing(query) else _equal_length_cu_seqlens
        cu_q, cu_k = make(batch, len_q, len_k, query.device)
        out = varlen_attention(q_rows, k_rows, v_rows, cu_q, cu_k, len_q, len_k, check_values=False, **call)
    return out.view(batch, len_q, *out.shape[1:]), None
