"""vitos_ext.varlen_attention: packed ragged (GQA) attention with bottom-right causal masking.

Backends
    "auto"       the package's Triton FlashAttention kernel on CUDA (falls back to "torch" for what it does not
                 cover, e.g. head dims > 128); the plain-PyTorch reference on CPU and other devices.
    "triton"     the Triton kernel; also runs on CPU tensors when TRITON_INTERPRET=1 was set before import.
    "cuda"       a hand-written CUDA kernel: the package does not ship one (the Triton kernel is the GPU path), so
                 this raises NotImplementedError.
    "torch"      PyTorch's own kernels: torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16) when the installed
                 torch has it, otherwise scaled_dot_product_attention per sequence.
    "reference"  vitos_ext.reference.varlen_attention_reference (float32 math, autograd).

The Triton path is two torch.library ops, vitos::varlen_attention_fwd (returns out and the log-sum-exp) and
vitos::varlen_attention_bwd, registered with torch.library.triton_op so torch.compile traces into the kernels
(under TRITON_INTERPRET, where kernels cannot be traced, as custom_op + register_fake); register_autograd saves
the log-sum-exp, never the attention matrix.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from vitos_ext.ops._registration import (TRITON_DTYPES, define_triton_op, eager_fast_path, last_dim_contiguous,
                                         triton_runs_on, triton_unavailable_message)
from vitos_ext.profiling import nvtx_annotate
from vitos_ext.reference import varlen_attention_reference

try:
    from vitos_ext.kernels import flash_attn_varlen as _kernels
    from vitos_ext.kernels.flash_attn_varlen import flash_attn_varlen_backward, flash_attn_varlen_forward
except ImportError:  # triton is not installed: only the reference and torch backends exist
    _kernels = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # older torch without torch.nn.attention.varlen
    _torch_varlen_attn = None

__all__ = ["varlen_attention", "BACKENDS", "cu_seqlens_from_lengths", "triton_available"]

BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
_TORCH_VARLEN_PARAMS = (
    frozenset(inspect.signature(_torch_varlen_attn).parameters) if _torch_varlen_attn is not None else frozenset()
)
_INT32_MAX = 2**31 - 1


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Sequence lengths [B] (any integer dtype) -> the int32 offsets [B + 1] varlen_attention takes: 0, then their
    running sum."""
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def triton_available(device: torch.device | str) -> bool:
    """Whether backend="triton" can run on tensors of `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton_runs_on(_kernels, device)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("head_dim must be positive")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of key/value "
                         f"heads ({k.shape[1]}) (Hq % Hk == 0)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() == 0:
            raise ValueError(f"{name} must be 1-D with B+1 >= 1 entries, got shape {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have B+1 entries, got {cu_seqlens_q.numel()} "
                         f"and {cu_seqlens_k.numel()}")
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must share a device")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)):
            raise TypeError(f"{name} must be a Python int, got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"{name} must be >= 0, got {m}")


def _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k) -> None:
    """Value checks on cu_seqlens: one small device->host copy (a sync on CUDA, ~10 us); free on CPU tensors."""
    stats = []
    for cu in (cu_seqlens_q, cu_seqlens_k):
        lengths = cu[1:] - cu[:-1]
        if lengths.numel() == 0:
            lengths = cu.new_zeros(1)
        stats.append(torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]))
    (q_first, q_last, q_min, q_max), (k_first, k_last, k_min, k_max) = torch.stack(stats).tolist()
    for name, first, last, shortest, longest, total, max_seqlen, max_name in (
        ("cu_seqlens_q", q_first, q_last, q_min, q_max, total_q, max_seqlen_q, "max_seqlen_q"),
        ("cu_seqlens_k", k_first, k_last, k_min, k_max, total_k, max_seqlen_k, "max_seqlen_k"),
    ):
        if first != 0:
            raise ValueError(f"{name}[0] must be 0, got {first}")
        if shortest < 0:
            raise ValueError(f"{name} must be non-decreasing (monotone); it has a negative sequence length")
        if last != total:
            raise ValueError(f"{name}[-1] must equal the number of rows ({total}), got {last}")
        if longest > max_seqlen:
            raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} ({longest})")


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        raise NotImplementedError(
            "backend='cuda': vitos_ext ships no hand-written CUDA varlen attention kernel; the GPU path is the "
            "Triton FlashAttention kernel (backend='triton', which backend='auto' picks on CUDA)")
    if backend != "auto":
        return backend
    if q.device.type != "cuda":
        return "reference"
    if _kernels is not None and q.dtype in TRITON_DTYPES and _kernels.head_dim_is_supported(q.shape[2]):
        return "triton"
    return "torch"


def _check_triton_inputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k) -> None:
    if not triton_available(q.device):
        raise RuntimeError(triton_unavailable_message(_kernels, q.device))
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got {q.dtype}")
    if not _kernels.head_dim_is_supported(q.shape[2]):
        raise ValueError(f"backend='triton' supports head_dim 16..{_kernels.MAX_HEAD_DIM} in steps of 8 "
                         f"(64, 80, 96, 128, ...), got head_dim={q.shape[2]}")
    if max(max_seqlen_q, max_seqlen_k) > _kernels.MAX_SEQLEN:
        raise ValueError(f"backend='triton' handles sequences of up to {_kernels.MAX_SEQLEN} tokens, got "
                         f"max_seqlen_q={max_seqlen_q}, max_seqlen_k={max_seqlen_k}")
    # in-sequence offsets are 32-bit in the kernels
    row_elems = q.shape[1] * q.shape[2]
    if (max(max_seqlen_q, max_seqlen_k) + 256) * max(row_elems, k.shape[1] * k.shape[2]) > _INT32_MAX:
        raise ValueError("a single sequence is too long for the Triton kernel's 32-bit in-sequence offsets "
                         f"(max_seqlen={max(max_seqlen_q, max_seqlen_k)}, {row_elems} elements per token)")


# ----------------------------------------------------------------------------------------------------------
# the Triton ops
# ----------------------------------------------------------------------------------------------------------


def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
              softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _forward_kernels(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    """The Triton forward launch (the op's body, also called directly by the inference fast path)."""
    return flash_attn_varlen_forward(
        last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), cu_seqlens_q.contiguous(),
        cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k, causal, softmax_scale)


if _kernels is not None:

    @define_triton_op("vitos::varlen_attention_fwd", _fwd_fake, _kernels.INTERPRET)
    def _varlen_attention_fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton varlen attention forward: out [Tq, Hq, D] (q.dtype), lse float32 [Hq, Tq]."""
        return _forward_kernels(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                softmax_scale)

    @define_triton_op("vitos::varlen_attention_bwd", _bwd_fake, _kernels.INTERPRET)
    def _varlen_attention_bwd(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
        max_seqlen_k: int, causal: bool, softmax_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triton varlen attention backward: dq [Tq, Hq, D], dk/dv [Tk, Hk, D] from the saved out and lse."""
        return flash_attn_varlen_backward(
            last_dim_contiguous(dout), last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v),
            last_dim_contiguous(out), lse.contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
            max_seqlen_q, max_seqlen_k, causal, softmax_scale)

    def _setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = torch.ops.vitos.varlen_attention_bwd(
            grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, ctx.causal,
            ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None, None, None

    _varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# the torch backend
# ----------------------------------------------------------------------------------------------------------


def _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    """torch.nn.attention.varlen.varlen_attn with the keyword set of the installed torch (2.10 .. 2.14+)."""
    kwargs = {}
    if "scale" in _TORCH_VARLEN_PARAMS:
        kwargs["scale"] = scale
    else:  # torch 2.10 always uses 1/sqrt(D): fold the requested scale into q
        q = q * (scale * math.sqrt(q.shape[2]))
    if "window_size" in _TORCH_VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _TORCH_VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _torch_varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)


def _sdpa_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale):
    """scaled_dot_product_attention on each sequence (bottom-right causal, zero rows where nothing is visible)."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for b in range(len(bounds_q) - 1):
        lq, lk = bounds_q[b + 1] - bounds_q[b], bounds_k[b + 1] - bounds_k[b]
        if lq == 0:
            continue
        q_seq = q[bounds_q[b]:bounds_q[b + 1]]
        hidden_rows = max(lq - lk, 0) if causal else (lq if lk == 0 else 0)
        if hidden_rows:  # rows that see no key (causal with lq > lk, or lk == 0) are defined as 0
            outs.append(q_seq.new_zeros((hidden_rows, q.shape[1], q.shape[2])))
            q_seq, lq = q_seq[hidden_rows:], lq - hidden_rows
        if lq == 0:
            continue
        mask = None
        if causal and lq != lk:  # lq < lk here: bottom-right alignment needs an explicit mask
            rows = torch.arange(lq, device=q.device)[:, None]
            mask = torch.arange(lk, device=q.device)[None, :] <= rows + (lk - lq)
        out = F.scaled_dot_product_attention(
            q_seq.transpose(0, 1).unsqueeze(0), k[bounds_k[b]:bounds_k[b + 1]].transpose(0, 1).unsqueeze(0),
            v[bounds_k[b]:bounds_k[b + 1]].transpose(0, 1).unsqueeze(0), attn_mask=mask,
            is_causal=causal and mask is None, scale=scale, enable_gqa=gqa)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q * 0


def _torch_backend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    if (_torch_varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[2] % 8 == 0 and q.shape[2] <= 256):
        return _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    return _sdpa_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


@nvtx_annotate("vitos.varlen_attention")
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Attention over packed sequences of different lengths (FlashAttention's varlen layout), with GQA/MQA.

    Args:
        q: [Tq, Hq, D] queries of all sequences, packed along the token axis (no padding).
        k, v: [Tk, Hk, D] keys / values, Hq % Hk == 0 (K/V heads are shared by Hq/Hk query heads, not copied).
        cu_seqlens_q, cu_seqlens_k: int32 [B+1], cumulative lengths: sequence b owns query rows
            cu_seqlens_q[b]:cu_seqlens_q[b+1] and key rows cu_seqlens_k[b]:cu_seqlens_k[b+1]. Zero lengths are fine.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest query / key sequence (an upper bound is fine; it
            sizes the kernel grid, so a tight value launches fewer idle programs).
        causal: bottom-right aligned mask, query i sees keys j <= i + lk - lq (FlashAttention's convention), so the
            same call serves prefill (lq == lk) and decode / chunked prefill against a KV cache (lq < lk).
        softmax_scale: finite float, defaults to 1/sqrt(D).
        backend: "auto" | "triton" | "cuda" | "torch" | "reference" (see the module docstring).
        check_values: validate the cu_seqlens values (first 0, monotone, last == rows, max_seqlen large enough).
            That costs one tiny device->host copy (a sync on CUDA); it is skipped automatically under
            torch.compile. Pass False only for cu_seqlens you built yourself.
    Returns:
        out [Tq, Hq, D], dtype of q. Rows that see no key (lk == 0, or causal rows i < lq - lk) are 0; never NaN.
        Differentiable w.r.t. q, k, v on every backend (the Triton backend saves the log-sum-exp for backward).
    Dtypes: float32 everywhere; float16/bfloat16 on the "triton" and "torch" backends (and the reference).
    """
    _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if check_values and not torch.compiler.is_compiling():
        _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):  # every output row would be NaN
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    causal = bool(causal)
    resolved = _resolve_backend(backend, q)
    if resolved == "triton":
        _check_triton_inputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
        # inference: the kernels directly, no op dispatch per layer
        forward = _forward_kernels if eager_fast_path(q, k, v, cu_seqlens_q, cu_seqlens_k) else \
            torch.ops.vitos.varlen_attention_fwd
        out, _ = forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
        return out
    if resolved == "torch":
        return _torch_backend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
