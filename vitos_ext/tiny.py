"""A tiny Qwen2.5-VL built entirely offline: tokenizer, processor, config and model.

Used by tests, the demo and the CPU training preset. Nothing here downloads anything: the tokenizer is built in
memory from a fixed vocabulary, the architecture comes from ``vitos_ext/configs/tiny_qwen2_5_vl.json`` (package
data) and weights are randomly initialized from a seed.

Tokenizer: a BPE model without merges and with ``ignore_merges`` -- every whole word in the vocabulary is one token,
any other ASCII word falls back to characters, and each space, digit and punctuation mark is its own token.
Decoding concatenates tokens, so text (including the output contract, whose tags are single tokens) round-trips
exactly. Characters outside printable ASCII become ``<unk>``.

Processor: Qwen2.5-VL's processor needs a video processor, which needs torchvision; images are all ViToS uses, so
:class:`Qwen2_5_VLImageTextProcessor` is the stock ``Qwen2_5_VLProcessor`` without the video part (it also
guarantees ``mm_token_type_ids``, which transformers 5.x Qwen2.5-VL needs to compute M-RoPE positions).
"""

from __future__ import annotations

import copy
import json
import os
import string
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from .data.phantom import phantom_vocabulary

__all__ = [
    "TINY_CONFIG_PATH",
    "SPECIAL_TOKENS",
    "CONTRACT_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "Qwen2_5_VLImageTextProcessor",
    "build_tiny_tokenizer",
    "tiny_qwen2_5_vl_config",
    "build_tiny_image_processor",
    "build_tiny_processor",
    "build_tiny_model",
    "add_mm_token_type_ids",
    "save_tiny_assets",
    "load_tiny_assets",
    "load_vl_processor",
    "load_tiny_model",
]

TINY_CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "tiny_qwen2_5_vl.json"

# Qwen2.5-VL's special tokens (same strings, so prompts and templates carry over to real checkpoints)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# the output contract's tags: ordinary (not special) tokens, so decoding with skip_special_tokens keeps them
CONTRACT_TOKENS = ("<think>", "</think>", "<box>", "</box>", "<answer>", "</answer>")
UNK_TOKEN = "<unk>"

# Words beyond the phantom task: chat roles, prompt instructions and common radiology vocabulary. Appending
# words changes token ids, so keep this list append-only and regenerate the shipped config when it changes.
_EXTRA_WORDS = """
system user assistant You are a helpful medical AI Question Options Answer Think first then find the evidence
regions as boxes and answer with only option letter Output format box boxes normalized coordinates image shows
this that is in of on at to for from by no yes No Yes The This There which Which what What kind type shown seen
CT MRI X ray scan slice chest lung lungs brain liver kidney heart abdomen bone spine normal abnormal finding
findings lesion lesions nodule mass cyst tumor fracture effusion pneumonia edema opacity consolidation hemorrhage
calcification enhancing ring bright dark round left right upper lower middle central region area most likely
diagnosis patient
""".split()

# No whitespace control ("{%-") on purpose: the template has no incidental whitespace, and "-" would eat the
# newlines that belong to Qwen's layout.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vocabulary() -> dict[str, int]:
    """Fixed token -> id map: special tokens, contract tags, unk, printable ASCII characters, then words."""
    ordered = [*SPECIAL_TOKENS, *CONTRACT_TOKENS, UNK_TOKEN, *string.printable, *phantom_vocabulary(), *_EXTRA_WORDS]
    vocab: dict[str, int] = {}
    for token in ordered:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tiny_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Build the tiny word/character tokenizer (vocabulary < 512) with Qwen2.5-VL's special tokens.

    ``<think>``, ``</think>``, ``<box>``, ``</box>``, ``<answer>``, ``</answer>`` are single, non-special tokens.
    eos = ``<|im_end|>``, pad = ``<|endoftext|>``, no bos is added (as in Qwen2.5). The chat template renders an
    image part as ``<|vision_start|><|image_pad|><|vision_end|>``.

    Args:
        padding_side: "left" (default, what batched generation needs) or "right".
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    backend = Tokenizer(models.BPE(vocab=_vocabulary(), merges=[], unk_token=UNK_TOKEN, ignore_merges=True))
    # words, then every single whitespace / digit / punctuation character on its own
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\s|[^A-Za-z\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, UNK_TOKEN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in CONTRACT_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=UNK_TOKEN,
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side=padding_side,
        model_max_length=4096,
    )


# ----------------------------------------------------------------------------------------------------------------
# config


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    unk = tokenizer.unk_token_id
    missing = [token for token, index in ids.items() if index is None or (index == unk and token != UNK_TOKEN)]
    if missing:
        raise ValueError(f"tokenizer lacks the Qwen2.5-VL special tokens {missing}")
    return ids


def _merge_overrides(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    known = set(Qwen2_5_VLConfig().to_dict()) | {"text_config", "vision_config"}
    for key, value in overrides.items():
        if key in ("text_config", "vision_config"):
            if not isinstance(value, dict):
                raise ValueError(f"{key} override must be a dict, got {type(value).__name__}")
            merged[key] = {**merged.get(key, {}), **value}
        elif key in known:
            merged[key] = value
        else:
            raise ValueError(
                f"unknown Qwen2.5-VL config key {key!r}; text/vision sizes go in text_config=/vision_config="
            )
    return merged


def _tiny_config_dict(tokenizer) -> dict:
    """The tiny architecture with token ids taken from ``tokenizer`` (the JSON's source of truth)."""
    ids = _token_ids(tokenizer)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "use_sliding_window": False,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        # 56 px windows = 2x2 merged tokens: a 112 px image has 4 windows, so windowed attention really runs
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    }
    return {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def tiny_qwen2_5_vl_config(tokenizer=None, **overrides) -> Qwen2_5_VLConfig:
    """The tiny Qwen2.5-VL config, read from the shipped ``configs/tiny_qwen2_5_vl.json``.

    Text: hidden 64, 2 layers, 4 heads / 2 KV heads (head_dim 16, mrope_section [2, 3, 3]); vision: depth 2,
    hidden 32, patch 14, spatial merge 2, 56 px windows with layer 1 full attention, out_hidden_size 64.

    Args:
        tokenizer: the tokenizer the model will use; its size and special-token ids must match the shipped
            config (a mismatch is an error). Default: :func:`build_tiny_tokenizer`.
        **overrides: top-level config keys, or ``text_config={...}`` / ``vision_config={...}`` dicts merged into
            the sub-configs (e.g. ``text_config={"hidden_size": 128, "num_hidden_layers": 4}``).
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    shipped = json.loads(TINY_CONFIG_PATH.read_text())
    expected = _tiny_config_dict(tokenizer)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if shipped.get(key) != expected[key]:
            raise ValueError(f"{TINY_CONFIG_PATH.name}: {key}={shipped.get(key)} but the tokenizer has {expected[key]}")
    if shipped["text_config"].get("vocab_size") != expected["text_config"]["vocab_size"]:
        raise ValueError(
            f"{TINY_CONFIG_PATH.name}: vocab_size={shipped['text_config'].get('vocab_size')} but the tokenizer has "
            f"{expected['text_config']['vocab_size']} tokens"
        )
    merged = _merge_overrides(shipped, overrides)
    merged.pop("model_type", None)
    architectures = merged.pop("architectures", None)
    if merged["vision_config"].get("out_hidden_size") != merged["text_config"].get("hidden_size"):
        merged["vision_config"]["out_hidden_size"] = merged["text_config"]["hidden_size"]  # merger feeds the LM
    config = Qwen2_5_VLConfig(**merged)
    config.architectures = architectures
    return config


# ----------------------------------------------------------------------------------------------------------------
# processor


def add_mm_token_type_ids(batch, image_token_id: int, video_token_id: int | None = None):
    """Add ``mm_token_type_ids`` (0 text, 1 image pad, 2 video pad) to a processor output that lacks them.

    Qwen2.5-VL in transformers 5.x computes its 3-D M-RoPE positions at prefill only when this field is given.

    Args:
        batch: a mapping with ``input_ids`` (int tensor [B, L]); modified in place and returned.
        image_token_id / video_token_id: ids of ``<|image_pad|>`` / ``<|video_pad|>``.
    """
    if "mm_token_type_ids" in batch and batch["mm_token_type_ids"] is not None:
        return batch
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError("batch must hold input_ids as a tensor (call the processor with return_tensors='pt')")
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = 1
    if video_token_id is not None:
        types[input_ids == video_token_id] = 2
    batch["mm_token_type_ids"] = types
    return batch


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only (no video processor, hence no torchvision needed).

    Behaves like the stock processor for image + text input and always returns ``mm_token_type_ids`` when
    tensors are returned. Load saved ones with :func:`load_vl_processor` (or this class's ``from_pretrained``).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    def __call__(self, *args, **kwargs):
        if kwargs.get("videos") is not None:
            raise ValueError("videos: this processor handles images and text only")
        outputs = super().__call__(*args, **kwargs)
        if isinstance(outputs.get("input_ids"), torch.Tensor):
            add_mm_token_type_ids(outputs, self.image_token_id, self.video_token_id)
        return outputs


def _image_processor_class():
    # transformers 5.x: Qwen2VLImageProcessorPil needs no torchvision; the default class falls back to it anyway
    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


def build_tiny_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 224 * 224):
    """Qwen2-VL image processor (patch 14, temporal patch 2, merge 2) resizing into [min_pixels, max_pixels].

    Images are resized to multiples of 28 px with their area kept within the bounds (Qwen2-VL's smart resize).
    """
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if not isinstance(value, int) or value < 28 * 28:
            raise ValueError(f"{name} must be an int >= {28 * 28} (one merged token), got {value!r}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    return _image_processor_class()(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )


def build_tiny_processor(
    min_pixels: int = 56 * 56, max_pixels: int = 224 * 224, tokenizer=None
) -> Qwen2_5_VLImageTextProcessor:
    """Processor for the tiny model: :func:`build_tiny_image_processor` + :func:`build_tiny_tokenizer`.

    Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (int64 [B, L]), ``pixel_values``
    (float32 [sum of t*h*w patches, 3*2*14*14]) and ``image_grid_thw`` (int64 [n_images, 3]).
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return Qwen2_5_VLImageTextProcessor(
        image_processor=build_tiny_image_processor(min_pixels, max_pixels),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


# ----------------------------------------------------------------------------------------------------------------
# model


def _generation_config(config: Qwen2_5_VLConfig) -> GenerationConfig:
    text = config.text_config
    return GenerationConfig(
        eos_token_id=[text.eos_token_id, text.pad_token_id],  # <|im_end|>, <|endoftext|>
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        do_sample=False,
    )


def build_tiny_model(
    seed: int = 0,
    config: Qwen2_5_VLConfig | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialized tiny ``Qwen2_5_VLForConditionalGeneration`` (about 0.2M parameters), in eval mode.

    Initialization depends only on ``seed`` (the global torch RNG is left untouched).

    Args:
        seed: initialization seed.
        config: default :func:`tiny_qwen2_5_vl_config`.
        dtype: parameter dtype.
        attn_implementation: "sdpa" or "eager".
    """
    config = config if config is not None else tiny_qwen2_5_vl_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.generation_config = _generation_config(model.config)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# save / load


def save_tiny_assets(directory: str | os.PathLike, processor=None, config=None, model=None) -> Path:
    """Write a self-contained checkpoint folder: processor (tokenizer, chat template, image processor), config,
    generation config and, when ``model`` is given, its weights (``model.save_pretrained``).

    Defaults build the tiny processor/config. Returns the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor = processor if processor is not None else build_tiny_processor()
    processor.save_pretrained(directory)
    if model is not None:
        model.save_pretrained(directory)
    else:
        config = config if config is not None else tiny_qwen2_5_vl_config(processor.tokenizer)
        config.save_pretrained(directory)
        _generation_config(config).save_pretrained(directory)
    return directory


def load_vl_processor(directory: str | os.PathLike):
    """Load a Qwen2-VL / Qwen2.5-VL processor from a local folder, offline.

    Tries ``AutoProcessor`` first (a real checkpoint with torchvision installed) and falls back to
    :class:`Qwen2_5_VLImageTextProcessor` (image + text only, no torchvision), which also reads folders written by
    :func:`save_tiny_assets`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory: no such folder {directory}")
    processor_config = directory / "processor_config.json"
    saved_class = None
    if processor_config.is_file():
        saved_class = json.loads(processor_config.read_text()).get("processor_class")
    if saved_class != Qwen2_5_VLImageTextProcessor.__name__:
        try:
            processor = transformers.AutoProcessor.from_pretrained(directory, local_files_only=True)
        except (ImportError, ValueError, TypeError, OSError, AttributeError):
            processor = None  # typically: no torchvision for the video processor
        # AutoProcessor returns a bare tokenizer when the folder has no processor config
        if processor is not None and hasattr(processor, "image_processor"):
            return processor
    return Qwen2_5_VLImageTextProcessor.from_pretrained(directory, local_files_only=True)


def load_tiny_assets(directory: str | os.PathLike):
    """Read back what :func:`save_tiny_assets` wrote: ``(processor, config)``."""
    directory = Path(directory)
    processor = load_vl_processor(directory)
    config = Qwen2_5_VLConfig.from_pretrained(directory, local_files_only=True)
    return processor, config


def load_tiny_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load ``(model, processor)`` from a folder written by :func:`save_tiny_assets` with a model, offline."""
    directory = Path(directory)
    processor = load_vl_processor(directory)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=dtype, local_files_only=True)
    return model.eval(), processor


if __name__ == "__main__":  # regenerate the shipped config after changing the vocabulary or the architecture
    TINY_CONFIG_PATH.parent.mkdir(parents=True, exist_ok=True)
    TINY_CONFIG_PATH.write_text(json.dumps(_tiny_config_dict(build_tiny_tokenizer()), indent=2) + "\n")
    print(f"wrote {TINY_CONFIG_PATH}")
