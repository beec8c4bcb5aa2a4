"""pytest-benchmark microbenchmarks of varlen_attention on small CPU shapes (reference vs torch backend).

    python -m pytest benchmarks/test_bench_attention.py --benchmark-group-by=group
GPU numbers (Triton kernel, TFLOP/s) come from benchmarks/gpu_attention.py.
"""

from __future__ import annotations

import pytest
import torch

from vitos_ext.ops.attention import varlen_attention

SHAPES = {
    # name: (lengths, heads_q, heads_k, head_dim, causal)
    "lm_ragged_gqa": ([37, 64, 5, 0, 50], 8, 2, 64, True),
    "vision_windows": ([16] * 12, 4, 4, 80, False),
}


def _inputs(lengths, heads_q, heads_k, head_dim, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, heads_q, head_dim, generator=gen, requires_grad=requires_grad)
    k = torch.randn(total, heads_k, head_dim, generator=gen, requires_grad=requires_grad)
    v = torch.randn(total, heads_k, head_dim, generator=gen, requires_grad=requires_grad)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_forward(benchmark, shape, backend):
    lengths, heads_q, heads_k, head_dim, causal = SHAPES[shape]
    q, k, v, cu = _inputs(lengths, heads_q, heads_k, head_dim)
    benchmark.group = f"varlen_attention forward {shape}"
    out = benchmark(varlen_attention, q, k, v, cu, cu, max(lengths), max(lengths), causal, None, backend)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_forward_backward(benchmark, shape, backend):
    lengths, heads_q, heads_k, head_dim, causal = SHAPES[shape]
    q, k, v, cu = _inputs(lengths, heads_q, heads_k, head_dim, requires_grad=True)
    grad_out = torch.randn_like(q)

    def step():
        out = varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal, None, backend)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    benchmark.group = f"varlen_attention forward+backward {shape}"
    grads = benchmark(step)
    assert all(torch.isfinite(g).all() for g in grads)
