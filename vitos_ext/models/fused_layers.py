"""Fused RMSNorm / gated-MLP forwards for the Hugging Face modules that compute them the Llama way.

patch_model installs these on the instances (vision tower and language model alike) when its ``fused_layers`` mode
asks for them; each forward decides per call whether the Triton kernels run (see :func:`fused_active`) and otherwise
calls the module's own forward, so outputs never depend on a kernel that cannot run on the input's device.

Only classes whose forward was checked to compute exactly the formula of the fused op are listed:
    RMSNorm:   weight * (x.float() * rsqrt(mean(x.float()^2) + variance_epsilon)).to(x.dtype)
    gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn SiLU
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..ops.fused import fused_kernels_available, rms_norm, swiglu

__all__ = ["FUSED_LAYER_MODES", "fused_active", "fused_gated_mlp_forward", "fused_layer_replacements",
           "fused_rms_norm_forward"]

FUSED_LAYER_MODES = ("auto", "on", "off")

# transformers 5.17 .. 5.24
RMS_NORM_CLASSES = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm",
    "Qwen3VLTextRMSNorm",
})
GATED_MLP_CLASSES = frozenset({
    "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2_5_VLMLP", "Qwen3VLTextMLP",
})
_SILU_CLASSES = ("SiLU", "SiLUActivation")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_active(module: torch.nn.Module, x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether `module` should run its fused kernels on `x` (and `others`, e.g. a weight): mode "on" always; "auto"
    on CUDA when Triton runs. Dtypes the kernels do not take (float64, ...) keep the module's own forward."""
    mode = module.__dict__.get("_vitos_fused", "off")
    if mode == "off" or any(t.dtype not in _KERNEL_DTYPES for t in (x, *others)):
        return False
    return mode == "on" or (x.device.type == "cuda" and fused_kernels_available(x.device))


def _is_plain_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_silu_gated_mlp(module: torch.nn.Module) -> bool:
    return (all(isinstance(getattr(module, name, None), torch.nn.Linear)
                for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in _SILU_CLASSES)


def fused_rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """RMSNorm module forward through vitos_ext.rms_norm (one kernel). [..., N] -> [..., N], as the module."""
    if not fused_active(self, hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend="triton")


def fused_gated_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP forward with silu(gate) * up in one kernel. [..., hidden] -> [..., hidden], as the module."""
    if not fused_active(self, x):
        return type(self).forward(self, x)
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend="triton"))


def fused_layer_replacements(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, Any]]:
    """(module, unbound replacement forward) for every RMSNorm / SiLU gated MLP of `model` that the fused ops
    compute exactly (vision tower and language model)."""
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORM_CLASSES and _is_plain_rms_norm(module):
            yield module, fused_rms_norm_forward
        elif name in GATED_MLP_CLASSES and _is_silu_gated_mlp(module):
            yield module, fused_gated_mlp_forward
