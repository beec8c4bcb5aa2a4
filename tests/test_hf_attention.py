"""attn_implementation="vitos_varlen" in transformers: same logits / tokens as "eager" on tiny random models.

Models are built offline from configs (no download). Padding positions are excluded from logit comparisons:
eager attends padded query rows to garbage, varlen attention returns 0 there, and neither is used downstream.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from vitos_ext.hf_attention import (  # noqa: E402
    HF_ATTENTION_NAME,
    register_hf_attention,
    vitos_varlen_attention_forward,
    vitos_varlen_mask,
)
from vitos_ext.ops.attention import triton_available  # noqa: E402

BOS, EOS, PAD = 0, 1, 2
IMAGE, VIDEO, VISION_START, VISION_END = 100, 101, 102, 103
HF_BACKENDS = ["reference"] + (["triton"] if triton_available("cpu") else [])
TOL = 1e-4


@pytest.fixture(autouse=True)
def _registered():
    register_hf_attention()
    yield
    register_hf_attention()  # restore the default backend for other tests


def tiny_qwen2_5_vl() -> Qwen2_5_VLForConditionalGeneration:
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS,
                pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    # window_size 112 px = 4x4 merged tokens per window with 14 px patches and merge 2: the 6x4-token image below
    # is split into windows of different sizes; block 1 is a full-attention block
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, out_hidden_size=64, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, bos_token_id=BOS,
                              eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager",
                                                           dtype=torch.float32).eval()


def left_padded_vl_batch():
    """Two prompts with one image each (grids 1x12x8 and 1x8x8 patches -> 24 and 16 tokens), left-padded."""
    grid_thw = torch.tensor([[1, 12, 8], [1, 8, 8]])
    gen = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(int(grid_thw.prod(dim=1).sum()), 3 * 2 * 14 * 14, generator=gen)
    prompts = [
        [BOS, 5, 6, 7, VISION_START] + [IMAGE] * 24 + [VISION_END, 8, 9, 10, 11, 12],
        [BOS, 13, VISION_START] + [IMAGE] * 16 + [VISION_END, 14, 15],
    ]
    length = max(map(len, prompts))
    input_ids = torch.full((2, length), PAD)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                image_grid_thw=grid_thw, mm_token_type_ids=(input_ids == IMAGE).int())


@pytest.fixture(scope="module")
def vl_model():
    return tiny_qwen2_5_vl()


def _with_attention(model, name):
    model.set_attn_implementation(name)
    assert model.config.vision_config._attn_implementation == name
    return model


@pytest.mark.parametrize("backend", HF_BACKENDS)
def test_qwen2_5_vl_logits_match_eager_on_left_padded_batch(vl_model, backend):
    inputs = left_padded_vl_batch()
    with torch.no_grad():
        want = _with_attention(vl_model, "eager")(**inputs).logits
        register_hf_attention(backend=backend)
        got = _with_attention(vl_model, HF_ATTENTION_NAME)(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=TOL)


@pytest.mark.parametrize("backend", HF_BACKENDS)
def test_qwen2_5_vl_greedy_generation_matches_eager(vl_model, backend):
    """Prefill with padding, then single-token decode steps against the KV cache (lq=1 < lk)."""
    _check_greedy_generation_matches_eager(vl_model, backend, left_padded_vl_batch())


def _check_greedy_generation_matches_eager(model, backend, inputs, **generate_kwargs):
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  **generate_kwargs)
    with torch.no_grad():
        want = _with_attention(model, "eager").generate(**inputs, **kwargs)
        register_hf_attention(backend=backend)
        got = _with_attention(model, HF_ATTENTION_NAME).generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.logits, want.logits):
        torch.testing.assert_close(step_got, step_want, rtol=0, atol=TOL)


def _first_prompt(inputs):
    """Row 0 of left_padded_vl_batch alone: a batch with no padding at all."""
    return dict(input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1],
                pixel_values=inputs["pixel_values"][:96], image_grid_thw=inputs["image_grid_thw"][:1],
                mm_token_type_ids=inputs["mm_token_type_ids"][:1])


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("backend", HF_BACKENDS)
def test_static_cache_generation_matches_eager(vl_model, backend, padded):
    """A StaticCache hands the attention all max_cache_len slots, most of them not written yet: only the slots that
    hold tokens may be attended, also when nothing is padded (no 2-D mask at all)."""
    inputs = left_padded_vl_batch()
    inputs = inputs if padded else _first_prompt(inputs)
    _check_greedy_generation_matches_eager(vl_model, backend, inputs, cache_implementation="static")


# ----------------------------------------------------------------------------------------------------------
# packed batches and direct calls (tiny Qwen2 text model)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def _separate_logits(lm, sequences):
    lm.set_attn_implementation("eager")
    with torch.no_grad():
        return torch.cat([lm(input_ids=torch.tensor([s])).logits[0] for s in sequences])


PACKED = [[BOS, 5, 9, 14, 3, 7, 21], [BOS, 40], [BOS, 8, 8, 30, 31]]


def test_packed_by_position_ids_matches_separate_sequences(lm):
    want = _separate_logits(lm, PACKED)
    input_ids = torch.tensor([sum(PACKED, [])])
    position_ids = torch.tensor([sum((list(range(len(s))) for s in PACKED), [])])
    lm.set_attn_implementation(HF_ATTENTION_NAME)
    with torch.no_grad():
        got = lm(input_ids=input_ids, position_ids=position_ids).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_packed_by_cu_seq_lens_matches_separate_sequences(lm):
    want = _separate_logits(lm, PACKED)
    lengths = torch.tensor([len(s) for s in PACKED])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    position_ids = torch.tensor([sum((list(range(len(s))) for s in PACKED), [])])
    lm.set_attn_implementation(HF_ATTENTION_NAME)
    with torch.no_grad():
        got = lm(input_ids=torch.tensor([sum(PACKED, [])]), position_ids=position_ids, cu_seq_lens_q=cu,
                 cu_seq_lens_k=cu, max_length_q=int(lengths.max()), max_length_k=int(lengths.max())).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


class _Module(torch.nn.Module):
    is_causal = True
    layer_idx = 0

    def __init__(self, attn_implementation):
        super().__init__()
        self.config = Qwen2Config(attn_implementation=attn_implementation)


def _sdpa_with_mask(query, key, value, allowed):
    group = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=allowed)
    return out.transpose(1, 2)


def test_single_token_decode_with_left_padding():
    torch.manual_seed(2)
    batch, len_k, dim = 3, 9, 64
    query = torch.randn(batch, 4, 1, dim)
    key, value = torch.randn(batch, 2, len_k, dim), torch.randn(batch, 2, len_k, dim)
    padding = torch.ones(batch, len_k, dtype=torch.bool)
    padding[0, :4] = False
    padding[2, :1] = False
    mask = vitos_varlen_mask(batch_size=batch, q_length=1, kv_length=len_k, attention_mask=padding)
    got, weights = vitos_varlen_attention_forward(_Module(HF_ATTENTION_NAME), query, key, value, mask)
    assert weights is None and got.shape == (batch, 1, 4, dim)
    want = _sdpa_with_mask(query, key, value, padding[:, None, None, :])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_chunked_prefill_against_cache_is_bottom_right_causal():
    torch.manual_seed(3)
    len_q, len_k, dim = 3, 8, 64
    query = torch.randn(2, 4, len_q, dim)
    key, value = torch.randn(2, 4, len_k, dim), torch.randn(2, 4, len_k, dim)
    got, _ = vitos_varlen_attention_forward(_Module(HF_ATTENTION_NAME), query, key, value, None)
    allowed = torch.arange(len_k)[None, :] <= torch.arange(len_q)[:, None] + (len_k - len_q)
    torch.testing.assert_close(got, _sdpa_with_mask(query, key, value, allowed), rtol=0, atol=1e-5)


def test_four_d_mask_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(4)
    query, key, value = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    custom = torch.rand(1, 1, 5, 5) > 0.3
    custom[..., 0] = True
    module = _Module(HF_ATTENTION_NAME)
    got, _ = vitos_varlen_attention_forward(module, query, key, value, custom)
    want, _ = sdpa_attention_forward(module, query, key, value, custom)
    torch.testing.assert_close(got, want)


def test_unsupported_features_raise():
    query = key = value = torch.randn(1, 2, 4, 64)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        vitos_varlen_attention_forward(_Module(HF_ATTENTION_NAME), query, key, value, None, sliding_window=2)
    with pytest.raises(NotImplementedError, match="dropout"):
        vitos_varlen_attention_forward(_Module(HF_ATTENTION_NAME), query, key, value, None, dropout=0.1)


def test_output_attentions_says_there_are_no_weights(caplog):
    from vitos_ext import hf_attention

    hf_attention._warn_no_attention_weights.cache_clear()
    query = key = value = torch.randn(1, 2, 4, 64)
    with caplog.at_level("WARNING", logger="vitos_ext.hf_attention"):
        out, weights = vitos_varlen_attention_forward(_Module(HF_ATTENTION_NAME), query, key, value, None,
                                                      output_attentions=True)
        vitos_varlen_attention_forward(_Module(HF_ATTENTION_NAME), query, key, value, None, output_attentions=True)
    assert weights is None and out.shape == (1, 4, 2, 64)
    assert [r.getMessage() for r in caplog.records].count(
        "vitos_varlen attention does not return attention weights (output_attentions=True gives none); load the "
        "model with attn_implementation='eager' to get them") == 1  # once per process


def padded_to(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_zeros(mask.shape[0], length - mask.shape[1])], 1)


def test_mask_function_returns_padding_mask_or_none():
    full = torch.ones(2, 6, dtype=torch.bool)
    assert vitos_varlen_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=full) is None
    assert vitos_varlen_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=None) is None
    padded = full.clone()
    padded[1, :3] = False
    got = vitos_varlen_mask(batch_size=2, q_length=1, kv_length=4, attention_mask=padded.long())
    assert got.dtype == torch.bool and torch.equal(got, padded[:, -4:])
    # padding that lies outside the last kv_length columns does not matter
    assert vitos_varlen_mask(batch_size=2, q_length=1, kv_length=3, attention_mask=padded) is None
    # a StaticCache (10 slots; its offset comes as a tensor): a 4-D boolean SDPA mask over the slots, built on the
    # device, that never lets a query see a slot past the tokens written so far
    slots = torch.arange(10)
    got = vitos_varlen_mask(batch_size=2, q_length=6, kv_length=10, q_offset=0, attention_mask=None)
    causal = slots[None, :] <= torch.arange(6)[:, None]
    assert got.shape == (2, 1, 6, 10) and torch.equal(got, causal.expand(2, 1, 6, 10))
    got = vitos_varlen_mask(batch_size=2, q_length=6, kv_length=10, q_offset=torch.tensor(0), attention_mask=full,
                            allow_is_causal_skip=True)  # no padding: still materialized
    assert torch.equal(got, causal.expand(2, 1, 6, 10))
    got = vitos_varlen_mask(batch_size=2, q_length=1, kv_length=10, q_offset=torch.tensor(5), attention_mask=padded)
    assert got.shape == (2, 1, 1, 10) and torch.equal(got[:, 0, 0], padded_to(padded, 10))


def test_registration_is_idempotent_and_validated():
    assert register_hf_attention() == register_hf_attention() == HF_ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[HF_ATTENTION_NAME] is vitos_varlen_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[HF_ATTENTION_NAME] is vitos_varlen_mask
    with pytest.raises(ValueError, match="backend"):
        register_hf_attention(backend="nope")


@pytest.mark.parametrize("backend", HF_BACKENDS)
def test_training_gradients_match_eager_on_left_padded_batch(lm, backend):
    """Backward through unpad -> varlen attention -> pad back (the Triton backward kernels on that backend)."""
    input_ids = torch.tensor([[PAD, PAD, PAD, BOS, 7, 9, 11, 4], [BOS, 3, 5, 8, 13, 21, 34, 55]])
    attention_mask = (input_ids != PAD).long()
    # a label is predicted from the previous position: the first real token of a left-padded row is predicted
    # from a padding row (whose output is arbitrary in eager and 0 here), so it is excluded like the padding
    predicted_from_padding = torch.nn.functional.pad(attention_mask[:, :-1], (1, 0)) == 0
    labels = input_ids.masked_fill(predicted_from_padding, -100)

    def parameter_grads(name):
        lm.set_attn_implementation(name)
        lm.zero_grad(set_to_none=True)
        lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    want = parameter_grads("eager")
    register_hf_attention(backend=backend)
    got = parameter_grads(HF_ATTENTION_NAME)
    lm.zero_grad(set_to_none=True)
    assert got.keys() == want.keys() and any("self_attn.q_proj" in n for n in got)
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12)).item()
        assert err <= TOL, f"{name}: relative gradient error {err:.3g}"


def test_vision_windows_in_one_call_match_per_window_loop():
    """The call Qwen2.5-VL's vision attention makes when it passes cu_seqlens (one varlen call per layer)."""
    torch.manual_seed(5)
    windows = [16, 16, 8, 16, 4]
    query, key, value = (torch.randn(1, 2, sum(windows), 80) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(windows).cumsum(0).tolist()], dtype=torch.int32)
    module = _Module(HF_ATTENTION_NAME)
    got, _ = vitos_varlen_attention_forward(module, query, key, value, None, scaling=0.1, is_causal=False,
                                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=16, max_length_k=16)
    splits = [t.split(windows, dim=2) for t in (query, key, value)]
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1).transpose(1, 2)
                      for q, k, v in zip(*splits)], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_unpad_plan_is_shared_by_layers_and_follows_the_mask(monkeypatch):
    """One nonzero (host sync) per mask object, not per layer; an in-place edit or another mask recomputes."""
    import vitos_ext.hf_attention as hf_attention
    from vitos_ext._tensor_memo import TensorMemo

    monkeypatch.setattr(hf_attention, "_unpad_plans", TensorMemo())
    plan = hf_attention._unpad_plan
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    first = plan(mask, 4, 4)
    assert plan(mask, 4, 4) is first
    assert first[0].tolist() == [1, 2, 3, 4, 5, 6, 7] and first[1].tolist() == [0, 3, 7]
    decode = plan(mask, 1, 4)  # other lengths: another plan
    assert decode[0].tolist() == [0, 1] and decode[1].tolist() == [0, 1, 2] and decode[3].tolist() == [0, 3, 7]
    mask[1, 0] = 0  # in place: the version counter moves
    assert plan(mask, 4, 4)[1].tolist() == [0, 3, 6]
    other = mask.clone()
    assert plan(other, 4, 4) is not plan(mask, 4, 4)


def test_unpad_gathers_cache_layout_rows_without_flattening_the_cache():
    """K/V from a KV cache are [B, H, L, D] storage seen as [B, L, H, D]: gathered by (batch, position) in one index
    op, the same rows as flattening first; plain [B, L, H, D] rows keep the flat index_select."""
    import vitos_ext.hf_attention as hf_attention
    from op_recorder import RecordOps

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    indices_q, _, indices_k, _, coords_q, coords_k = hf_attention._unpad_plan(mask, 1, 5)
    assert indices_q.tolist() == [0, 1, 2] and [c.tolist() for c in coords_q] == [[0, 1, 2], [0, 0, 0]]
    cache = torch.randn(3, 2, 5, 4)  # [B, Hk, L, D], as the cache stores it
    key = cache.transpose(1, 2)
    want = key.reshape(-1, 2, 4).index_select(0, indices_k)

    with RecordOps() as ops:
        got = hf_attention._gather_rows(key, indices_k, coords_k)
    assert torch.equal(got, want) and got.is_contiguous()
    assert "clone" not in ops.names and "_unsafe_view" not in ops.names  # no copy of the whole cache first
    rows = torch.randn(3, 5, 2, 4)
    assert torch.equal(hf_attention._gather_rows(rows, indices_k, coords_k), rows.reshape(-1, 2, 4)[indices_k])


def test_tensor_memo_keys_on_identity_version_and_extra_and_skips_failures():
    from vitos_ext._tensor_memo import TensorMemo

    memo = TensorMemo(capacity=2)
    a, b, c = torch.zeros(3), torch.ones(3), torch.ones(3)
    calls = []
    compute = lambda value: lambda: calls.append(value) or value  # noqa: E731
    assert memo.get((a,), "x", compute(1)) == 1 and memo.get((a,), "x", compute(9)) == 1
    assert memo.get((b,), "x", compute(2)) == 2 and memo.get((a,), "x", compute(9)) == 1  # capacity 2 keeps both
    assert memo.get((a,), "y", compute(3)) == 3  # another extra key
    assert memo.get((c,), "x", compute(4)) == 4  # an equal but different tensor
    assert calls == [1, 2, 3, 4]
    b.add_(1)  # in place: stale
    assert memo.lookup((b,), "x") == (False, None)

    def failing():
        raise ValueError("bad offsets")

    with pytest.raises(ValueError, match="bad offsets"):
        memo.get((a,), "z", failing)
    assert memo.lookup((a,), "z") == (False, None)  # a failed computation is never remembered
    with pytest.raises(ValueError, match="capacity"):
        TensorMemo(capacity=0)


def test_tensor_memo_on_inference_tensors_lasts_one_forward():
    """Inference tensors have no version counter (reading it raises): their entries hold until the next forward
    begins (the mask function marks it), so a buffer refilled in place between forwards is never read stale."""
    from vitos_ext._tensor_memo import TensorMemo, begin_forward

    memo = TensorMemo()
    with torch.inference_mode():
        mask = torch.ones(2, 3, dtype=torch.bool)
        assert memo.get((mask,), None, lambda: "first") == "first"
        assert memo.lookup((mask,), None) == (True, "first")  # the other layers of the same forward
        begin_forward()
        mask[0, 0] = False  # refilled in place for the next forward: not visible to a version counter
        assert memo.lookup((mask,), None) == (False, None)
        assert memo.get((mask,), None, lambda: "second") == "second"
    plain = torch.ones(3)
    memo.store((plain,), None, "kept")
    begin_forward()  # ordinary tensors keep their entries across forwards (their version counter guards them)
    assert memo.lookup((plain,), None) == (True, "kept")


def test_caller_packing_is_checked_once_per_forward_also_for_int64_offsets(monkeypatch):
    """Every layer gets the same cu_seq_lens objects: the first converts them to int32 and checks their values
    (a host sync), the others reuse that; offsets that fail the check are never remembered."""
    import vitos_ext.hf_attention as hf_attention
    from vitos_ext._tensor_memo import TensorMemo

    monkeypatch.setattr(hf_attention, "_validated_packings", TensorMemo())
    checks, real = [], hf_attention.varlen_attention

    def recording(*args, check_values=True, **kwargs):
        checks.append((args[3].dtype, check_values))
        return real(*args, check_values=check_values, **kwargs)

    monkeypatch.setattr(hf_attention, "varlen_attention", recording)
    torch.manual_seed(6)
    query, key, value = (torch.randn(1, 2, 12, 16) for _ in range(3))
    module = _Module(HF_ATTENTION_NAME)
    cu = torch.tensor([0, 5, 12])  # int64, as a data collator may hand it over

    def layer(offsets, longest=7):
        return vitos_varlen_attention_forward(module, query, key, value, None, scaling=0.25, is_causal=True,
                                              cu_seq_lens_q=offsets, cu_seq_lens_k=offsets,
                                              max_length_q=longest, max_length_k=longest)[0]

    first, second = layer(cu), layer(cu)
    assert checks == [(torch.int32, True), (torch.int32, False)]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    bad = torch.tensor([0, 5, 11])  # last offset != rows
    for _ in range(2):
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            layer(bad)
    assert checks[2:] == [(torch.int32, True), (torch.int32, True)]


def test_tensor_max_lengths_are_read_once_per_forward(monkeypatch):
    """max_length_q/k given as tensors: one host read for every layer of a forward; new tensors are read again."""
    import vitos_ext.hf_attention as hf_attention
    from vitos_ext._tensor_memo import TensorMemo

    monkeypatch.setattr(hf_attention, "_max_lengths", TensorMemo())
    reads = []

    class CountingTensor(torch.Tensor):
        def __int__(self):
            reads.append(1)
            return super().__int__()

    torch.manual_seed(7)
    query, key, value = (torch.randn(1, 2, 12, 16) for _ in range(3))
    module = _Module(HF_ATTENTION_NAME)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    longest_q, longest_k = (torch.tensor(7).as_subclass(CountingTensor) for _ in range(2))

    def layer(max_q, max_k):
        return vitos_varlen_attention_forward(module, query, key, value, None, scaling=0.25, is_causal=True,
                                              cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_q,
                                              max_length_k=max_k)[0]

    want = layer(7, 7)
    for _ in range(3):
        torch.testing.assert_close(layer(longest_q, longest_k), want, rtol=0, atol=0)
    assert len(reads) == 2  # one read of each tensor for all three "layers"
    layer(torch.tensor(7).as_subclass(CountingTensor), longest_k)
    assert len(reads) == 4  # another max_length_q object: both read again
    with pytest.raises(ValueError, match="max_seqlen_q"):  # a too-small maximum still fails, every time
        layer(torch.tensor(3), torch.tensor(7))


def test_decode_offsets_are_built_once_per_step_not_per_layer(lm):
    """Unpadded decode: every layer of a step needs the same equal-length cu_seqlens; built once, then reused."""
    import vitos_ext.hf_attention as hf_attention

    make = hf_attention._equal_length_cu_seqlens
    make.cache_clear()
    lm.set_attn_implementation(HF_ATTENTION_NAME)
    steps = 4
    with torch.no_grad():
        got = lm.generate(input_ids=torch.tensor([[BOS, 5, 9, 14]]), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False)
    lm.set_attn_implementation("eager")
    with torch.no_grad():
        want = lm.generate(input_ids=torch.tensor([[BOS, 5, 9, 14]]), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False)
    assert torch.equal(got, want)
    info = make.cache_info()
    layers = lm.config.num_hidden_layers
    assert info.misses == steps  # prefill + steps - 1 decode forwards, each a new (lq, lk)
    assert info.hits == steps * (layers - 1)
    cu_q, cu_k = make(2, 1, 7, torch.device("cpu"))
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == [0, 1, 2] and cu_k.tolist() == [0, 7, 14]


@pytest.mark.skipif(not triton_available("cpu"), reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
@pytest.mark.parametrize("case", ["packed prefill", "decode", "static-cache decode"])
def test_compiled_language_model_traces_as_one_graph(lm, case):
    """torch.compile sees the Triton op (a custom op with a fake under the interpreter) and must not break the graph
    in the attention layers on these paths: no host reads, no logging, no id-keyed memo lookups."""
    from transformers import DynamicCache, StaticCache

    register_hf_attention(backend="triton")
    lm.set_attn_implementation(HF_ATTENTION_NAME)
    ids = torch.tensor([[BOS, 5, 9, 14, 3, 7, 21, 8]])
    if case == "packed prefill":
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        kwargs = dict(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), cu_seq_lens_q=cu,
                      cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    else:
        cache = StaticCache(config=lm.config, max_cache_len=16) if case.startswith("static") else DynamicCache()
        key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        mask = torch.tensor([[0] * 3 + [1] * 5, [1] * 8]) if case.startswith("static") else torch.ones(2, 8).long()
        with torch.no_grad():
            lm(input_ids=torch.cat([ids, ids]), attention_mask=mask, use_cache=True, **{key: cache})
        # generate() drops an all-ones mask: an unpadded batch decodes with none (a padded one reads it on the host)
        step_mask = torch.cat([mask, torch.ones(2, 1)], 1).long() if case.startswith("static") else None
        kwargs = dict(input_ids=torch.tensor([[5], [6]]), attention_mask=step_mask,
                      position_ids=torch.tensor([[5], [8]]), use_cache=True, **{key: cache})
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(lm)(**kwargs)
    lm.set_attn_implementation("eager")
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


def test_attention_runs_in_the_autocast_dtype_like_sdpa(vl_model, monkeypatch):
    """Under torch.autocast a float32 rotary table promotes q and k to float32 while v is in the autocast dtype:
    attention runs in the autocast dtype (as SDPA does there), not in float32."""
    import vitos_ext.hf_attention as hf_attention

    seen = []
    original = hf_attention.varlen_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(hf_attention, "varlen_attention", spy)
    batch = left_padded_vl_batch()
    real = batch["attention_mask"].bool()
    logits = {}
    for name in ("sdpa", "eager", HF_ATTENTION_NAME):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[name] = _with_attention(vl_model, name)(**batch).logits.float()[real]
    _with_attention(vl_model, "eager")
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    # within the bf16 rounding that separates HF's own eager and SDPA paths under autocast
    tolerance = 2 * (logits["eager"] - logits["sdpa"]).abs().max().item() + 1e-3
    assert (logits[HF_ATTENTION_NAME] - logits["sdpa"]).abs().max().item() <= tolerance
    seen.clear()
    with torch.no_grad():
        _with_attention(vl_model, HF_ATTENTION_NAME)(**batch)
    _with_attention(vl_model, "eager")
    assert set(seen) == {(torch.float32,) * 3}  # no autocast: the inputs' dtype
