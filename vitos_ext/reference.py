"""Plain-PyTorch references of every vitos_ext op.

These follow the op semantics (README, "Ops") literally (per-image and per-row loops where that is clearer) and are the
ground truth the C++/CUDA/Triton kernels are tested against. They are also the "eager" baselines in the benchmarks.
"""

from __future__ import annotations

import math

import torch

from .ops.types import Compacted


def box_cells(box: torch.Tensor, rows: int, cols: int) -> tuple[int, int, int, int] | None:
    """Token-grid cells covered by one normalized box, or None when the box is invalid.

    box: float [4] = (x1, y1, x2, y2), any float dtype (rounded to float32 first). rows, cols: token grid H, W.
    Returns (r_lo, r_hi, c_lo, c_hi), inclusive.
    """
    box = box.to(torch.float32)
    if not bool(torch.isfinite(box).all()):
        return None
    x1, y1, x2, y2 = box.clamp(0.0, 1.0).tolist()
    if x2 < x1 or y2 < y1:
        return None

    def span(lo: float, hi: float, n: int) -> tuple[int, int]:
        # float32 products, as the kernels compute them
        first = min(max(math.floor(_f32(lo * n)), 0), n - 1)
        last = min(max(max(math.ceil(_f32(hi * n)) - 1, first), 0), n - 1)
        return first, last

    r_lo, r_hi = span(y1, y2, rows)
    c_lo, c_hi = span(x1, x2, cols)
    return r_lo, r_hi, c_lo, c_hi


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def region_to_patch_mask_reference(
    boxes: torch.Tensor,
    box_image: torch.Tensor,
    grid_thw: torch.Tensor,
    merge_size: int = 2,
    dilate: int = 0,
) -> torch.Tensor:
    """Reference of vitos_ext.region_to_patch_mask: one image at a time, one box at a time.

    boxes: float [N, 4] normalized (x1, y1, x2, y2); box_image: int64 [N]; grid_thw: int64 [I, 3] in patches.
    Returns bool [sum_i t_i * (h_i / m) * (w_i / m)] on grid_thw's device, in the VLM's token order.
    """
    masks = []
    for image, (t, h, w) in enumerate(grid_thw.tolist()):
        rows, cols = h // merge_size, w // merge_size
        grid = torch.zeros(rows, cols, dtype=torch.bool)
        cells = [box_cells(b, rows, cols) for b in boxes[box_image == image].cpu()]
        cells = [c for c in cells if c is not None]
        if not cells:
            grid[:] = True  # an image with no valid box keeps every token
        for r_lo, r_hi, c_lo, c_hi in cells:
            grid[r_lo : r_hi + 1, c_lo : c_hi + 1] = True
        if cells and dilate > 0:
            pooled = torch.nn.functional.max_pool2d(
                grid[None, None].float(), kernel_size=2 * dilate + 1, stride=1, padding=dilate
            )
            grid = pooled[0, 0] > 0
        masks.append(grid.flatten().repeat(t))
    if not masks:
        return torch.zeros(0, dtype=torch.bool, device=grid_thw.device)
    return torch.cat(masks).to(grid_thw.device)


def compact_tokens_reference(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor,
    fuse_into: torch.Tensor | None = None,
) -> Compacted:
    """Reference of vitos_ext.compact_tokens with eager boolean indexing (differentiable through autograd).

    hidden [T, D] any float dtype; keep bool [T]; cu_seqlens int32 [B + 1]; position_ids int64 [P, T];
    fuse_into int64 [T] or None. Returns Compacted (see vitos_ext.compact_tokens).
    """
    kept_index = keep.nonzero().flatten()
    out = hidden[kept_index]
    if fuse_into is not None:
        out = _fuse_reference(hidden, keep, fuse_into, kept_index)
    kept_before = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.long().cumsum(0)])
    new_cu = kept_before[cu_seqlens.long()].to(torch.int32)
    lengths = new_cu[1:] - new_cu[:-1]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return Compacted(out, position_ids[:, kept_index], new_cu, kept_index, max_seqlen)


def _fuse_reference(hidden, keep, fuse_into, kept_index):
    """Mean of each kept row with the dropped rows fused into it, summed in float32 (float64 for float64 input) in
    increasing source order."""
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out_row_of = torch.full((hidden.shape[0],), -1, dtype=torch.int64, device=hidden.device)
    out_row_of[kept_index] = torch.arange(kept_index.numel(), device=hidden.device)
    sources = ((~keep) & (fuse_into >= 0)).nonzero().flatten()
    targets = out_row_of[fuse_into[sources]]
    acc = hidden[kept_index].to(acc_dtype)
    # index_add_ on CPU adds sources one at a time in increasing order: the summation order the kernels use.
    acc = acc.cpu().index_add(0, targets.cpu(), hidden[sources].to(acc_dtype).cpu()).to(hidden.device)
    count = torch.ones(kept_index.numel(), dtype=acc_dtype, device=hidden.device)
    count.index_add_(0, targets, torch.ones_like(targets, dtype=acc_dtype))
    return (acc / count[:, None]).to(hidden.dtype)


# ---------------------------------------------------------------------------------------------------------------
# varlen_attention: loops over sequences, so memory stays O(max(lq * lk) * H) instead of O(Tq * Tk * H).
def _sequence_bounds(cu_seqlens: torch.Tensor, total: int, name: str) -> list[int]:
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if not bounds or bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the number of rows ({total}); "
                         f"got {bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    return bounds


def _attend_one_sequence(q, k, v, causal: bool, scale: float):
    """q [lq, Hq, D], k/v [lk, Hk, D] in the compute dtype -> out [lq, Hq, D], lse [Hq, lq]."""
    lq, num_heads_q, head_dim = q.shape
    lk, num_heads_k, _ = k.shape
    group = num_heads_q // num_heads_k
    if lk == 0:  # nothing to attend to: zero output, lse = +inf (FlashAttention's convention)
        return q.new_zeros(q.shape), q.new_full((num_heads_q, lq), math.inf)
    # GQA by broadcasting [Hk, G, lq, D] against [Hk, 1, lk, D]; K/V are not repeated
    qh = q.permute(1, 0, 2).reshape(num_heads_k, group, lq, head_dim)
    kh = k.permute(1, 0, 2).unsqueeze(1)
    vh = v.permute(1, 0, 2).unsqueeze(1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if causal:  # bottom-right aligned: query i sees keys j <= i + lk - lq
        rows = torch.arange(lq, device=q.device)[:, None]
        cols = torch.arange(lk, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + (lk - lq), -math.inf)
    # the max only stabilises exp(); detaching it leaves the value and the gradient unchanged
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    row_sum = probs.sum(dim=-1, keepdim=True)
    sees_keys = row_sum > 0
    out = torch.matmul(probs, vh) / torch.where(sees_keys, row_sum, torch.ones_like(row_sum))
    lse = torch.where(sees_keys, torch.log(row_sum.detach()) + row_max, torch.full_like(row_sum, math.inf))
    out = out.reshape(num_heads_q, lq, head_dim).permute(1, 0, 2)
    return out, lse.reshape(num_heads_q, lq)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    return_lse: bool = False,
):
    """Variable-length (GQA) attention in plain PyTorch, differentiable through autograd.

    Args:
        q: [Tq, Hq, D] packed queries (any floating dtype). k, v: [Tk, Hk, D], Hq % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: integer [B+1] cumulative sequence starts (first 0, last Tq / Tk).
        max_seqlen_q, max_seqlen_k: accepted for signature parity with the kernels (not needed here).
        causal: bottom-right aligned causal mask (query i of a sequence sees keys j <= i + lk - lq).
        softmax_scale: defaults to 1/sqrt(D).
        return_lse: also return the log-sum-exp float [Hq, Tq] (detached; +inf where a row sees no key).
    Returns:
        out [Tq, Hq, D] in q.dtype, computed in float32 (float64 if the inputs are float64). Rows that see no
        key (causal with lq > lk, or lk == 0) are 0; zero-length sequences are valid.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[2] != k.shape[2] or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "need k.shape == v.shape, equal head dims and Hq % Hk == 0")
    bounds_q = _sequence_bounds(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    bounds_k = _sequence_bounds(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(bounds_q) != len(bounds_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (B+1)")
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    outs, lses = [], []
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 == q0:
            continue
        out, lse = _attend_one_sequence(q[q0:q1].to(compute_dtype), k[k0:k1].to(compute_dtype),
                                        v[k0:k1].to(compute_dtype), causal, scale)
        outs.append(out)
        lses.append(lse)
    if outs:
        out = torch.cat(outs, dim=0).to(q.dtype)
        lse = torch.cat(lses, dim=1).float().detach()
    else:  # keep the graph connected so backward through an all-empty batch still works
        out = (q * 0).to(q.dtype)
        lse = q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    return (out, lse) if return_lse else out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm as Hugging Face's Llama / Qwen2 / Qwen2.5-VL modules compute it: float32 statistics, the normalized
    row rounded to x's dtype, then scaled by weight. x [..., N], weight [N] -> [..., N] (dtype of weight * x)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as the gated MLPs of Llama / Qwen2 / Qwen2.5-VL compute it (silu rounded to gate's dtype)."""
    return torch.nn.functional.silu(gate) * up


def rotary_embedding_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding over the two halves of the head dim, as Hugging Face applies it.

    q [S, Hq, D], k [S, Hk, D], cos/sin [S, D] -> (q * cos + rotate_half(q) * sin, same for k), each in its input
    dtype, where rotate_half(x) = [-x[..., D/2:], x[..., :D/2]]. precision "float32": float32 math rounded once
    (apply_rotary_pos_emb_vision); "input": the same ops in x's dtype with cos / sin cast to it, each rounding on its
    own (apply_rotary_pos_emb of the language models)."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        math_dtype = torch.float32 if precision == "float32" else x.dtype
        xm = x.to(math_dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-xm[..., half:], xm[..., :half]), dim=-1)
        return (xm * cos.unsqueeze(-2).to(math_dtype) + rotated * sin.unsqueeze(-2).to(math_dtype)).to(x.dtype)

    return rotate(q), rotate(k)
