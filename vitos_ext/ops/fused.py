"""Fused RMSNorm, SwiGLU and rotary embedding: one Triton kernel each instead of Hugging Face's 5-16 eager ops.

Backends: "auto" (the Triton kernels on CUDA, the plain-PyTorch references elsewhere), "triton" (CUDA, or CPU
tensors under TRITON_INTERPRET=1), "reference" (vitos_ext.reference, autograd through PyTorch ops).

The Triton path is a set of torch.library ops (vitos::rms_norm_fwd / _bwd, vitos::swiglu_fwd / _bwd,
vitos::rotary_embedding) registered like the attention ops: triton_op on GPUs so torch.compile traces into the
kernels, an opaque custom_op with a fake under the interpreter; register_autograd gives every op its backward.
Numerics follow the eager code they replace: float32 math with its rounding points (for the language models' rotary
helper, whose ops run in the input dtype, each product is rounded to it: rotary_embedding(precision="input")).
"""

from __future__ import annotations

import torch

from vitos_ext.ops._registration import (TRITON_DTYPES, define_triton_op, eager_fast_path, last_dim_contiguous,
                                         triton_runs_on, triton_unavailable_message)
from vitos_ext.reference import rms_norm_reference, rotary_embedding_reference, swiglu_reference

try:
    from vitos_ext.kernels import fused_elementwise as _kernels
except ImportError:  # triton is not installed: only the references exist
    _kernels = None

__all__ = ["FUSED_BACKENDS", "ROTARY_PRECISIONS", "fused_kernels_available", "rms_norm", "rotary_embedding", "swiglu"]

FUSED_BACKENDS = ("auto", "triton", "reference")
ROTARY_PRECISIONS = ("float32", "input")


def fused_kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton_runs_on(_kernels, device)


def _use_triton(backend: str, op: str, tensors: dict[str, torch.Tensor]) -> bool:
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {FUSED_BACKENDS}, got {backend!r}")
    first = next(iter(tensors.values()))
    if backend == "reference" or (backend == "auto" and first.device.type != "cuda"):
        return False
    if not fused_kernels_available(first.device):
        if backend == "auto":
            return False
        raise RuntimeError(f"{op}: {triton_unavailable_message(_kernels, first.device)}")
    unsupported = [f"{name} {t.dtype}" for name, t in tensors.items() if t.dtype not in TRITON_DTYPES]
    if unsupported:
        if backend == "auto":
            return False
        raise TypeError(f"{op}: backend='triton' supports float16, bfloat16 and float32, got {', '.join(unsupported)}")
    return True


def _check_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_same_device(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} is on {reference.device}")


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------


# the kernel launches: each op's body, also called directly by the inference fast path


def _rms_norm_kernels(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels.rms_norm_forward(last_dim_contiguous(x), weight.contiguous(), eps,
                                     torch.promote_types(x.dtype, weight.dtype))


def _swiglu_kernels(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _kernels.swiglu_forward(gate.contiguous(), up.contiguous(), gate.dtype)


def _rotary_kernels(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
                    round_products: bool) -> torch.Tensor:
    return _kernels.rotary_forward(last_dim_contiguous(x), last_dim_contiguous(cos), last_dim_contiguous(sin),
                                   backward, round_products)


def _rms_fwd_fake(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((x.shape[0],), dtype=torch.float32))


def _rms_bwd_fake(dout, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape)


def _swiglu_bwd_fake(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _rotary_fake(x, cos, sin, backward, round_products):
    return x.new_empty(x.shape)


if _kernels is not None:

    @define_triton_op("vitos::rms_norm_fwd", _rms_fwd_fake, _kernels.INTERPRET)
    def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, N], weight [N] -> (out [R, N] in promote(x, weight) dtype, rstd float32 [R])."""
        return _rms_norm_kernels(x, weight, eps)

    @define_triton_op("vitos::rms_norm_bwd", _rms_bwd_fake, _kernels.INTERPRET)
    def _rms_norm_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx [R, N] x.dtype, dweight [N] weight.dtype)."""
        return _kernels.rms_norm_backward(last_dim_contiguous(dout), last_dim_contiguous(x), weight.contiguous(),
                                          rstd.contiguous())

    def _rms_setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    def _rms_backward(ctx, grad_out, grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = torch.ops.vitos.rms_norm_bwd(grad_out, x, weight, rstd)
        return dx, dweight, None

    _rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup_context)

    @define_triton_op("vitos::swiglu_fwd", _swiglu_fwd_fake, _kernels.INTERPRET)
    def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate, up of one shape and dtype."""
        return _swiglu_kernels(gate, up)

    @define_triton_op("vitos::swiglu_bwd", _swiglu_bwd_fake, _kernels.INTERPRET)
    def _swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dgate, dup)."""
        return _kernels.swiglu_backward(dout.contiguous(), gate.contiguous(), up.contiguous())

    def _swiglu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _swiglu_backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        return torch.ops.vitos.swiglu_bwd(grad_out, gate, up)

    _swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)

    @define_triton_op("vitos::rotary_embedding", _rotary_fake, _kernels.INTERPRET)
    def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
                round_products: bool) -> torch.Tensor:
        """x [S, H, D], cos/sin [S, D] -> rotated contiguous [S, H, D] (the transposed map if backward; each
        product rounded to x's dtype before the sum if round_products)."""
        return _rotary_kernels(x, cos, sin, backward, round_products)

    def _rotary_setup_context(ctx, inputs, output):
        _, cos, sin, backward, round_products = inputs
        ctx.save_for_backward(cos, sin)
        ctx.backward, ctx.round_products = backward, round_products

    def _rotary_backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        grad = torch.ops.vitos.rotary_embedding(grad_out, cos, sin, not ctx.backward, ctx.round_products)
        return grad, None, None, None, None

    _rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of the last dim, as Llama / Qwen2 / Qwen2.5-VL compute it, in one kernel.

    Args:
        x: [..., N] float16 / bfloat16 / float32 activations.
        weight: [N] scale (any float dtype; the output has dtype promote(x.dtype, weight.dtype), like the eager
            ``weight * normed.to(x.dtype)``).
        eps: added to the mean square before the reciprocal square root.
        backend: "auto" | "triton" | "reference".

    Returns:
        [..., N]. Differentiable w.r.t. x and weight (the Triton backward saves only the float32 rstd per row;
        the weight gradient is a fixed-order sum, so results are deterministic).
    """
    op = "rms_norm"
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight)
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape [N] with N = x.shape[-1]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    _check_same_device(op, "x", x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a float >= 0, got {eps!r}")
    if not _use_triton(backend, op, {"x": x, "weight": weight}):
        return rms_norm_reference(x, weight, eps)
    if x.shape[-1] > _kernels.MAX_RMS_NORM_DIM:
        raise ValueError(f"{op}: backend='triton' handles rows of up to {_kernels.MAX_RMS_NORM_DIM} elements, got "
                         f"{x.shape[-1]}")
    forward = _rms_norm_kernels if eager_fast_path(x, weight) else torch.ops.vitos.rms_norm_fwd
    out, _ = forward(x.reshape(-1, x.shape[-1]), weight, float(eps))
    return out.view(x.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up (the gated MLP's activation) in one kernel.

    Args:
        gate, up: same shape, same float16 / bfloat16 / float32 dtype, e.g. [tokens, intermediate].
        backend: "auto" | "triton" | "reference".

    Returns:
        Tensor of gate's shape and dtype; differentiable w.r.t. gate and up.
    """
    op = "swiglu"
    _check_tensor(op, "gate", gate)
    _check_tensor(op, "up", up)
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate and up must have the same shape, got gate {tuple(gate.shape)}, up "
                         f"{tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate and up must share a dtype, got gate {gate.dtype}, up {up.dtype}")
    _check_same_device(op, "gate", gate, up=up)
    if not _use_triton(backend, op, {"gate": gate, "up": up}):
        return swiglu_reference(gate, up)
    forward = _swiglu_kernels if eager_fast_path(gate, up) else torch.ops.vitos.swiglu_fwd
    return forward(gate, up)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     backend: str = "auto", *, precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding over the two halves of the head dim, one kernel per tensor.

    Computes x * cos + rotate_half(x) * sin with rotate_half(x) = [-x[..., D/2:], x[..., :D/2]], for x = q and k.

    Args:
        q: [S, Hq, D] queries, k: [S, Hk, D] keys (strided views such as the unbound qkv projection are fine as
            long as the last dim is contiguous); D even.
        cos, sin: [S, D] (any float dtype; read as float32). Not differentiated: gradients flow to q and k only, so
            cos / sin that require grad use the reference backend.
        backend: "auto" | "triton" | "reference".
        precision: where the math rounds. "float32": float32 math, one rounding to x's dtype at the end (Hugging
            Face's apply_rotary_pos_emb_vision, Qwen-VL vision towers). "input": each product rounded to x's dtype
            before the sum, as the eager ops of apply_rotary_pos_emb (language models: Llama, Qwen2, Qwen-VL text)
            compute it when x, cos and sin share a low-precision dtype; cos / sin should already be in x's dtype.

    Returns:
        (q_rotated, k_rotated), contiguous, dtypes of q and k.
    """
    op = "rotary_embedding"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_tensor(op, name, t)
    if precision not in ROTARY_PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {ROTARY_PRECISIONS}, got {precision!r}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    seq, _, dim = q.shape
    if k.shape[0] != seq or k.shape[2] != dim:
        raise ValueError(f"{op}: k must have q's token count and head_dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if dim % 2:
        raise ValueError(f"{op}: head_dim must be even, got {dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (seq, dim):
            raise ValueError(f"{op}: {name} must have shape [tokens, head_dim] = [{seq}, {dim}], got {tuple(t.shape)}")
    _check_same_device(op, "q", q, k=k, cos=cos, sin=sin)
    tables_need_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if tables_need_grad or not _use_triton(backend, op, {"q": q, "k": k, "cos": cos, "sin": sin}):
        return rotary_embedding_reference(q, k, cos, sin, precision=precision)
    forward = _rotary_kernels if eager_fast_path(q, k, cos, sin) else torch.ops.vitos.rotary_embedding
    round_products = precision == "input"
    return forward(q, cos, sin, False, round_products), forward(k, cos, sin, False, round_products)
