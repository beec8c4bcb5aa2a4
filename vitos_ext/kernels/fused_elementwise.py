"""Fused Triton kernels for the memory-bound glue of a transformer layer: RMSNorm, SwiGLU and rotary embeddings.

Eager Hugging Face code runs each of these as 5-16 separate kernels, several of them on float32 copies of the
activations (Qwen2.5-VL's vision tower: ~1.6 GB of traffic per block at 5184 patches). One kernel each reads the
inputs once and writes the outputs once; the math stays in float32 with the same rounding points as the eager code
(the result is rounded to the input dtype where the eager code rounds it), so outputs match it to the last bit in
most elements and within one rounding step elsewhere.

Layouts (all kernels take explicit strides; the last dim must be contiguous):
    rms_norm:  x [R, N] -> out [R, N], rstd float32 [R] (saved for backward)
    swiglu:    gate, up [E] (flat, contiguous) -> silu(gate) * up [E]
    rotary:    x [S, H, D] with cos, sin [S, D]; out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
               (float32 math as the Qwen-VL vision helper, or each product rounded to x's dtype as the text helper)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitos_ext.kernels._launch import INTERPRET, traceable

__all__ = [
    "rms_norm_forward",
    "rms_norm_backward",
    "swiglu_forward",
    "swiglu_backward",
    "rotary_forward",
    "MAX_RMS_NORM_DIM",
]

# one program holds a whole row in registers; beyond this the row would spill (no model we patch comes close)
MAX_RMS_NORM_DIM = 65536
_SWIGLU_BLOCK = 1024


def _rows_per_program(num_rows: int) -> int:
    """Rows handled by one program of the RMSNorm kernels: enough programs to fill a GPU, few partial dW rows.
    A runtime argument, not a constexpr, so that new sequence lengths never trigger a recompilation."""
    if INTERPRET:
        return 4
    return max(1, min(32, triton.cdiv(num_rows, 1024)))


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm: out = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, num_rows, n_cols, stride_x, stride_out, eps, rows_per_program,
                         BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0) * rows_per_program
    for i in range(rows_per_program):
        row = first + i
        if row < num_rows:
            x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # rsqrtf, as torch.rsqrt on CUDA
            # the eager code rounds the normalized row to the input dtype before scaling by the weight
            normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty),
                     mask=col_ok)
            tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dout_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, num_rows, n_cols,
                         stride_dout, stride_x, stride_dx, rows_per_program, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    pid = tl.program_id(0)
    for i in range(rows_per_program):
        row = pid * rows_per_program + i
        if row < num_rows:
            x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + row.to(tl.int64) * stride_dout + cols, mask=col_ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            normed = x * rstd
            dw += dout * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
            dnormed = dout * w
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - normed * mean(g * normed))
            dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / n_cols))
            tl.store(dx_ptr + row.to(tl.int64) * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=col_ok)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _rms_block(n_cols: int) -> dict:
    block = triton.next_power_of_2(n_cols)
    return {"BLOCK_N": block, "num_warps": 1 if INTERPRET else min(16, max(1, block // 256))}


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, N] (last dim contiguous), weight [N] -> (out [R, N] out_dtype, rstd float32 [R])."""
    num_rows, n_cols = x.shape
    out = torch.empty((num_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return out, rstd
    rows = _rows_per_program(num_rows)
    traceable(_rms_norm_fwd_kernel)[(triton.cdiv(num_rows, rows),)](
        x, weight, out, rstd, num_rows, n_cols, x.stride(0), out.stride(0), eps, rows, **_rms_block(n_cols))
    return out, rstd


def rms_norm_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [R, N] x.dtype, dweight [N] weight.dtype); dweight is a fixed-order sum of per-program partials."""
    num_rows, n_cols = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_rows == 0:
        return dx, torch.zeros_like(weight)
    rows = _rows_per_program(num_rows)
    programs = triton.cdiv(num_rows, rows)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    traceable(_rms_norm_bwd_kernel)[(programs,)](
        dout, x, weight, rstd, dx, dw_partial, num_rows, n_cols, dout.stride(0), x.stride(0), dx.stride(0), rows,
        **_rms_block(n_cols))
    return dx, dw_partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    gate = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # eager: silu(gate) is rounded to gate's dtype, then multiplied by up
    act = (gate * tl.sigmoid(gate)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    act = gate * sig
    tl.store(dup_ptr + offs, (dout * act).to(dup_ptr.dtype.element_ty), mask=ok)
    tl.store(dgate_ptr + offs, (dout * up * sig * (1.0 + gate * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=ok)


def _swiglu_grid(numel: int):
    return (triton.cdiv(numel, _SWIGLU_BLOCK),)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """gate, up: contiguous, same shape -> silu(gate) * up (out_dtype, same shape)."""
    out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if gate.numel():
        traceable(_swiglu_fwd_kernel)[_swiglu_grid(gate.numel())](gate, up, out, gate.numel(), BLOCK=_SWIGLU_BLOCK)
    return out


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate gate.dtype, dup up.dtype) for contiguous dout, gate, up of one shape."""
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        traceable(_swiglu_bwd_kernel)[_swiglu_grid(gate.numel())](
            dout, gate, up, dgate, dup, gate.numel(), BLOCK=_SWIGLU_BLOCK)
    return dgate, dup


# ----------------------------------------------------------------------------------------------------------------
# rotary embedding over the two halves of the head dim (Qwen-VL vision / Llama convention)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, stride_xs, stride_xh, stride_cs, stride_ss,
                   stride_os, stride_oh, HALF: tl.constexpr, BACKWARD: tl.constexpr, ROUND_PRODUCTS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program: one token, all heads. Forward:  o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2.
    # Backward (transpose of that linear map):     g1 = d1 c1 + d2 s2,  g2 = d2 c2 - d1 s1.
    # ROUND_PRODUCTS rounds each product to x's dtype before the sum, as the text helper's separate eager ops in
    # that dtype do (and as their autograd does for the gradient), so results match those ops bit for bit on GPUs.
    s = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    ok = (heads < num_heads) & (dims < HALF)
    c1 = tl.load(cos_ptr + s * stride_cs + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + s * stride_cs + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + s * stride_ss + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + s * stride_ss + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    x_row = x_ptr + s * stride_xs + heads * stride_xh
    x1 = tl.load(x_row + dims, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + dims, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        a1, b1, a2, b2 = x1 * c1, x2 * s2, x2 * c2, -(x1 * s1)
    else:
        a1, b1, a2, b2 = x1 * c1, -(x2 * s1), x2 * c2, x1 * s2
    if ROUND_PRODUCTS:
        dtype = x_ptr.dtype.element_ty
        a1, b1 = a1.to(dtype).to(tl.float32), b1.to(dtype).to(tl.float32)
        a2, b2 = a2.to(dtype).to(tl.float32), b2.to(dtype).to(tl.float32)
    o1 = a1 + b1
    o2 = a2 + b2
    out_row = out_ptr + s * stride_os + heads * stride_oh
    tl.store(out_row + dims, o1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_row + HALF + dims, o2.to(out_ptr.dtype.element_ty), mask=ok)


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
                   round_products: bool = False) -> torch.Tensor:
    """x [S, H, D] (last dim contiguous), cos/sin [S, D] (last dim contiguous) -> contiguous [S, H, D], x.dtype.

    backward=True applies the transposed map (the gradient of the forward with respect to x); round_products=True
    rounds each product to x's dtype before the sum (eager ops in x's dtype) instead of one rounding at the end."""
    seq, heads, dim = x.shape
    out = torch.empty((seq, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = dim // 2
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    warps = 1 if INTERPRET else min(8, max(1, block_h * block_d // 256))
    # the half head dim is a compile-time constant (one variant per head dim): it lets the compiler prove 16-byte
    # vector loads for head dims such as 80, which runtime divisibility (by 16 only) would not
    traceable(_rotary_kernel)[(seq,)](
        x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0),
        out.stride(1), HALF=half, BACKWARD=bool(backward),
        ROUND_PRODUCTS=bool(round_products), BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)
    return out
