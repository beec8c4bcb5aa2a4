"""GPU benchmark of the core ops at the DESIGN.md anchor shapes, and of the fused RMSNorm / SwiGLU / rotary kernels at
Qwen2.5-VL-7B shapes: fused kernels vs the eager references.

    python3 benchmarks/gpu_ops.py          (needs a CUDA device and the CUDA build of vitos_ext)

Prints the device ceilings, then a markdown table with the median time (CUDA events after warm-up), the achieved
bandwidth (fewest bytes: inputs read once, outputs written once) and its share of the measured copy ceiling.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vitos_ext  # noqa: E402
from anchors import MASK_TOKENS, compaction_batch, compaction_bytes, mask_batch  # noqa: E402
from timing import (  # noqa: E402
    copy_ceiling_gbs,
    cuda_graph_median_ms,
    cuda_median_ms,
    markdown_table,
    matmul_ceiling_tflops,
)
from vitos_ext.reference import (  # noqa: E402
    compact_tokens_reference,
    region_to_patch_mask_reference,
    rms_norm_reference,
    rotary_embedding_reference,
    swiglu_reference,
)

# Qwen2.5-VL-7B: vision tower on one 1008 px image (5184 patches, hidden 1280, MLP 3420, 16 heads x 80) and the
# language model on the 77% prompt (1062 tokens, hidden 3584, MLP 18944)
VISION_ROWS, VISION_HIDDEN, VISION_MLP, VISION_HEADS, VISION_HEAD_DIM = 5184, 1280, 3420, 16, 80
TEXT_ROWS, TEXT_HIDDEN, TEXT_MLP = 1062, 3584, 18944
TEXT_HEADS, TEXT_KV_HEADS, TEXT_HEAD_DIM = 28, 4, 128


def mask_rows():
    boxes, box_image, grid = mask_batch("cuda")
    expected = region_to_patch_mask_reference(boxes, box_image, grid, 2, 1)
    fused = lambda: vitos_ext.region_to_patch_mask(boxes, box_image, grid, 2, 1, num_tokens=MASK_TOKENS)  # noqa: E731
    synced = lambda: vitos_ext.region_to_patch_mask(boxes, box_image, grid, 2, 1)  # noqa: E731
    eager = lambda: region_to_patch_mask_reference(boxes, box_image, grid, 2, 1)  # noqa: E731
    assert torch.equal(fused(), expected) and torch.equal(synced(), expected)
    rows = []
    for name, fn in [("fused, num_tokens given (no sync)", fused), ("fused, size read back", synced),
                     ("eager per-image loop", eager)]:
        rows.append(["region_to_patch_mask 8 img / 10640 tok", name, f"{cuda_median_ms(fn) * 1e3:.1f} us", "-", "-"])
    # the span above includes the host's launch path (Python wrapper, dispatcher, C++ checks, launch); a graph
    # replay shows the device time alone
    rows.append(["region_to_patch_mask 8 img / 10640 tok", "fused, no sync, CUDA-graph replay (device time)",
                 f"{cuda_graph_median_ms(fused) * 1e3:.1f} us", "-", "-"])
    return rows


def compaction_rows(ceiling_gbs):
    rows = []
    for fuse in (False, True):
        hidden, keep, cu, positions, fuse_into = compaction_batch("cuda", fuse=fuse)
        args = (hidden, keep, cu, positions, fuse_into)
        num_bytes = compaction_bytes(hidden, keep, fuse_into)
        expected = compact_tokens_reference(*args)
        got = vitos_ext.compact_tokens(*args)
        assert torch.equal(got.hidden, expected.hidden) and torch.equal(got.position_ids, expected.position_ids)
        kept = expected.hidden.shape[0]
        variants = [
            ("fused (one size read-back)", lambda: vitos_ext.compact_tokens(*args)),
            ("fused, out_capacity (no sync)", lambda: vitos_ext.compact_tokens(*args, out_capacity=kept)),
            ("eager boolean indexing", lambda: compact_tokens_reference(*args)),
        ]
        label = f"compact_tokens 16410->12645 x3584 bf16{' + fusion' if fuse else ''}"
        floor_ms = num_bytes / ceiling_gbs / 1e6
        variants.append(("fused, out_capacity, CUDA-graph replay (device time)",
                         lambda: vitos_ext.compact_tokens(*args, out_capacity=kept)))
        for name, fn in variants:
            ms = cuda_graph_median_ms(fn) if "graph" in name else cuda_median_ms(fn)
            gbs = num_bytes / ms / 1e6
            rows.append([label, name, f"{ms:.3f} ms (floor {floor_ms:.3f})", f"{gbs:.0f} GB/s",
                         f"{100 * gbs / ceiling_gbs:.0f}%"])
    return rows


def _forward_backward(fn, inputs, grads):
    """A callable running fn forward and backward (inputs require grad; grads match fn's outputs)."""
    def run():
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.autograd.grad(outputs, inputs, grads)  # returned, not accumulated into .grad
    return run


def _fused_cases():
    """(label, fused fn, eager fn, inputs, forward bytes, forward+backward bytes): fewest bytes, bf16 = 2 B."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    cases = []
    for rows, hidden, where in ((VISION_ROWS, VISION_HIDDEN, "vision"), (TEXT_ROWS, TEXT_HIDDEN, "LM")):
        x, weight = torch.randn(rows, hidden, **bf16), torch.randn(hidden, **bf16)
        # forward: read x, write out; backward: read dout and x, write dx (weight and rstd are negligible)
        cases.append((f"rms_norm {where} [{rows}, {hidden}]", vitos_ext.rms_norm, rms_norm_reference, (x, weight),
                      2 * rows * hidden * 2, 5 * rows * hidden * 2))
    for rows, width, where in ((VISION_ROWS, VISION_MLP, "vision"), (TEXT_ROWS, TEXT_MLP, "LM")):
        gate, up = torch.randn(rows, width, **bf16), torch.randn(rows, width, **bf16)
        # forward: read gate and up, write out; backward: read dout, gate, up, write dgate, dup
        cases.append((f"swiglu {where} [{rows}, {width}]", vitos_ext.swiglu, swiglu_reference, (gate, up),
                      3 * rows * width * 2, 8 * rows * width * 2))
    qkv = torch.randn(VISION_ROWS, 3, VISION_HEADS, VISION_HEAD_DIM, **bf16)
    angles = torch.randn(VISION_ROWS, VISION_HEAD_DIM // 2, device="cuda") * 10
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    elems = VISION_ROWS * VISION_HEADS * VISION_HEAD_DIM
    tables = 2 * VISION_ROWS * VISION_HEAD_DIM * 4
    # q and k: read + write each, cos/sin float32 read once per pass
    cases.append((f"rotary q,k [{VISION_ROWS}, {VISION_HEADS}, {VISION_HEAD_DIM}] (qkv views)",
                  lambda q, k: vitos_ext.rotary_embedding(q, k, cos, sin),
                  lambda q, k: rotary_embedding_reference(q, k, cos, sin), (qkv[:, 0], qkv[:, 1]),
                  4 * elems * 2 + tables, 8 * elems * 2 + 2 * tables))
    cases.append(_text_rotary_case(bf16))
    return cases


def _text_rotary_case(bf16):
    """The language model's rotary (every layer of the 77% prefill): transformers' apply_rotary_pos_emb on the
    transposed [1, H, L, D] projections with bf16 tables vs the fused op patch_model binds in its place."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vitos_ext.models.fused_layers import _fused_text_rotary

    rows, dim = TEXT_ROWS, TEXT_HEAD_DIM
    q = torch.randn(1, rows, TEXT_HEADS, dim, **bf16).transpose(1, 2)
    k = torch.randn(1, rows, TEXT_KV_HEADS, dim, **bf16).transpose(1, 2)
    angles = torch.randn(1, rows, dim // 2, device="cuda") * 10
    cos, sin = (f(torch.cat([angles, angles], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    elems = rows * (TEXT_HEADS + TEXT_KV_HEADS) * dim
    tables = 2 * rows * dim * 2
    return (f"rotary LM q,k [{rows}, {TEXT_HEADS}+{TEXT_KV_HEADS}, {dim}] (apply_rotary_pos_emb)",
            lambda q, k: _fused_text_rotary(q, k, cos, sin), lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
            (q, k), 2 * elems * 2 + tables, 4 * elems * 2 + 2 * tables)


def fused_rows(ceiling_gbs):
    rows = []
    for label, fused, eager, inputs, fwd_bytes, fwd_bwd_bytes in _fused_cases():
        got, want = fused(*inputs), eager(*inputs)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grads = tuple(torch.randn_like(t) for t in (want if isinstance(want, tuple) else (want,)))
        for name, fn, num_bytes in [
            ("fused forward", lambda f=fused: f(*inputs), fwd_bytes),
            ("eager forward", lambda e=eager: e(*inputs), fwd_bytes),
            ("fused forward + backward", _forward_backward(fused, leaves, grads), fwd_bwd_bytes),
            ("eager forward + backward", _forward_backward(eager, leaves, grads), fwd_bwd_bytes),
        ]:
            ms = cuda_median_ms(fn)
            floor_ms = num_bytes / ceiling_gbs / 1e6
            gbs = num_bytes / ms / 1e6
            rows.append([label, name, f"{ms * 1e3:.1f} us (floor {floor_ms * 1e3:.1f})", f"{gbs:.0f} GB/s",
                         f"{100 * gbs / ceiling_gbs:.0f}%"])
    return rows


def main():
    if not torch.cuda.is_available() or not vitos_ext.has_cuda_kernels():
        sys.exit("needs a CUDA device and vitos_ext built with its CUDA kernels")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ceiling = copy_ceiling_gbs()
    print(f"copy ceiling: {ceiling:.0f} GB/s (read + write); bf16 matmul: {matmul_ceiling_tflops():.0f} TFLOP/s")
    rows = mask_rows() + compaction_rows(ceiling) + fused_rows(ceiling)
    print(markdown_table(["op / shape", "implementation", "median time", "bandwidth", "of copy ceiling"], rows))


if __name__ == "__main__":
    main()
