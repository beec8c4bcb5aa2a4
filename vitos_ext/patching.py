"""patch_model: token-sparse forward()/generate() for Hugging Face vision-language models.

    model = vitos_ext.patch_model(model)                       # Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA instances
    out = model.generate(**inputs, vitos_boxes=boxes)          # visual tokens outside the boxes are dropped
    out = model.generate(**inputs, vitos_video_boxes=boxes)    # video tokens too (Qwen families; every frame)
    model.vitos_last_prefill.kept_ratio                        # what the last pruned prefill kept
    feats = vitos_ext.encode_images(model, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    model.generate(**inputs, vitos_image_features=feats)       # reuse the vision tower's output (two-pass ViToS)
    vitos_ext.unpatch_model(model)

How it hooks (identical in transformers 5.17 and 5.24; nothing in transformers is modified globally):
  * ``model.forward`` / ``model.generate`` are replaced on the instance by wrappers that accept the vitos_* arguments,
    validate them and publish a per-call request in a context variable (so concurrent threads do not mix). The
    forward wrapper keeps the original signature (+ the vitos_* keywords), so generate()'s feature detection
    (logits_to_keep, mm_encoder_outputs, position_ids) sees the same model.
  * A forward pre-hook on the language model (``model.model.language_model``) does the pruning. At that point
    transformers has already run the vision tower, scattered the image features into inputs_embeds and computed
    the (M-)RoPE positions, in every supported version; the hook compacts the left-padded batch
    (sparsity.prune_padded_batch) and hands the language model the shorter inputs_embeds, 2-D attention mask and
    gathered positions. It acts once per request, on the prefill (empty cache).
  * ``_update_model_kwargs_for_generation`` is wrapped so that after the pruned prefill generate() carries the
    compacted attention mask / position ids / mm_token_type_ids (it otherwise grows the unpruned ones), and the new
    token's position is max original position + 1 per sample. Qwen's ``rope_deltas`` are set to
    max original position + 1 - kept length, for decoding without explicit positions.
  * ``model.model.get_image_features`` is wrapped to return precomputed features (vitos_image_features) instead of
    running the vision tower, which is how one vision pass serves two prefills.
  * Attention: vision attention modules of the Qwen families get a forward that runs one varlen_attention call per
    layer; the language model (and LLaVA's ViT) switch to the "vitos_varlen" attention implementation
    (vitos_ext.hf_attention). attention="auto" does both only where a fast varlen backend exists (CUDA);
    "varlen" forces it, "model" never touches attention.

Everything installed is an instance attribute or hook bound to the model (deepcopy-safe: copies rebind to the copy),
and unpatch_model removes exactly what was installed.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import VLMAdapter, adapter_for, has_accelerate_hook
from .models.fused_layers import FUSED_LAYER_MODES, fused_layer_replacements
from .ops.attention import cu_seqlens_from_lengths
from .profiling import nvtx_annotate
from .sparsity import (
    PrunedBatch,
    boxes_to_regions,
    compact_token_values,
    image_segments,
    keep_mask_from_boxes,
    prune_padded_batch,
    resolve_fusion,
    validate_keep,
    visual_token_counts,
)

__all__ = [
    "ATTENTION_MODES",
    "FUSED_LAYER_MODES",
    "ImageFeatures",
    "apply_to_classes",
    "encode_images",
    "inner_model",
    "is_patched",
    "patch_model",
    "revert_classes",
    "unpatch_model",
]

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("auto", "varlen", "model")
VITOS_ARGUMENTS = ("vitos_boxes", "vitos_keep", "vitos_dilate", "vitos_fuse", "vitos_image_features",
                   "vitos_video_boxes")
_GENERATION_METHODS = ("generate", "_update_model_kwargs_for_generation")  # forward: see _install_forward

_ACTIVE_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("vitos_request", default=None)


# ----------------------------------------------------------------------------------------------------------
# public data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ImageFeatures:
    """Vision-tower output of one batch of images, reusable across prefills (pass as ``vitos_image_features``).

    Attributes:
        output: what the model's get_image_features returned (a transformers ModelOutput: pooler_output holds the
            per-image embeddings; Qwen3-VL also carries DeepStack features). Do not modify it.
        num_tokens: visual tokens it covers (rows of the concatenated image embeddings).
        inputs: the image inputs it was computed from (image_grid_thw / num_images), to check later calls.
    """

    output: Any
    num_tokens: int
    inputs: dict[str, Any]


def encode_images(model: torch.nn.Module, pixel_values: torch.Tensor, **image_inputs: Any) -> ImageFeatures:
    """Run a supported model's vision tower (and projector) once.

    Args:
        model: a supported *ForConditionalGeneration model (patched or not), or a PEFT model wrapping one.
        pixel_values: the processor's pixel_values (Qwen: [sum(t*h*w), C*tp*p*p]; LLaVA: [I, C, H, W]).
        **image_inputs: the other image inputs the family needs: image_grid_thw (int64 [I, 3]) for Qwen-VL.

    Returns:
        ImageFeatures, to pass as ``vitos_image_features=`` to the patched forward()/generate() of the same
        images (pixel_values may then be omitted): the vision tower does not run again. Gradients flow if enabled.
    """
    model = inner_model(model)
    adapter = adapter_for(model)
    output = adapter.encode_images(model, pixel_values, **image_inputs)
    inputs = {"image_grid_thw": image_inputs.get("image_grid_thw"),
              "num_images": adapter.count_images(model, {"pixel_values": pixel_values, **image_inputs})}
    return ImageFeatures(output=output, num_tokens=adapter.feature_rows(output), inputs=inputs)


# ----------------------------------------------------------------------------------------------------------
# per-model state and per-call requests
# ----------------------------------------------------------------------------------------------------------


# accelerate's hooks (device_map="auto" across devices, CPU / disk offload) replace a module's forward by a wrapper
# that moves inputs and loads offloaded weights, then calls the wrapped forward kept in this attribute.
_ACCELERATE_WRAPPED = "_old_forward"


@dataclass
class _Installed:
    """A forward the patch installed on a module: where (attribute), the object, and what it replaced."""

    attribute: str
    method: Any
    previous: Any


def _install_forward(module: torch.nn.Module, method: Any) -> _Installed:
    """Make `method` the module's forward. Under an accelerate hook it replaces the forward the hook wraps, so the
    hook still moves inputs and loads weights first (replacing the hook's wrapper would run on meta weights)."""
    hooked = has_accelerate_hook(module) and _ACCELERATE_WRAPPED in module.__dict__
    attribute = _ACCELERATE_WRAPPED if hooked else "forward"
    installed = _Installed(attribute, method, module.__dict__.get(attribute))
    module.__dict__[attribute] = method
    return installed


def _restore_forward(module: torch.nn.Module, installed: _Installed) -> None:
    """Undo _install_forward, also when accelerate hooked the module after patching (its wrapper then wraps the
    patched forward: keep the wrapper, restore what it wraps)."""
    attribute, previous = installed.attribute, installed.previous
    if attribute == "forward" and module.__dict__.get("forward") is not installed.method \
            and module.__dict__.get(_ACCELERATE_WRAPPED) is installed.method:
        attribute = _ACCELERATE_WRAPPED
        if previous is None:  # the hook needs a forward to call: the class's own
            previous = types.MethodType(type(module).forward, module)
    _restore_attribute(module, attribute, previous)


@dataclass
class _ForwardPatches:
    """Forwards installed on submodule instances, the mode flag they read, and what they replaced (to restore it).

    A replacement of None only sets the flag (a module whose installed forward reads a second mode)."""

    flag: str
    installed: list[tuple[torch.nn.Module, _Installed]] = field(default_factory=list)
    flagged: list[torch.nn.Module] = field(default_factory=list)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The modules whose forward was replaced."""
        return [module for module, _ in self.installed]

    def install(self, replacements: Any, mode: str) -> None:
        for module, replacement in replacements:
            if replacement is not None:
                self.installed.append((module, _install_forward(module, types.MethodType(replacement, module))))
            else:
                self.flagged.append(module)
            module.__dict__[self.flag] = mode

    def remove(self) -> None:
        for module, installed in self.installed:
            _restore_forward(module, installed)
        for module in [*self.modules, *self.flagged]:
            module.__dict__.pop(self.flag, None)
        self.installed.clear()
        self.flagged.clear()


@dataclass
class _PatchState:
    """What patch_model installed on one model (everything unpatch_model must undo)."""

    model: torch.nn.Module
    adapter: VLMAdapter
    attention: str
    previous: dict[str, Any] = field(default_factory=dict)  # model methods that were instance attributes before
    previous_image_features: Any = None
    vision_forwards: _ForwardPatches = field(default_factory=lambda: _ForwardPatches("_vitos_attention"))
    attention_backup: list[tuple[Any, Any]] = field(default_factory=list)
    attention_routed: bool = False
    fused_layers: str = "off"
    fused_forwards: _ForwardPatches = field(default_factory=lambda: _ForwardPatches("_vitos_fused"))
    installed_forward: _Installed | None = None


@dataclass
class _Request:
    """One patched forward()/generate() call that asked for pruning and/or precomputed image features."""

    state: _PatchState
    boxes: list[torch.Tensor] | None
    keep: torch.Tensor | None
    dilate: int
    fuse: bool | torch.Tensor | None
    image_features: ImageFeatures | None
    in_generate: bool
    video_boxes: list[torch.Tensor] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    prompt_inputs: dict[str, Any] = field(default_factory=dict)  # generate()'s own inputs, before it repeats rows
    encoded_rows: int | None = None
    done: bool = False
    pruned: PrunedBatch | None = None
    packed_prefill: "_PackedLayout | None" = None  # set while the language model runs the packed layout
    generate_kwargs_pending: bool = False
    cache_marked: bool = False  # the pruned prefill's KV cache carries its _PrunedPrompt

    @property
    def prunes(self) -> bool:
        return self.boxes is not None or self.keep is not None or self.video_boxes is not None


def _state_of(model: torch.nn.Module) -> _PatchState | None:
    return model.__dict__.get("_vitos_state")


def is_patched(model: torch.nn.Module) -> bool:
    """Whether patch_model is in effect on this instance (or on the model a PEFT wrapper holds)."""
    return _state_of(inner_model(model)) is not None


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The supported VLM that `model` wraps, for wrappers that forward to it (PEFT's PeftModel: get_base_model());
    `model` itself otherwise. LoRA and similar adapters live inside the wrapped model's modules, so the inner model
    computes with them."""
    if _is_supported(model):
        return model
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else None
    return inner if isinstance(inner, torch.nn.Module) and inner is not model and _is_supported(inner) else model


def _is_supported(model: torch.nn.Module) -> bool:
    try:
        adapter_for(model)
    except TypeError:
        return False
    return True


def _original(state: _PatchState, name: str):
    previous = state.installed_forward.previous if name == "forward" else state.previous.get(name)
    own = getattr(type(state.model), name)
    if previous is not None and getattr(previous, "__func__", None) is not own:
        return previous
    # the class's function applied to the instance, not a bound method: torch.compile resolves a bound `forward`
    # through the instance, i.e. back to the patched one (endless recursion under torch.compile(model))
    return functools.partial(own, state.model)


def _request_for(state: _PatchState | None) -> _Request | None:
    request = _ACTIVE_REQUEST.get()
    return request if request is not None and state is not None and request.state is state else None


# ----------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------


def patch_model(model: torch.nn.Module, attention: str = "auto", fused_layers: str = "auto") -> torch.nn.Module:
    """Make a supported HF VLM instance token-sparse (in place). Idempotent; returns the model.

    After patching, forward() and generate() also accept:
        vitos_boxes: list with one float tensor [n_i, 4] per image (normalized x1, y1, x2, y2; image_grid_thw order;
            an empty tensor keeps the whole image). Visual tokens outside every box of their image are dropped.
        vitos_keep: bool [N] over all visual tokens of the batch (any custom policy), instead of boxes.
        vitos_dilate: int >= 0, grow the box regions by this many tokens.
        vitos_fuse: True (average each dropped token into the nearest kept token of its image frame) or an int64
            [N] map over visual tokens (-1 = drop, k = fuse into visual token k).
        vitos_image_features: ImageFeatures from encode_images(): skip the vision tower (pixel_values optional).
        vitos_video_boxes: Qwen families, list with one float tensor [n_i, 4] per video (video_grid_thw order): video
            tokens outside every box of their video are dropped, the same region in every frame (vitos_dilate
            applies; fusion and vitos_keep cover image tokens only). Without it every video token is kept.
    With none of them the model behaves exactly as before. Pruning happens once, at prefill: text tokens are kept,
    kept tokens keep their original (M-)RoPE positions, the KV cache holds only kept tokens, decoding continues at
    max original position + 1 per sample, and left-padded batches with different kept counts decode as each sample
    alone would. A pruned forward() returns logits over the compacted, left-padded sequence [B, L', V] (labels, if
    given, are compacted the same way). model.vitos_last_prefill (a PrunedBatch without embeddings) describes the
    last pruned prefill: kept_counts, visual_kept_counts, kept_ratio, attention_mask, position_ids, next_position.
    When the language model attends through "vitos_varlen", the prefill of a padded batch in a call with vitos_*
    arguments (pruned, or reusing image features) runs packed (no padding rows) and its outputs and KV cache are
    laid back out left-padded (see PACKED_PREFILL).
    A follow-up turn continues the KV cache of a pruned generate() or forward(): generate(input_ids=the whole
    conversation (the pruned prompt, then everything after it), attention_mask alike, past_key_values=that cache)
    compacts the prompt columns as the cache holds them and decodes what a fresh pruned generate() of the whole
    conversation would (no new images, one sequence per row).

    Args:
        model: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA *ForConditionalGeneration instance, or a PEFT model
            wrapping one (the wrapped model is patched; generate() / forward() through the wrapper prune).
        attention: "auto" (varlen attention for the vision tower and language model where a fast backend exists for
            the model's device, i.e. CUDA; elsewhere the model's own attention), "varlen" (always), "model" (never).
        fused_layers: RMSNorm, SiLU gated MLP and rotary embedding of the vision tower and the language model
            as one Triton kernel each (vitos_ext.rms_norm / swiglu / rotary_embedding) instead of 5-16 eager ops:
            "auto" (on CUDA devices where Triton runs; elsewhere the modules' own forwards), "on" (always; CPU
            tensors need TRITON_INTERPRET=1), "off". Same results as the modules' own forwards up to float rounding.

    Raises:
        TypeError listing the supported classes for any other model; ValueError for an unknown mode.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    _check_fused_layers(fused_layers)
    wrapper, model = model, inner_model(model)
    _patch_instance(model, adapter_for(model), attention, fused_layers)
    return wrapper


def _patch_instance(model: torch.nn.Module, adapter: VLMAdapter, attention: str, fused_layers: str) -> None:
    state = _state_of(model)
    if state is not None:
        if state.attention != attention:
            _set_attention_mode(state, attention)
        if state.fused_layers != fused_layers:
            _set_fused_layers(state, fused_layers)
        return

    state = _PatchState(model=model, adapter=adapter, attention=attention)
    for name in _GENERATION_METHODS:
        state.previous[name] = model.__dict__.get(name)
    base = adapter.base_model(model)
    state.previous_image_features = base.__dict__.get("get_image_features")

    model.__dict__["_vitos_state"] = state
    model.__dict__["vitos_last_prefill"] = None
    state.installed_forward = _install_forward(model, types.MethodType(_forward_for_class(type(model)), model))
    model.__dict__["generate"] = types.MethodType(_patched_generate, model)
    model.__dict__["_update_model_kwargs_for_generation"] = types.MethodType(_patched_update_model_kwargs, model)
    base.__dict__["_vitos_state"] = state
    base.__dict__["get_image_features"] = types.MethodType(_get_image_features_for_class(type(base)), base)
    language_model = adapter.language_model(model)
    language_model.register_forward_pre_hook(types.MethodType(_language_model_pre_hook, state), with_kwargs=True)
    language_model.register_forward_hook(types.MethodType(_language_model_post_hook, state), with_kwargs=True)
    _set_attention_mode(state, attention)
    _set_fused_layers(state, fused_layers)


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_model exactly: instance attributes and hooks removed, attention implementations restored.

    A model that is not patched is returned unchanged. Returns `model` (a PEFT wrapper stays the wrapper).
    """
    _unpatch_instance(inner_model(model))
    return model


def _unpatch_instance(model: torch.nn.Module) -> None:
    state = _state_of(model)
    if state is None:
        return
    _restore_attention(state)
    state.vision_forwards.remove()
    _set_fused_layers(state, "off")
    _restore_forward(model, state.installed_forward)
    for name in _GENERATION_METHODS:
        _restore_attribute(model, name, state.previous.get(name))
    base = state.adapter.base_model(model)
    _restore_attribute(base, "get_image_features", state.previous_image_features)
    base.__dict__.pop("_vitos_state", None)
    _remove_hooks(state.adapter.language_model(model))
    model.__dict__.pop("vitos_last_prefill", None)
    model.__dict__.pop("_vitos_state", None)


def _restore_attribute(obj: Any, name: str, previous: Any) -> None:
    if previous is None:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = previous


def _remove_hooks(module: torch.nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__func__", None) is _language_model_pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    for key, hook in list(module._forward_hooks.items()):
        if getattr(hook, "__func__", None) is _language_model_post_hook:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)


# ----------------------------------------------------------------------------------------------------------
# attention routing
# ----------------------------------------------------------------------------------------------------------


def _set_attention_mode(state: _PatchState, attention: str) -> None:
    _restore_attention(state)
    state.vision_forwards.remove()
    state.attention = attention
    if attention == "model":
        return
    state.vision_forwards.install(state.adapter.vision_forward_replacements(state.model), attention)
    _ensure_language_model_attention(state)


def _check_fused_layers(fused_layers: str) -> None:
    if fused_layers not in FUSED_LAYER_MODES:
        raise ValueError(f"fused_layers must be one of {FUSED_LAYER_MODES}, got {fused_layers!r}")
    if fused_layers == "on":
        from .ops.fused import _kernels

        if _kernels is None:
            raise RuntimeError("fused_layers='on' needs triton, which is not installed; use 'auto' or 'off'")


def _set_fused_layers(state: _PatchState, fused_layers: str) -> None:
    """Install (or, with "off", remove) the fused RMSNorm / gated-MLP / text-attention forwards and the vision
    rotary mode."""
    state.fused_forwards.remove()
    state.fused_layers = fused_layers
    if fused_layers == "off":
        return
    state.fused_forwards.install(fused_layer_replacements(state.model, fused_layers), fused_layers)
    # the vision attention's varlen forward (installed with the attention mode) applies the rotary: flag only
    state.fused_forwards.install(((module, None) for module in state.adapter.vision_attention_modules(state.model)),
                                 fused_layers)


def _fast_varlen_device(model: torch.nn.Module) -> bool:
    device = execution_device(model)
    if device is None or device.type != "cuda":
        return False
    from .ops.attention import triton_available

    return triton_available(device)


def execution_device(model: torch.nn.Module) -> torch.device | None:
    """Where a model takes its inputs: the device of its input embeddings, or, when accelerate offloads them (meta
    weights loaded per call), the execution device of their hook. None for a model without parameters."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(model.parameters(), None)
        if weight is None:
            return None
    if weight.device.type == "meta":
        hook = getattr(embeddings, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return weight.device


def _ensure_language_model_attention(state: _PatchState) -> None:
    """Switch the language model to "vitos_varlen" once the mode (and, for "auto", the device) asks for it."""
    if state.attention_routed or state.attention == "model":
        return
    if state.attention == "auto" and not _fast_varlen_device(state.model):
        return  # re-checked on every patched call: the model may move to CUDA later
    try:
        from .hf_attention import register_hf_attention
    except ImportError as error:
        if state.attention == "varlen":
            raise ImportError("attention='varlen' needs vitos_ext.hf_attention") from error
        logger.warning("vitos_ext.hf_attention unavailable; the language model keeps its own attention")
        state.attention_routed = True
        return
    name = _registered_attention_name(register_hf_attention)
    configs = {}
    for config in state.adapter.language_model_configs(state.model):
        configs[id(config)] = config
    for module in state.adapter.language_model(state.model).modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs[id(config)] = config
    for config in configs.values():
        state.attention_backup.append((config, config._attn_implementation_internal))
        config._attn_implementation_internal = name
    state.attention_routed = True


def _registered_attention_name(register_hf_attention) -> str:
    """Register "vitos_varlen" unless it already is (re-registering would reset a backend the user chose)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .hf_attention import HF_ATTENTION_NAME

    if HF_ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return HF_ATTENTION_NAME
    return register_hf_attention()


def _restore_attention(state: _PatchState) -> None:
    for config, implementation in reversed(state.attention_backup):
        config._attn_implementation_internal = implementation
    state.attention_backup.clear()
    state.attention_routed = False


# ----------------------------------------------------------------------------------------------------------
# request validation
# ----------------------------------------------------------------------------------------------------------


def _pop_vitos_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {name: kwargs.pop(name) for name in VITOS_ARGUMENTS if name in kwargs}


def _wants_request(vitos: dict[str, Any]) -> bool:
    return any(value is not None and value is not False and not (name == "vitos_dilate" and value == 0)
               for name, value in vitos.items())


def _make_request(state: _PatchState, vitos: dict[str, Any], inputs: dict[str, Any], in_generate: bool) -> _Request:
    """Validate the vitos_* arguments against the call's inputs (host-side checks only) and build the request."""
    boxes, keep = vitos.get("vitos_boxes"), vitos.get("vitos_keep")
    dilate, fuse = vitos.get("vitos_dilate") or 0, vitos.get("vitos_fuse")
    features, video_boxes = vitos.get("vitos_image_features"), vitos.get("vitos_video_boxes")
    _check_argument_kinds(boxes, keep, dilate, fuse, features, video_boxes)
    if boxes is not None or keep is not None:
        _check_prunable(inputs, features, "vitos_boxes" if boxes is not None else "vitos_keep")
    input_ids = inputs.get("input_ids")
    device = input_ids.device if input_ids is not None else execution_device(state.model)
    if features is not None:
        if not state.adapter.same_images(features.inputs, inputs):  # compares image_grid_thw: a tiny read-back
            raise ValueError("vitos_image_features were computed for other images than this call's "
                             "(image_grid_thw / number of images differ)")
        inputs.update({k: v for k, v in features.inputs.items() if inputs.get(k) is None and v is not None})
    if boxes is not None:
        num_images = state.adapter.count_images(state.model, inputs)
        if num_images is None:
            raise ValueError("vitos_boxes needs the image inputs (image_grid_thw for Qwen-VL models)")
        boxes_to_regions(boxes, num_images, device)  # types, shapes, count and device, before any compute
    if video_boxes is not None:
        _check_video_boxes(state, inputs, video_boxes, device)
    for name, tensor in (("vitos_keep", keep), ("vitos_fuse", fuse)):
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the inputs are on {device}")
    return _Request(state=state, boxes=None if boxes is None else list(boxes), keep=keep, dilate=dilate, fuse=fuse,
                    image_features=features, in_generate=in_generate, inputs=inputs, prompt_inputs=dict(inputs),
                    video_boxes=None if video_boxes is None else list(video_boxes))


def _check_argument_kinds(boxes, keep, dilate, fuse, features, video_boxes=None) -> None:
    if boxes is not None and keep is not None:
        raise ValueError("pass either vitos_boxes or vitos_keep, not both")
    if boxes is None and keep is None and fuse not in (None, False):
        raise ValueError("vitos_fuse needs vitos_boxes or vitos_keep" if video_boxes is None else
                         "vitos_fuse applies to image tokens: it needs vitos_boxes or vitos_keep")
    if boxes is None and keep is None and video_boxes is None and dilate:
        raise ValueError("vitos_dilate needs vitos_boxes, vitos_keep or vitos_video_boxes")
    if not isinstance(dilate, int) or isinstance(dilate, bool) or dilate < 0:
        raise ValueError(f"vitos_dilate must be an int >= 0, got {dilate!r}")
    if keep is not None and (not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 1):
        kind = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise TypeError(f"vitos_keep must be a 1-D bool tensor over all visual tokens, got {kind}")
    if fuse is not None and not isinstance(fuse, (bool, torch.Tensor)):
        raise TypeError(f"vitos_fuse must be a bool or an int64 tensor, got {type(fuse).__name__}")
    if features is not None and not isinstance(features, ImageFeatures):
        raise TypeError(f"vitos_image_features must come from vitos_ext.encode_images(), "
                        f"got {type(features).__name__}")


def _check_video_boxes(state: _PatchState, inputs: dict[str, Any], video_boxes: Any, device: torch.device) -> None:
    """vitos_video_boxes: a family with video input, a batch with videos, one [n_i, 4] tensor per video."""
    if state.adapter.video_token_id(state.model) is None:
        raise ValueError(f"vitos_video_boxes: {type(state.model).__name__} takes no video input")
    grid, pixels = inputs.get("video_grid_thw"), inputs.get("pixel_values_videos")
    if grid is None or pixels is None:
        raise ValueError("vitos_video_boxes was given but the batch has no videos (pixel_values_videos and "
                         "video_grid_thw)")
    if inputs.get("input_ids") is None:
        raise ValueError("token pruning needs input_ids (to locate the video tokens), not only inputs_embeds")
    boxes_to_regions(video_boxes, int(grid.shape[0]), device, argument="vitos_video_boxes", kind="video")


def _check_prunable(inputs: dict[str, Any], features: ImageFeatures | None, argument: str) -> None:
    pixel_values = inputs.get("pixel_values")
    has_pixels = isinstance(pixel_values, torch.Tensor) and pixel_values.numel() > 0
    if not has_pixels and features is None:
        raise ValueError(f"{argument} was given but the batch has no images (no pixel_values or "
                         "vitos_image_features): token pruning only applies to visual tokens")
    if inputs.get("input_ids") is None:
        raise ValueError("token pruning needs input_ids (to locate the image tokens), not only inputs_embeds")


def _fill_image_inputs(kwargs: dict[str, Any], request: _Request) -> None:
    """With precomputed features and no pixel_values, hand transformers an empty pixel tensor (it calls
    get_image_features only when pixel_values is not None; the wrapped get_image_features then returns the cached
    features) and the features' image_grid_thw when the call has none (Qwen needs it for M-RoPE positions)."""
    features = request.image_features
    if features is None:
        return
    if kwargs.get("pixel_values") is None:
        kwargs["pixel_values"] = torch.empty(0, device=next(request.state.model.parameters()).device)
    if kwargs.get("image_grid_thw") is None and features.inputs.get("image_grid_thw") is not None:
        kwargs["image_grid_thw"] = features.inputs["image_grid_thw"]


# ----------------------------------------------------------------------------------------------------------
# forward / generate wrappers
# ----------------------------------------------------------------------------------------------------------

_WRAPPERS_BY_CLASS: dict[tuple[type, str], Any] = {}
_VISUAL_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw")
_CAPTURED_INPUTS = ("input_ids", *_VISUAL_INPUTS)


def _with_signature_of(cls: type, name: str, implementation: Any, extra_keywords: tuple[str, ...] = ()) -> Any:
    """A method for instances of `cls` that calls implementation(self, args, kwargs) and advertises the signature of
    cls.<name> (plus `extra_keywords`): transformers inspects these signatures (generate() decides what to pass to
    forward and whether to pre-encode images with get_image_features from them)."""
    key = (cls, name)
    if key in _WRAPPERS_BY_CLASS:
        return _WRAPPERS_BY_CLASS[key]
    template = getattr(cls, name)
    signature = inspect.signature(template)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    extra = [inspect.Parameter(keyword, inspect.Parameter.KEYWORD_ONLY,
                               default=0 if keyword == "vitos_dilate" else None) for keyword in extra_keywords]

    def method(self, *args, **kwargs):
        return implementation(self, args, kwargs)

    method.__signature__ = signature.replace(parameters=params[:at] + extra + params[at:])
    note = "\n\nPatched by vitos_ext (see vitos_ext.patch_model)."
    method.__doc__ = (template.__doc__ or "") + note
    method.__name__ = name
    method.__qualname__ = f"{cls.__name__}.{name}"
    _WRAPPERS_BY_CLASS[key] = method
    return method


def _forward_for_class(cls: type) -> Any:
    return _with_signature_of(cls, "forward", _patched_forward, VITOS_ARGUMENTS)


def _get_image_features_for_class(cls: type) -> Any:
    return _with_signature_of(cls, "get_image_features", _patched_get_image_features)


def _call_inputs(function: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(function).bind_partial(*args, **kwargs).arguments
    nested = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
    return {name: bound.get(name, nested.get(name)) for name in _CAPTURED_INPUTS}


def _patched_forward(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    state = _state_of(model)
    original = _original(state, "forward")
    vitos = _pop_vitos_arguments(kwargs)
    request = _request_for(state)
    if request is not None:  # a step of our own generate(): record the prefill's inputs for the language-model hook
        if vitos:
            raise ValueError("pass vitos_* arguments to generate() itself")
        if not request.done:
            request.inputs.update({k: v for k, v in _call_inputs(original, args, kwargs).items() if v is not None})
        return original(*args, **kwargs)
    _ensure_language_model_attention(state)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    prefill = cache is None or cache.get_seq_length() == 0
    if not _wants_request(vitos):
        if prefill:  # an unpruned prefill: nothing was pruned last
            model.__dict__["vitos_last_prefill"] = None
        return original(*args, **kwargs)

    _reject_packed_sequences(kwargs)
    request = _make_request(state, vitos, _call_inputs(original, args, kwargs), in_generate=False)
    if request.prunes and not prefill:
        raise ValueError("vitos pruning happens at prefill: it cannot continue from a non-empty cache")
    _fill_image_inputs(kwargs, request)
    labels = kwargs.pop("labels", None) if request.prunes else None
    return_dict = kwargs.get("return_dict")
    if labels is not None:
        kwargs["return_dict"] = True
    model.__dict__["vitos_last_prefill"] = None
    output = _run_request(request, original, args, kwargs)
    if labels is not None:
        output = _with_compacted_loss(model, output, labels, request, kwargs)
        if return_dict is False:
            output = output.to_tuple()
    return output


_PACKED_SEQUENCE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")


def _reject_packed_sequences(kwargs: dict[str, Any]) -> None:
    """patch_model prunes padded batches (one sequence per row). Several sequences packed in one row (verl's
    remove-padding layout) would be compacted as one sequence and attend to each other: refuse them clearly."""
    hint = "use vitos_ext.prune_packed_batch for packed (remove-padding) batches"
    for name in _PACKED_SEQUENCE_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: token pruning through patch_model needs one sequence per row; {hint}")
    positions = kwargs.get("position_ids")
    if not isinstance(positions, torch.Tensor) or positions.dim() not in (2, 3) or positions.shape[-1] < 2:
        return
    first_row = positions[0] if positions.dim() == 3 else positions  # text / temporal row: non-decreasing
    restarts = first_row[:, 1:] < first_row[:, :-1]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == first_row.shape:
        restarts &= mask[:, 1:].bool() & mask[:, :-1].bool()
    if bool(restarts.any()):  # one read-back, only when the caller passes position ids itself
        raise ValueError(f"position_ids restart inside a row (packed sequences): token pruning through "
                         f"patch_model needs one sequence per row; {hint}")


def _run_request(request: _Request, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Call the original forward / generate with `request` active for the language-model hooks, and check it pruned."""
    token = _ACTIVE_REQUEST.set(request)
    try:
        output = original(*args, **kwargs)
    finally:
        _ACTIVE_REQUEST.reset(token)
    _check_pruned(request)
    return output


def _check_pruned(request: _Request) -> None:
    if request.prunes and request.pruned is None:
        raise RuntimeError("vitos_ext: the language-model hook never saw the prefill, nothing was pruned "
                           "(is the model's language model called as model.model.language_model?)")


def _with_compacted_loss(model, output, labels, request: _Request, kwargs: dict[str, Any]):
    """The causal-LM loss over the compacted sequence (labels gathered like the tokens, -100 at padding)."""
    if request.pruned is not None:
        labels = compact_token_values(labels, request.pruned, -100)
    loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
    vocab_size = model.config.get_text_config().vocab_size
    loss = model.loss_function(logits=output.logits, labels=labels, vocab_size=vocab_size, **loss_kwargs)
    return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})


def _patched_generate(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """generate() with the vitos_* arguments (see patch_model)."""
    state = _state_of(model)
    original = _original(state, "generate")
    vitos = _pop_vitos_arguments(kwargs)
    model.__dict__["vitos_last_prefill"] = None
    _ensure_language_model_attention(state)
    record = _pruned_prompt_of(kwargs)
    if record is not None:
        if _wants_request(vitos):
            raise ValueError("vitos pruning happens at prefill: it cannot continue from a non-empty cache (this one "
                             "already holds a pruned prompt: continue it without vitos_* arguments)")
        return _continue_pruned_cache(model, original, record, args, kwargs)
    if not _wants_request(vitos):
        return original(*args, **kwargs)
    _check_generation_mode(model, kwargs, vitos)
    _reject_packed_sequences(kwargs)
    inputs = {name: kwargs.get(name) for name in _CAPTURED_INPUTS}
    if inputs["input_ids"] is None:
        inputs["input_ids"] = args[0] if args else kwargs.get("inputs")
    request = _make_request(state, vitos, inputs, in_generate=True)
    _fill_image_inputs(kwargs, request)
    return _run_request(request, original, args, kwargs)


_PRUNED_CACHE_TAG = "_vitos_pruned_prompt"


@dataclass
class _PrunedPrompt:
    """What a KV cache that holds a pruned prompt needs to be continued by generate(): the prompt rows it was pruned
    from (input_ids [B, L]) and the pruning (PrunedBatch without embeddings)."""

    prompt_ids: torch.Tensor
    pruned: PrunedBatch


def _mark_pruned_cache(cache: Any, request: _Request) -> None:
    prompt_ids = request.inputs.get("input_ids")
    if cache is not None and prompt_ids is not None:
        setattr(cache, _PRUNED_CACHE_TAG, _PrunedPrompt(prompt_ids, request.pruned.without_embeddings()))


def _output_cache(output: Any) -> Any:
    """A model output's KV cache: transformers >= 5.2x names the field "cache" (reading the old name logs a
    deprecation), earlier releases "past_key_values"."""
    if isinstance(output, tuple):
        return next((item for item in output if hasattr(item, "get_seq_length")), None)
    return output.get("cache" if "cache" in getattr(output, "__dataclass_fields__", ()) else "past_key_values")


def _pruned_prompt_of(kwargs: dict[str, Any]) -> _PrunedPrompt | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    record = getattr(cache, _PRUNED_CACHE_TAG, None) if cache is not None else None
    return record if record is not None and cache.get_seq_length() > 0 else None


def _continue_pruned_cache(model: torch.nn.Module, original: Any, record: _PrunedPrompt, args: tuple,
                           kwargs: dict[str, Any]) -> Any:
    """generate() from a cache that holds a pruned prompt, given the whole conversation (a follow-up turn).

    generate() resumes a cache by skipping its length in input_ids; here the cache holds the compacted prompt, so
    the prompt columns of input_ids, attention_mask and the per-token type ids are compacted the same way first, and
    the positions are given explicitly: the kept prompt tokens' original ones, then max original position + 1
    onwards, as the first generate() decoded. Image inputs (pixel_values, grids) may be passed again and are not
    used: the cache holds the prompt's images. Returned sequences carry the caller's uncompacted input_ids.
    """
    state = _state_of(model)
    ids = _continuation_input_ids(args, kwargs)
    prompt, pruned = record.prompt_ids, record.pruned
    _check_continuation(model, state, ids, prompt, kwargs)
    length = prompt.shape[1]
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    kwargs["attention_mask"] = torch.cat([pruned.attention_mask.to(mask.dtype), mask[:, length:]], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if kwargs.get(key) is not None:
            kwargs[key] = torch.cat([compact_token_values(kwargs[key][:, :length], pruned, 0),
                                     kwargs[key][:, length:]], dim=1)
    pad = _generation_setting(model, kwargs, "pad_token_id")
    compacted = torch.cat([compact_token_values(ids[:, :length], pruned, 0 if pad is None else int(pad)),
                           ids[:, length:]], dim=1)
    tail = torch.arange(ids.shape[1] - length, device=ids.device)
    kwargs["position_ids"] = torch.cat([pruned.position_ids, _decode_positions(state, pruned, pruned.position_ids,
                                                                               tail)], dim=-1)
    for key in _VISUAL_INPUTS:  # the prompt's images are in the cache already (new ones were refused)
        kwargs.pop(key, None)
    _shift_total_lengths(model, kwargs, ids.shape[1] - compacted.shape[1])
    state.adapter.set_rope_deltas(state.model, pruned)  # for manual decoding steps afterwards
    output = original(compacted, **kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    restored = torch.cat([ids, sequences[:, compacted.shape[1]:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output


def _shift_total_lengths(model: torch.nn.Module, kwargs: dict[str, Any], pruned_columns: int) -> None:
    """max_length / min_length count the whole sequence, which the caller sees uncompacted: generate() gets the
    compacted one, shorter by `pruned_columns` (max_new_tokens / min_new_tokens need nothing)."""
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if _generation_setting(model, kwargs, new) is not None:
            continue
        length = _generation_setting(model, kwargs, total)
        if length is not None:
            kwargs[total] = max(0, int(length) - pruned_columns)


def _continuation_input_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    ids = args[0] if args else kwargs.pop("input_ids", None)
    if ids is None:
        ids = kwargs.pop("inputs", None)
    if len(args) > 1:
        raise ValueError("generate() from a pruned cache takes input_ids as the only positional argument")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("input_ids: generate() from a cache that holds a pruned prompt needs the whole conversation "
                         "as input_ids [B, T] (the pruned prompt, then everything after it)")
    return ids


def _check_continuation(model: torch.nn.Module, state: _PatchState, ids: torch.Tensor, prompt: torch.Tensor,
                        kwargs: dict[str, Any]) -> None:
    if _copies_per_prompt(model, kwargs) > 1:
        raise ValueError("generate() from a cache that holds a pruned prompt needs num_beams = num_return_sequences "
                         "= 1 (the cache has one row per sequence already)")
    if kwargs.get("position_ids") is not None:
        raise ValueError("position_ids: generate() from a pruned cache derives them from the pruned prompt")
    length = prompt.shape[1]
    if ids.shape[0] != prompt.shape[0] or ids.shape[1] <= length or ids.device != prompt.device \
            or not torch.equal(ids[:, :length], prompt):
        raise ValueError(f"input_ids: this cache holds a pruned prompt of {prompt.shape[0]} x {length} tokens; "
                         "generate() continues it from the whole conversation, whose first columns must be that "
                         f"prompt (got input_ids of shape {tuple(ids.shape)} that do not start with it)")
    adapter = state.adapter
    vision_ids = [adapter.image_token_id(model), adapter.video_token_id(model)]
    new_part = ids[:, length:]
    if any(token is not None and bool((new_part == token).any()) for token in vision_ids):
        raise ValueError("input_ids: a follow-up turn on a pruned cache cannot add images or videos (their "
                         "positions come from the prompt); run the whole conversation again with vitos_* arguments")


def _decode_positions(state: _PatchState, pruned: PrunedBatch, layout: torch.Tensor,
                      steps: torch.Tensor) -> torch.Tensor:
    """Positions of the tokens decoded after a pruned prompt, steps [S] after it, in the layout of the prompt's
    position ids: max original position + 1 onwards (Qwen's text row: the compacted token index onwards)."""
    first = pruned.next_position.view(-1, 1).expand(*layout.shape[:-1], 1).clone()
    if layout.dim() == 3 and state.adapter.text_position_row and layout.shape[0] == 4:
        first[0] = pruned.kept_counts.view(-1, 1)
    return (first + steps.to(first.dtype)).to(layout.dtype)


def _generation_setting(model: torch.nn.Module, kwargs: dict[str, Any], name: str, default: Any = None) -> Any:
    """A generate() setting as generate() will use it: the call's keyword, else its generation_config's, else the
    model's."""
    config = kwargs.get("generation_config") or model.generation_config
    return kwargs.get(name, getattr(config, name, default))


def _copies_per_prompt(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows generate() makes of every prompt (num_beams / num_return_sequences)."""
    return max(_generation_setting(model, kwargs, name, 1) or 1
               for name in ("num_beams", "num_return_sequences"))


def _check_generation_mode(model: torch.nn.Module, kwargs: dict[str, Any], vitos: dict[str, Any]) -> None:
    # generate() repeats every prompt before its prefill; the request repeats its boxes alike
    if _copies_per_prompt(model, kwargs) > 1:
        if isinstance(vitos.get("vitos_fuse"), torch.Tensor):
            raise ValueError("vitos_fuse as an explicit fusion map needs num_beams = num_return_sequences = 1 "
                             "(pass vitos_fuse=True, or repeat the prompts in the batch)")
        if vitos.get("vitos_image_features") is not None:
            raise ValueError("vitos_image_features needs num_beams = num_return_sequences = 1 (generate() repeats "
                             "the images of every prompt; pass pixel_values, or repeat the prompts in the batch)")
        if vitos.get("vitos_video_boxes") is not None:
            raise ValueError("vitos_video_boxes needs num_beams = num_return_sequences = 1 (repeat the prompts in "
                             "the batch instead)")
    if _generation_setting(model, kwargs, "use_cache", True) is False:
        raise ValueError("vitos pruning needs use_cache=True: the prompt is pruned once, at prefill, and decoding "
                         "continues from the compacted KV cache")
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise ValueError("vitos pruning does not support assisted / speculative decoding")
    if _generation_setting(model, kwargs, "prefill_chunk_size"):
        raise ValueError("vitos pruning needs the whole prompt in one prefill (prefill_chunk_size must be None)")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("vitos pruning cannot continue from a non-empty cache: prune at the first prefill")


def _repeated_prompt_image_order(tokens_per_row: list[int], tokens_per_image: list[int], copies: int) -> list[int]:
    """Image indices in the order generate() lays out the images after repeating every prompt `copies` times
    (num_return_sequences / num_beams: the copies of a prompt are adjacent rows, each with the prompt's images).

    Args:
        tokens_per_row: visual tokens of each prompt row, in row order.
        tokens_per_image: visual tokens of each image, in image order (a row's images are consecutive).
        copies: how many times each prompt is repeated.

    Returns:
        For every prompt in order, its image indices, `copies` times over.
    """
    order, image = [], 0
    for row, tokens in enumerate(tokens_per_row):
        first = image
        while tokens > 0:
            if image >= len(tokens_per_image):
                raise ValueError(f"row {row} has more visual tokens than the images describe")
            tokens -= tokens_per_image[image]
            image += 1
        if tokens < 0:
            raise ValueError(f"the visual tokens of row {row} do not end at an image boundary")
        order += list(range(first, image)) * copies
    if image != len(tokens_per_image):
        raise ValueError(f"{len(tokens_per_image)} images but the rows' visual tokens cover only {image}")
    return order


def _repeat_for_generation(state: _PatchState, request: _Request) -> None:
    """generate() repeated every prompt before the prefill (num_return_sequences / num_beams > 1): repeat the
    request's per-image boxes, or its keep mask's per-image segments, the same way, so each copy is pruned as its
    prompt."""
    prompts, rows = request.prompt_inputs.get("input_ids"), request.inputs["input_ids"].shape[0]
    if prompts is None or rows == prompts.shape[0]:
        return
    copies, rest = divmod(rows, prompts.shape[0])
    if rest:
        raise RuntimeError(f"generate() prefilled {rows} rows for {prompts.shape[0]} prompts")
    visual = prompts == state.adapter.image_token_id(state.model)
    tokens_per_row = visual.sum(1).tolist()  # one small read-back per generate() call
    grid, merge = state.adapter.visual_grid(state.model, request.prompt_inputs, sum(tokens_per_row))
    tokens_per_image = visual_token_counts(grid, merge)
    order = _repeated_prompt_image_order(tokens_per_row, tokens_per_image, copies)
    # transformers may hand the prefill the prompts' own image_grid_thw (newer versions encode the images once,
    # before repeating) or the repeated one: describe the repeated images either way
    if request.prompt_inputs.get("image_grid_thw") is not None:
        request.inputs["image_grid_thw"] = request.prompt_inputs["image_grid_thw"][order]
    request.encoded_rows = sum(tokens_per_image[i] for i in order)
    if request.boxes is not None:
        request.boxes = [request.boxes[i] for i in order]
    if request.keep is not None:
        keep = validate_keep(request.keep, sum(tokens_per_image), request.keep.device)  # before slicing it
        request.keep = image_segments(keep, tokens_per_image, order)


def _patched_update_model_kwargs(model: torch.nn.Module, outputs: Any, model_kwargs: dict[str, Any],
                                 *args: Any, **kwargs: Any) -> dict[str, Any]:
    """After the pruned prefill, make generate()'s bookkeeping describe the compacted cache."""
    state = _state_of(model)
    original = _original(state, "_update_model_kwargs_for_generation")
    request = _request_for(state)
    if request is None or not request.generate_kwargs_pending:
        return original(outputs, model_kwargs, *args, **kwargs)
    request.generate_kwargs_pending = False
    pruned = request.pruned
    model_kwargs["attention_mask"] = pruned.attention_mask
    if model_kwargs.get("position_ids") is not None:
        model_kwargs["position_ids"] = pruned.position_ids
    for key in ("mm_token_type_ids", "token_type_ids"):
        if model_kwargs.get(key) is not None:
            model_kwargs[key] = compact_token_values(model_kwargs[key], pruned, 0)
    model_kwargs = original(outputs, model_kwargs, *args, **kwargs)
    positions = model_kwargs.get("position_ids")
    if positions is not None:  # transformers continues at last position + 1; ViToS at max original position + 1
        positions[..., -1:] = _decode_positions(state, pruned, positions, positions.new_zeros(1))
    return model_kwargs


def _patched_get_image_features(base_model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """get_image_features that serves precomputed ImageFeatures during a request that carries them, and records
    how many image tokens were encoded. Calls that encode the request's videos (Qwen3-VL's get_video_features goes
    through get_image_features) are passed through untouched."""
    state = base_model.__dict__.get("_vitos_state")
    request = _request_for(state)
    if request is not None and _encodes_videos(request, args, kwargs):
        request = None
    if request is not None and request.image_features is not None:
        request.encoded_rows = request.image_features.num_tokens
        return request.image_features.output
    previous = state.previous_image_features if state is not None else None
    original = previous if previous is not None else \
        functools.partial(type(base_model).get_image_features, base_model)  # see _original
    output = original(*args, **kwargs)
    if request is not None and hasattr(output, "pooler_output"):
        request.encoded_rows = state.adapter.feature_rows(output)
    return output


def _encodes_videos(request: _Request, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a get_image_features call is encoding the request's video pixels (the very tensor it was given)."""
    videos = request.inputs.get("pixel_values_videos")
    pixels = args[0] if args else kwargs.get("pixel_values")
    return videos is not None and pixels is videos


# ----------------------------------------------------------------------------------------------------------
# the pruning hook on the language model
# ----------------------------------------------------------------------------------------------------------


def _language_model_pre_hook(state: _PatchState, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
    """forward pre-hook (with kwargs) of the language model: prune the prefill of an active request (or, without
    pruning, run a padded batch's prefill packed)."""
    request = _request_for(state)
    if request is None or request.done:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        return None
    if not request.prunes:
        if not args and _packed_prefill_applies(state, request, kwargs):
            _pack_padded_prefill(state, request, kwargs)
            return args, kwargs
        return None
    request.done = True
    if args:
        raise RuntimeError("vitos_ext expects the language model to be called with keyword arguments")
    _prune_language_model_inputs(state, request, kwargs)
    return args, kwargs


@nvtx_annotate("vitos.prune_prefill")
def _prune_language_model_inputs(state: _PatchState, request: _Request, kwargs: dict[str, Any]) -> None:
    """Replace the language model's prefill inputs (in `kwargs`) by the compacted, left-padded batch."""
    model, adapter = state.model, state.adapter
    inputs_embeds = kwargs.get("inputs_embeds")
    input_ids = request.inputs.get("input_ids")
    if inputs_embeds is None or input_ids is None or input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError("token pruning needs the whole prompt (input_ids and its embeddings) in one prefill")
    attention_mask = _prefill_padding_mask(request, kwargs, input_ids.shape[1])
    _repeat_for_generation(state, request)
    visual_mask = input_ids == adapter.image_token_id(model)
    keep, fuse = None, None  # None: every image token stays (only videos are pruned)
    if request.boxes is not None or request.keep is not None:
        keep, fuse = _visual_keep_and_fuse(state, request, visual_mask)
    if request.video_boxes is not None:
        visual_mask, keep = _with_video_tokens(state, request, input_ids, visual_mask, keep)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # what the language model would use itself
        position_ids = torch.arange(input_ids.shape[1], device=inputs_embeds.device).expand(input_ids.shape)
    text_row = adapter.text_position_row and position_ids.dim() == 3 and position_ids.shape[0] == 4
    # transformers already checked that image tokens and features agree: no count re-validation (no read-back)
    pruned = prune_padded_batch(inputs_embeds, attention_mask, position_ids, visual_mask, keep, fuse,
                                text_position_row=text_row, validate=False)
    kwargs.update(inputs_embeds=pruned.inputs_embeds, attention_mask=pruned.attention_mask,
                  position_ids=pruned.position_ids)
    adapter.adjust_language_model_kwargs(kwargs, pruned)
    if _packed_prefill_applies(state, request, kwargs):  # states its own sequence bounds
        _use_packed_layout(state, request, kwargs, pruned.packed_rows, pruned.kept_counts)
    elif pruned.position_ids.dim() == 2 and _packs_by_position(adapter.language_model(model).config):
        kwargs.update(_explicit_sequence_bounds(pruned))
    adapter.set_rope_deltas(model, pruned)
    request.pruned = pruned
    request.generate_kwargs_pending = request.in_generate
    model.__dict__["vitos_last_prefill"] = pruned.without_embeddings()


def _prefill_padding_mask(request: _Request, kwargs: dict[str, Any], length: int) -> torch.Tensor | None:
    """The prefill's 2-D padding mask [B, L] (None: nothing padded). With a preallocated cache (StaticCache, e.g.
    generate(cache_implementation="static")) generate() hands the language model a mask it already expanded to
    4-D [B, 1, L, max_cache_len] (or a dict of them per attention type); its last query row is the padding mask,
    since the prefill starts at an empty cache. The compacted 2-D mask then lets the model rebuild its masks, and
    decoding continues from the compacted cache like with a dynamic one."""
    mask = kwargs.get("attention_mask")
    if mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if not (request.in_generate and getattr(cache, "is_compileable", False)):
        raise ValueError("token pruning needs a 2-D attention mask (custom 4-D masks are not supported)")
    if isinstance(mask, dict):
        if "full_attention" not in mask:
            raise ValueError(f"token pruning cannot read the padding from masks {sorted(mask)}: it needs the "
                             "'full_attention' one")
        mask = mask["full_attention"]
        if mask is None:  # a plain causal mask (SDPA's is_causal path): nothing is padded
            return None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # vitos_varlen's own mask is the padding mask
            return mask[:, -length:]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[2] != length or mask.shape[3] < length:
        raise ValueError(f"token pruning cannot read the padding from a prebuilt mask of type {type(mask).__name__} "
                         f"and shape {tuple(getattr(mask, 'shape', ()))}")
    last_row = mask[:, 0, -1, :length]
    return last_row if last_row.dtype == torch.bool else last_row == 0  # additive masks: 0 where attended


# A batch's prefill runs packed (no padding row) when the language model attends through vitos_varlen: left padding
# to the longest (kept) sequence would make every MLP / projection process padding rows (1.5x the work in the 7B
# batch-of-8 benchmark). The outputs and the KV cache are put back into the left-padded layout afterwards, so callers
# and generate() see exactly the left-padded contract. Tests switch it off to compare the two layouts.
PACKED_PREFILL = True


@dataclass
class _PackedLayout:
    """Where the packed row's tokens go in the left-padded [batch, length] layout: rows = flat indices, sample order."""

    rows: torch.Tensor
    batch: int
    length: int


def _packed_prefill_applies(state: _PatchState, request: _Request, kwargs: dict[str, Any]) -> bool:
    from .hf_attention import HF_ATTENTION_NAME

    embeds = kwargs.get("inputs_embeds")
    if not PACKED_PREFILL or not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[0] < 2:
        return False
    config = state.adapter.language_model(state.model).config
    if getattr(config, "_attn_implementation", None) != HF_ATTENTION_NAME:
        return False
    wants_extra_outputs = any(kwargs.get(name) or request.inputs.get(name) or getattr(config, name, False)
                              for name in ("output_hidden_states", "output_attentions"))
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return not wants_extra_outputs and (cache is None or _is_plain_dynamic_cache(cache))


def _is_plain_dynamic_cache(cache: Any) -> bool:
    """A DynamicCache of DynamicLayers (keys / values [B, H, L, D] grown by concatenation), not offloaded."""
    layers = getattr(cache, "layers", None)
    return (type(cache).__name__ == "DynamicCache" and not getattr(cache, "offloading", False)
            and isinstance(layers, list) and all(type(layer).__name__ == "DynamicLayer" for layer in layers))


def _pack_padded_prefill(state: _PatchState, request: _Request, kwargs: dict[str, Any]) -> None:
    """An unpruned prefill of a padded batch (e.g. the pipeline's first pass): packed when it has padding rows.
    Finding them reads the mask back once."""
    mask = kwargs.get("attention_mask")
    embeds = kwargs["inputs_embeds"]
    if not isinstance(mask, torch.Tensor) or mask.shape != embeds.shape[:2]:
        return
    valid = mask.bool()
    rows = valid.flatten().nonzero().squeeze(1)
    if rows.numel() == valid.numel():  # nothing padded: the padded layout is already packed
        return
    if kwargs.get("position_ids") is None:  # what the language model would use itself
        kwargs["position_ids"] = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[:2])
    _use_packed_layout(state, request, kwargs, rows, valid.sum(1))


def _use_packed_layout(state: _PatchState, request: _Request, kwargs: dict[str, Any], rows: torch.Tensor,
                       counts: torch.Tensor) -> None:
    """Turn the left-padded language-model inputs in `kwargs` (inputs_embeds [B, L, D], position_ids [B, L] or
    [P, B, L]) into one packed row [1, T'] of the `rows` (flat indices, sample order; `counts` [B] per sample) with
    explicit sequence boundaries for the varlen attention; the post-hook restores the left-padded outputs."""
    embeds = kwargs["inputs_embeds"]
    batch, length = embeds.shape[:2]
    cu = cu_seqlens_from_lengths(counts)
    kwargs.update(
        inputs_embeds=embeds.reshape(batch * length, embeds.shape[-1]).index_select(0, rows).unsqueeze(0),
        attention_mask=None,
        position_ids=kwargs["position_ids"].flatten(-2).index_select(-1, rows).unsqueeze(-2),
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=length, max_length_k=length,
    )
    state.adapter.pack_language_model_kwargs(kwargs, rows)
    request.packed_prefill = _PackedLayout(rows, batch, length)


def _language_model_post_hook(state: _PatchState, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
                              output: Any) -> Any:
    """forward hook (with kwargs) of the language model: after a pruned prefill, tag its KV cache (what a follow-up
    generate() needs); after a packed prefill, put the last hidden states and the KV cache back into the
    left-padded [B, L] layout."""
    request = _request_for(state)
    if request is None:
        return None
    if request.pruned is not None and not request.cache_marked:  # the pruned prefill (generate() or forward())
        _mark_pruned_cache(_output_cache(output), request)
        request.cache_marked = True
    layout = request.packed_prefill
    if layout is None:
        return None
    request.packed_prefill = None
    rows, batch, length = layout.rows, layout.batch, layout.length
    hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
    # a model split across devices (device_map) ends on another device than its embeddings, where rows were made
    padded = hidden.new_zeros(batch * length, hidden.shape[-1]).index_copy(0, rows.to(hidden.device), hidden[0])
    padded = padded.view(batch, length, -1)
    cache = _output_cache(output)
    if cache is not None:
        _left_pad_cache(cache, rows, batch, length)
    if isinstance(output, tuple):
        return (padded, *output[1:])
    output.last_hidden_state = padded
    return output


def _left_pad_cache(cache: Any, rows: torch.Tensor, batch: int, new_length: int) -> None:
    """keys / values [1, H, T', D] of every layer -> [B, H, L', D], zeros at the padding positions."""
    if not _is_plain_dynamic_cache(cache):
        raise RuntimeError(f"vitos_ext: the packed prefill produced a {type(cache).__name__}, which it cannot lay out "
                           "as the left-padded batch (set vitos_ext.patching.PACKED_PREFILL = False)")
    coordinates = {rows.device: (rows // new_length, rows % new_length)}
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        for name in ("keys", "values"):
            packed = getattr(layer, name)
            if packed.device not in coordinates:  # layers of a model split across devices (device_map)
                coordinates[packed.device] = tuple(t.to(packed.device) for t in coordinates[rows.device])
            sample, column = coordinates[packed.device]
            padded = packed.new_zeros(batch, packed.shape[1], new_length, packed.shape[3])
            padded[sample, :, column] = packed[0].transpose(0, 1)
            setattr(layer, name, padded)


def _visual_keep_and_fuse(state: _PatchState, request: _Request, visual_mask: torch.Tensor):
    """(keep bool [N], fusion map int64 [N] or None) over the batch's N visual tokens."""
    num_visual = request.encoded_rows
    if num_visual is None:
        num_visual = int(visual_mask.sum())  # features handed to transformers directly: one read-back
    grid_thw, merge_size = state.adapter.visual_grid(state.model, request.inputs, num_visual)
    if request.keep is not None:
        keep = validate_keep(request.keep, num_visual, visual_mask.device)
    else:
        keep = keep_mask_from_boxes(request.boxes, grid_thw, merge_size, request.dilate, num_tokens=num_visual)
    return keep, resolve_fusion(request.fuse, keep, grid_thw, merge_size)


def _with_video_tokens(state: _PatchState, request: _Request, input_ids: torch.Tensor, image_mask: torch.Tensor,
                       image_keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, L] of the image and video tokens, keep bool over them in sequence order): the video tokens inside
    each video's boxes (the same 2-D region in every frame), the image tokens as ``image_keep`` says (None: all)."""
    video_mask = input_ids == state.adapter.video_token_id(state.model)
    grid = request.inputs["video_grid_thw"].to(torch.int64)
    video_keep = keep_mask_from_boxes(request.video_boxes, grid, state.adapter.merge_size(state.model),
                                      request.dilate, num_tokens=int(video_mask.sum()))
    # both keep masks list their tokens in row-major [B, L] order: scatter them onto the sequence, read back the
    # prunable positions
    token_keep = torch.ones_like(input_ids, dtype=torch.bool).masked_scatter_(video_mask, video_keep)
    if image_keep is not None:
        token_keep.masked_scatter_(image_mask, image_keep)
    visual_mask = image_mask | video_mask
    return visual_mask, token_keep[visual_mask]


def _explicit_sequence_bounds(pruned: PrunedBatch) -> dict[str, Any]:
    """FlashAttention-style kernels read non-consecutive 1-D positions as packed sequences when nothing is padded;
    pruned positions have gaps, so state the (one per row) sequence boundaries explicitly."""
    batch, new_length = pruned.attention_mask.shape
    cu = torch.arange(batch + 1, dtype=torch.int32, device=pruned.attention_mask.device) * new_length
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=new_length, max_length_k=new_length)


def _packs_by_position(config: Any) -> bool:
    implementation = str(getattr(config, "_attn_implementation", "") or "")
    return "flash" in implementation or implementation == "vitos_varlen"


# ----------------------------------------------------------------------------------------------------------
# class-level patching (before loading)
# ----------------------------------------------------------------------------------------------------------

_CLASS_PATCHES: dict[type, dict[str, Any]] = {}


def apply_to_classes(adapter: VLMAdapter, attention: str = "auto", fused_layers: str = "auto") -> None:
    """Patch a family's model classes so that every instance constructed afterwards (from_pretrained,
    _from_config, ...) is patch_model'ed right after its __init__. Idempotent (new modes replace the old)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    _check_fused_layers(fused_layers)
    for cls in adapter.model_classes():
        if cls in _CLASS_PATCHES:
            _CLASS_PATCHES[cls].update(attention=attention, fused_layers=fused_layers)
            continue
        original_init = cls.__dict__.get("__init__", cls.__init__)
        _CLASS_PATCHES[cls] = {"init": original_init, "attention": attention, "fused_layers": fused_layers,
                               "had_own_init": "__init__" in cls.__dict__}

        @functools.wraps(original_init)
        def __init__(self, *args, _vitos_cls=cls, _vitos_init=original_init, **kwargs):
            _vitos_init(self, *args, **kwargs)
            patch = _CLASS_PATCHES.get(_vitos_cls)
            if patch is not None and not is_patched(self):
                patch_model(self, patch["attention"], patch["fused_layers"])

        cls.__init__ = __init__


def revert_classes(adapter: VLMAdapter) -> None:
    """Undo apply_to_classes for a family (instances created meanwhile stay patched: use unpatch_model)."""
    for cls in adapter.model_classes():
        patch = _CLASS_PATCHES.pop(cls, None)
        if patch is None:
            continue
        if patch["had_own_init"]:
            cls.__init__ = patch["init"]
        else:
            del cls.__init__


