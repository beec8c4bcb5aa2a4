"""Fused RMSNorm / gated-MLP / text-rotary forwards for the Hugging Face modules that compute them the Llama way.

patch_model installs these on the instances (vision tower and language model alike) when its ``fused_layers`` mode
asks for them; each forward decides per call whether the Triton kernels run (see :func:`fused_active`) and otherwise
calls the module's own forward, so outputs never depend on a kernel that cannot run on the input's device.

Only classes whose forward was checked to compute exactly the formula of the fused op are listed:
    RMSNorm:   weight * (x.float() * rsqrt(mean(x.float()^2) + variance_epsilon)).to(x.dtype)
    gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn SiLU
    attention: calls its module's apply_rotary_pos_emb(q, k, cos, sin) = q * cos + rotate_half(q) * sin (same for
               k) on [B, H, L, D] queries / keys and [B, L, D] tables, in their dtype (Qwen-VL text: M-RoPE's
               sections are already merged into cos / sin by the rotary module)
"""

from __future__ import annotations

import inspect
import itertools
import sys
import types
from typing import Any, Callable, Iterator

import torch

from ..ops._registration import TRITON_DTYPES
from ..ops.fused import fused_kernels_available, rms_norm, rotary_embedding, swiglu

__all__ = ["FUSED_LAYER_MODES", "fused_active", "fused_gated_mlp_forward", "fused_layer_replacements",
           "fused_rms_norm_forward", "fused_rotary_attention_forward"]

FUSED_LAYER_MODES = ("auto", "on", "off")

# transformers 5.17 .. 5.24
RMS_NORM_CLASSES = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm",
    "Qwen3VLTextRMSNorm",
})
GATED_MLP_CLASSES = frozenset({
    "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2_5_VLMLP", "Qwen3VLTextMLP",
})
TEXT_ATTENTION_CLASSES = frozenset({
    "LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Qwen2VLAttention",
    "Qwen2_5_VLAttention", "Qwen3VLTextAttention",
})
_ROTARY_HELPER = "apply_rotary_pos_emb"
_SILU_CLASSES = ("SiLU", "SiLUActivation")


def fused_active(module: torch.nn.Module, x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether `module` should run its fused kernels on `x` (and `others`, e.g. a weight): mode "on" always; "auto"
    on CUDA when Triton runs. Dtypes the kernels do not take (float64, ...) keep the module's own forward."""
    return _mode_active(module.__dict__.get("_vitos_fused", "off"), x, *others)


def _mode_active(mode: str, x: torch.Tensor, *others: torch.Tensor) -> bool:
    if mode == "off" or any(t.dtype not in TRITON_DTYPES for t in (x, *others)):
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


def _fused_text_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb through vitos_ext.rotary_embedding: q [B, Hq, L, D], k [B, Hk, L, D], cos / sin
    [B or 1, L, D] -> rotated q, k as [B, H, L, D] views of token-major [B, L, H, D] storage."""
    batch, _, length, dim = q.shape

    def token_major(x: torch.Tensor) -> torch.Tensor:  # a view when x is the usual transposed projection output
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    cos, sin = (t.expand(batch, length, dim).reshape(batch * length, dim) for t in (cos, sin))
    q_rot, k_rot = rotary_embedding(token_major(q), token_major(k), cos, sin, backend="triton", precision="input")
    return (q_rot.view(batch, length, -1, dim).transpose(1, 2), k_rot.view(batch, length, -1, dim).transpose(1, 2))


def _text_rotary_applies(mode: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The shapes and dtypes for which the fused op computes exactly what the eager helper does."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    batch, _, length, dim = q.shape
    return (k.shape[0] == batch and k.shape[2:] == (length, dim) and dim % 2 == 0
            and cos.shape[0] in (1, batch) and cos.shape[1:] == (length, dim)
            and q.dtype == k.dtype == cos.dtype == sin.dtype and _mode_active(mode, q))


def _fused_rotary_helper(eager_helper: Callable, mode: str) -> Callable:
    """A stand-in for `eager_helper` (q, k, cos, sin, unsqueeze_dim=1): the fused op for the default call, the helper
    itself for anything else (other arguments, shapes, dtypes or devices)."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        default_call = not args and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"}
        if default_call and _text_rotary_applies(mode, q, k, cos, sin):
            return _fused_text_rotary(q, k, cos, sin)
        return eager_helper(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


_REBOUND_FORWARDS: dict[tuple[type, str, Callable, Callable], Callable] = {}


def _copy_function(func: Callable, namespace: dict, closure: tuple | None) -> Callable:
    copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, closure)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__, copy.__doc__, copy.__module__ = func.__qualname__, func.__doc__, func.__module__
    copy.__dict__.update(func.__dict__)
    return copy


_REBOUND_MODULE_IDS = itertools.count()


def _namespace_with(globals_: dict, name: str, value: Any) -> dict:
    """A copy of a module namespace with global `name` bound to `value`, kept as the namespace of a module of its own
    in sys.modules: torch.compile reaches an inlined function's globals through sys.modules[globals["__name__"]]
    (its guards too), so a copy that kept the original module's name would be guarded against the original module
    (on torch 2.11 that fails the compile outright)."""
    alias = f"_vitos_rebound_{next(_REBOUND_MODULE_IDS)}_" + str(globals_.get("__name__", "module")).replace(".", "_")
    module = types.ModuleType(alias)
    module.__dict__.update(globals_)
    module.__dict__.update({"__name__": alias, name: value})
    module.__spec__ = None  # not importable from a file: sys.modules is where it lives
    sys.modules[alias] = module
    return module.__dict__


def _with_global(func: Callable, name: str, value: Any) -> Callable | None:
    """A copy of `func` whose code reads global `name` as `value`; decorators that wrap it the functools.wraps way
    (a closure cell holding the wrapped function, e.g. transformers' deprecate_kwarg) are copied around the copy.
    None when `func`'s innermost code does not read `name` or a wrapper does not hold its function in a cell."""
    inner = getattr(func, "__wrapped__", None)
    if inner is None:
        if not isinstance(func, types.FunctionType) or name not in func.__code__.co_names:
            return None
        return _copy_function(func, _namespace_with(func.__globals__, name, value), func.__closure__)
    inner_copy = _with_global(inner, name, value)
    cells = (func.__closure__ or ()) if isinstance(func, types.FunctionType) else ()

    def holds_inner(cell) -> bool:
        try:
            return cell.cell_contents is inner
        except ValueError:  # an empty cell
            return False

    hits = [i for i, cell in enumerate(cells) if holds_inner(cell)]
    if inner_copy is None or len(hits) != 1:
        return None
    closure = tuple(types.CellType(inner_copy) if i == hits[0] else cell for i, cell in enumerate(cells))
    copy = _copy_function(func, func.__globals__, closure)
    copy.__wrapped__ = inner_copy
    return copy


def fused_rotary_attention_forward(cls: type, mode: str) -> Callable | None:
    """The class's own forward, with the module-level apply_rotary_pos_emb it calls replaced by the fused op.

    The forward's code is reused as is (whatever the installed transformers has); only the global name the code
    looks the helper up by is bound to a wrapper, in a copy of the module's namespace, so other instances and the
    modeling module are untouched. None when the forward does not call the helper. One function per (class, mode,
    forward, helper), shared by the instances, so torch.compile sees one code object."""
    forward = getattr(cls, "forward", None)
    innermost = inspect.unwrap(forward) if callable(forward) else None
    eager_helper = getattr(innermost, "__globals__", {}).get(_ROTARY_HELPER)
    if not callable(eager_helper):
        return None
    key = (cls, mode, forward, eager_helper)
    if key not in _REBOUND_FORWARDS:
        rebound = _with_global(forward, _ROTARY_HELPER, _fused_rotary_helper(eager_helper, mode))
        if rebound is None:
            return None
        _REBOUND_FORWARDS[key] = rebound
    return _REBOUND_FORWARDS[key]


def fused_layer_replacements(model: torch.nn.Module, mode: str = "on") -> Iterator[tuple[torch.nn.Module, Any]]:
    """(module, unbound replacement forward) for every RMSNorm / SiLU gated MLP / rotary-embedding attention of
    `model` that the fused ops compute exactly (vision tower and language model), for fused_layers `mode`."""
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORM_CLASSES and _is_plain_rms_norm(module):
            yield module, fused_rms_norm_forward
        elif name in GATED_MLP_CLASSES and _is_silu_gated_mlp(module):
            yield module, fused_gated_mlp_forward
        elif name in TEXT_ATTENTION_CLASSES:
            rebound = fused_rotary_attention_forward(type(module), mode)
            if rebound is not None:
                yield module, rebound
