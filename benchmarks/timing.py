"""GPU timing helpers for the benchmark scripts: medians of CUDA events after warm-up, and the two ceilings."""

from __future__ import annotations

import statistics

import torch


def cuda_median_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median wall time of fn() in ms on the GPU timeline (CUDA events around each call, after warm-up).

    Host syncs inside fn (e.g. a read-back of an output size) are part of the measured span, as in real use.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def cuda_graph_median_ms(fn, calls: int = 20, reps: int = 20) -> float:
    """Median device time of one fn() call without host launch overhead: `calls` calls captured in one CUDA graph,
    replays timed with events, divided by `calls`. Only for sync-free fn (no read-back inside)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_median_ms(graph.replay, warmup=3, reps=reps) / calls


def copy_ceiling_gbs(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * num_bytes / ms / 1e6


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """bf16 n x n x n matrix-product rate in TFLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_median_ms(lambda: a @ b, warmup=3, reps=10)
    return 2 * n**3 / ms / 1e9


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
