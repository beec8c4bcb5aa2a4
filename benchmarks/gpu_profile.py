"""Where the end-to-end time goes: torch.profiler over the patched stages of benchmarks/gpu_e2e.py.

    python3 benchmarks/gpu_profile.py            # one CUDA GPU, bf16, Qwen2.5-VL-7B shapes, random weights (~1 min)
    python3 benchmarks/gpu_profile.py --tiny     # scaled-down config on CPU: exercises the script

gpu_e2e.py says how long each stage takes; this says why. For the patched vision tower, the 77% prefill and the
two-pass prefill it runs each stage a few times under torch.profiler and prints, per stage:
  - wall ms per call, device-busy ms per call (the sum of kernel times) and their ratio: a stage whose kernels keep
    the GPU busy for only part of its wall time is host-bound (launch overhead, syncs, Python), and faster kernels
    will not help it; and the kernel launches per call (what fusing kernels reduces);
  - the kernels (or, on CPU, the operators) with the most self time, with their share and call counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_e2e  # noqa: E402


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_self_us(event: Any, on_cuda: bool) -> float:
    if not on_cuda:
        return event.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def profile_stage(fn: Callable[[], Any], device: torch.device, calls: int, top: int) -> dict[str, Any]:
    """Profile `calls` calls of fn() after one warm-up call.

    Returns:
        {"wall_ms": per-call wall time, "busy_ms": per-call summed self time of the device kernels (CPU operators on
        a CPU run), "launches": device kernels / copies / memsets (CPU: operator calls) per call, "top": [(name,
        per-call ms, share of busy time, calls per call)] of the `top` heaviest}.
    """
    on_cuda = device.type == "cuda"
    with torch.no_grad():
        fn()
        _synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _synchronize(device)
            wall_ms = (time.perf_counter() - start) * 1e3 / calls
    events = prof.key_averages()
    if on_cuda:  # kernels, copies and memsets: the events that ran on the device
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and _device_self_us(e, True) > 0]
    else:  # operators: leave out the wrappers whose time is all in their children
        events = [e for e in events if e.self_cpu_time_total > 0]
    busy_us = sum(_device_self_us(e, on_cuda) for e in events)
    events.sort(key=lambda e: _device_self_us(e, on_cuda), reverse=True)
    top_rows = [(e.key, _device_self_us(e, on_cuda) / 1e3 / calls, _device_self_us(e, on_cuda) / max(busy_us, 1e-9),
                 e.count / calls) for e in events[:top]]
    launches = sum(e.count for e in events) / calls
    return {"wall_ms": wall_ms, "busy_ms": busy_us / 1e3 / calls, "launches": launches, "top": top_rows}


def stages(work: Any, features: Any, middle: float) -> dict[str, Callable[[], Any]]:
    """The patched stages of gpu_e2e.py (the model must be patched)."""
    from vitos_ext import encode_images

    prompt, keep = work.prompt, work.keeps[middle]
    model = work.model

    def encode():
        return encode_images(model, prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])

    def prefill(keep_mask=None):
        extra = {} if keep_mask is None else {"vitos_keep": keep_mask}
        return model(**gpu_e2e.text_inputs(prompt), vitos_image_features=features, logits_to_keep=1, **extra)

    def two_pass():
        feats = encode()
        model(**gpu_e2e.text_inputs(prompt), vitos_image_features=feats, logits_to_keep=1)
        model(**gpu_e2e.text_inputs(prompt), vitos_image_features=feats, vitos_keep=keep, logits_to_keep=1)

    return {"vision tower": encode, f"LM prefill, {100 * middle:.0f}% kept": lambda: prefill(keep),
            "two-pass prefill": two_pass}


def report(name: str, result: dict[str, Any], device: torch.device) -> str:
    """One stage's profile_stage result as a Markdown heading (wall vs busy time) and table (heaviest rows)."""
    what = "kernel" if device.type == "cuda" else "operator"
    busy = result["busy_ms"] / max(result["wall_ms"], 1e-9)
    lines = [f"\n### {name}: {result['wall_ms']:.2f} ms wall per call, {result['busy_ms']:.2f} ms "
             f"{'device-busy' if device.type == 'cuda' else 'in operators'} ({100 * busy:.0f}%), "
             f"{result['launches']:.0f} {'launches' if device.type == 'cuda' else 'operator calls'} per call",
             f"| {what} | ms per call | share | calls per call |", "|---|---|---|---|"]
    for key, ms, share, count in result["top"]:
        lines.append(f"| {key[:90]} | {ms:.3f} | {100 * share:.1f}% | {count:g} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = gpu_e2e.workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per stage (after one warm-up)")
    parser.add_argument("--top", type=int, default=12, help="rows per stage")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.calls < 1 or args.top < 1:
        print("--calls and --top must be >= 1", file=sys.stderr)
        return 2
    target = gpu_e2e.workload_target(args, "gpu_profile.py")
    if target is None:
        return 2
    shapes, device, dtype = target
    from vitos_ext import encode_images, patch_model

    print(gpu_e2e._environment(device, dtype, shapes), flush=True)
    work = gpu_e2e.build_workload(shapes, device, dtype)
    patch_model(work.model, attention="varlen")
    with torch.no_grad():
        features = encode_images(work.model, work.prompt["pixel_values"],
                                 image_grid_thw=work.prompt["image_grid_thw"])
    middle = shapes.kept_ratios[len(shapes.kept_ratios) // 2]
    patched = stages(work, features, middle)
    for name, fn in patched.items():
        print(report(name, profile_stage(fn, device, args.calls, args.top), device), flush=True)
    with gpu_e2e.fused_layers_off(work.model):  # the same tower with eager norms / MLPs / rotary: launches saved
        print(report("vision tower, fused_layers='off'", profile_stage(patched["vision tower"], device, args.calls,
                                                                       args.top), device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
