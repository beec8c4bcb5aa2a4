"""Fused RMSNorm / SwiGLU / rotary embedding (vitos_ext.ops.fused) against the plain-PyTorch references, and the
fused layers patch_model installs in the vision tower and language model.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest.py). The interpreter rounds float32 -> bf16/fp16
toward zero where GPUs round to nearest, so low-precision outputs are compared within one rounding step there; on a
GPU (tests marked `cuda`) the fused results must equal the eager modules' in almost every element.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import build_model, families, make_batch
from op_recorder import RecordOps

from vitos_ext import patching
from vitos_ext.models import fused_layers
from vitos_ext.ops import fused as fused_mod
from vitos_ext.ops.fused import fused_kernels_available, rms_norm, rotary_embedding, swiglu
from vitos_ext.reference import rms_norm_reference, rotary_embedding_reference, swiglu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_kernels_available(DEVICE), reason="needs triton (CUDA or TRITON_INTERPRET=1)")
LOW_PRECISION = (torch.bfloat16, torch.float16)
FAMILIES = families()
PROMPTS = [[("text", [7, 8, 9]), ("image", (8, 8)), ("text", [10, 11, 12])],
           [("text", [13]), ("image", (4, 8)), ("text", [14, 15]), ("image", (8, 4)), ("text", [16])]]


def _tolerance(dtype: torch.dtype) -> dict:
    """float32: the kernels use the eager code's float32 math; low precision: one rounding step of the dtype."""
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 2 * torch.finfo(dtype).eps}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, inputs, grad_out if isinstance(grad_out, tuple) else (grad_out,))
    return outs, grads


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 40), (2, 3, 64), (1, 1), (9, 130)])
def test_rms_norm_matches_reference_forward_and_backward(shape, dtype):
    x = _randn(*shape, dtype=dtype, scale=3.0)
    weight = _randn(shape[-1], dtype=dtype, seed=1) * 0.5 + 1
    grad_out = _randn(*shape, dtype=dtype, seed=2)
    (got,), got_grads = _grads(lambda a, w: rms_norm(a, w, 1e-6, backend="triton"), [x, weight], grad_out)
    (want,), want_grads = _grads(lambda a, w: rms_norm_reference(a, w, 1e-6), [x, weight], grad_out)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **_tolerance(dtype))
    # the weight gradient sums over rows: its low-precision error grows with the row count
    for name, g, w in zip(("dx", "dweight"), got_grads, want_grads):
        scale = 1.0 if dtype == torch.float32 or name == "dx" else shape[0] * (shape[1] if len(shape) > 2 else 1)
        tol = _tolerance(dtype)
        torch.testing.assert_close(g.float(), w.float(), rtol=tol["rtol"] * 4, atol=tol["atol"] * 4 * scale,
                                   msg=lambda m: f"{name}: {m}")


def test_rms_norm_promotes_like_the_eager_module_and_reads_strided_rows():
    # a float32 weight with bfloat16 activations gives float32 (weight * normed.to(bf16)), as in Hugging Face
    big = _randn(6, 96, dtype=torch.bfloat16)
    x = big[:, 16:80]  # rows with a stride of 96
    weight = _randn(64, seed=1)
    got = rms_norm(x, weight, 1e-5, backend="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rms_norm_reference(x, weight, 1e-5), **_tolerance(torch.bfloat16))


def test_rms_norm_empty_rows_and_deterministic_weight_gradient():
    weight = _randn(32, seed=1).requires_grad_()
    empty = rms_norm(_randn(0, 32), weight, backend="triton")
    assert empty.shape == (0, 32)
    empty.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    x = _randn(37, 32, dtype=torch.bfloat16, scale=2)
    grad_out = _randn(37, 32, dtype=torch.bfloat16, seed=3)
    w = weight.detach().to(torch.bfloat16)
    runs = [_grads(lambda a, b: rms_norm(a, b, backend="triton"), [x, w], grad_out)[1][1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 33), (3, 4, 300), (1,), (0, 8)])
def test_swiglu_matches_reference_forward_and_backward(shape, dtype):
    gate, up = _randn(*shape, dtype=dtype, scale=4), _randn(*shape, dtype=dtype, seed=1)
    grad_out = _randn(*shape, dtype=dtype, seed=2)
    (got,), got_grads = _grads(lambda g, u: swiglu(g, u, backend="triton"), [gate, up], grad_out)
    (want,), want_grads = _grads(swiglu_reference, [gate, up], grad_out)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **_tolerance(dtype))
    for g, w in zip(got_grads, want_grads):
        # eager autograd rounds dout * up to the dtype before the silu derivative; the kernel does not
        torch.testing.assert_close(g, w, rtol=4 * _tolerance(dtype)["rtol"], atol=4 * _tolerance(dtype)["atol"])


def test_swiglu_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -80.0, -1.0, 0.0, 1.0, 80.0, 1e4], device=DEVICE).requires_grad_()
    up = torch.full_like(gate, 2.0).requires_grad_()
    out = swiglu(gate, up, backend="triton")
    out.sum().backward()
    torch.testing.assert_close(out, swiglu_reference(gate.detach(), up.detach()))
    assert torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# rotary embedding
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads_q,heads_k,head_dim", [(4, 4, 10), (6, 2, 16), (3, 1, 80)])
def test_rotary_matches_reference_on_strided_qkv_views(heads_q, heads_k, head_dim, dtype):
    tokens = 9
    width = (heads_q + 2 * heads_k) * head_dim
    qkv = _randn(tokens, width, dtype=dtype)
    q = qkv[:, : heads_q * head_dim].view(tokens, heads_q, head_dim)  # strided views, as the vision attention
    k = qkv[:, heads_q * head_dim: (heads_q + heads_k) * head_dim].view(tokens, heads_k, head_dim)
    angles = _randn(tokens, head_dim // 2, seed=1, scale=3)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    grads_out = (_randn(tokens, heads_q, head_dim, dtype=dtype, seed=2),
                 _randn(tokens, heads_k, head_dim, dtype=dtype, seed=3))
    got, got_grads = _grads(lambda a, b: rotary_embedding(a, b, cos, sin, backend="triton"), [q, k], grads_out)
    want, want_grads = _grads(lambda a, b: rotary_embedding_reference(a, b, cos, sin), [q, k], grads_out)
    for g, w in zip(got + got_grads, want + want_grads):
        assert g.dtype == dtype and g.is_contiguous()
        torch.testing.assert_close(g, w, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_input_precision_matches_the_language_model_helper(dtype):
    # the language models' apply_rotary_pos_emb: [B, H, L, D] queries / keys, [B, L, D] tables in the same dtype
    batch, heads_q, heads_k, length, dim = 2, 4, 2, 5, 16
    q = _randn(batch, length, heads_q, dim, dtype=dtype).transpose(1, 2)  # the transposed projection output
    k = _randn(batch, length, heads_k, dim, dtype=dtype, seed=1).transpose(1, 2)
    angles = _randn(batch, length, dim // 2, seed=2, scale=3)
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))

    def hf_helper(q, k):  # transformers' apply_rotary_pos_emb, written out
        def rotate_half(x):
            return torch.cat((-x[..., dim // 2:], x[..., : dim // 2]), dim=-1)
        return (q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1),
                k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1))

    def token_major(rotary):  # [B, H, L, D] in and out, the op's [B * L, H, D] layout in between
        def run(q, k):
            flat = [x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (q, k)]
            tables = [t.reshape(batch * length, dim) for t in (cos, sin)]
            return tuple(o.view(batch, length, -1, dim).transpose(1, 2) for o in rotary(*flat, *tables))
        return run

    fused = token_major(lambda *a: rotary_embedding(*a, backend="triton", precision="input"))
    reference = token_major(lambda *a: rotary_embedding_reference(*a, precision="input"))

    grads_out = (_randn(batch, heads_q, length, dim, dtype=dtype, seed=3),
                 _randn(batch, heads_k, length, dim, dtype=dtype, seed=4))
    want, want_grads = _grads(hf_helper, [q, k], grads_out)
    for fn in (reference, fused):
        got, got_grads = _grads(fn, [q, k], grads_out)
        for g, w in zip(got + got_grads, want + want_grads):
            assert g.dtype == dtype
            if fn is reference:  # the same eager ops: bit for bit
                assert torch.equal(g, w)
            else:
                torch.testing.assert_close(g, w, **_tolerance(dtype))


def test_rotary_with_unequal_halves_and_differentiable_tables():
    # the kernel reads both halves of cos/sin (no assumption that they repeat)
    q, k = _randn(5, 2, 8), _randn(5, 3, 8, seed=1)
    cos, sin = _randn(5, 8, seed=2), _randn(5, 8, seed=3)
    fused = rotary_embedding(q, k, cos, sin, backend="triton")
    for got, want in zip(fused, rotary_embedding_reference(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    # tables that need a gradient take the reference path, so their gradient is not dropped
    cos.requires_grad_()
    q_rot, _ = rotary_embedding(q, k, cos, sin, backend="triton")
    q_rot.sum().backward()
    assert cos.grad is not None and cos.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# registration, compile, errors
# ----------------------------------------------------------------------------------------------------------------


def test_opcheck_every_fused_op():
    x, w = _randn(5, 24), _randn(24, seed=1)
    torch.library.opcheck(torch.ops.vitos.rms_norm_fwd.default, (x.requires_grad_(), w.requires_grad_(), 1e-6))
    out, rstd = torch.ops.vitos.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(torch.ops.vitos.rms_norm_bwd.default, (torch.ones_like(out), x.detach(), w.detach(), rstd))
    gate, up = _randn(4, 9).requires_grad_(), _randn(4, 9, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.vitos.swiglu_fwd.default, (gate, up))
    torch.library.opcheck(torch.ops.vitos.swiglu_bwd.default, (torch.ones(4, 9), gate.detach(), up.detach()))
    q = _randn(3, 2, 8).requires_grad_()
    for round_products in (False, True):
        torch.library.opcheck(torch.ops.vitos.rotary_embedding.default,
                              (q, _randn(3, 8, seed=3), _randn(3, 8, seed=4), False, round_products))


def test_torch_compile_fullgraph_traces_the_fused_ops():
    def block(x, weight, gate, up, q, k, cos, sin):
        q_rot, k_rot = rotary_embedding(q, k, cos, sin, backend="triton")
        return rms_norm(x, weight, backend="triton").sum() + swiglu(gate, up, backend="triton").sum() + \
            q_rot.sum() + k_rot.sum()

    args = [_randn(4, 16), _randn(16, seed=1), _randn(3, 8, seed=2), _randn(3, 8, seed=3), _randn(2, 2, 8, seed=4),
            _randn(2, 1, 8, seed=5), _randn(2, 8, seed=6), _randn(2, 8, seed=7)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    torch.testing.assert_close(compiled(*args), block(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,error,message", [
    (lambda: rms_norm([1.0], torch.ones(1)), TypeError, "x must be a torch.Tensor"),
    (lambda: rms_norm(torch.ones(2, 3), torch.ones(4)), ValueError, "weight must have shape"),
    (lambda: rms_norm(torch.ones(2, 3, dtype=torch.int64), torch.ones(3)), TypeError, "x must be a floating-point"),
    (lambda: rms_norm(torch.ones(2, 3), torch.ones(3), backend="cuda"), ValueError, "backend must be one of"),
    (lambda: rms_norm(torch.ones(2, 3), torch.ones(3), eps="1e-6"), ValueError, "eps must be a float >= 0"),
    (lambda: rms_norm(torch.ones(2, 3), torch.ones(3), eps=float("nan")), ValueError, "eps must be a float >= 0"),
    (lambda: rms_norm(torch.ones(2, 3, dtype=torch.float64), torch.ones(3), backend="triton"), TypeError,
     "x torch.float64"),
    (lambda: swiglu(torch.ones(2, 3), torch.ones(3, 2)), ValueError, "gate and up must have the same shape"),
    (lambda: swiglu(torch.ones(2), torch.ones(2, dtype=torch.float16)), TypeError, "must share a dtype"),
    (lambda: rotary_embedding(torch.ones(2, 3), torch.ones(2, 1, 4), torch.ones(2, 4), torch.ones(2, 4)), ValueError,
     "q must be 3-D"),
    (lambda: rotary_embedding(torch.ones(2, 1, 5), torch.ones(2, 1, 5), torch.ones(2, 5), torch.ones(2, 5)),
     ValueError, "head_dim must be even"),
    (lambda: rotary_embedding(torch.ones(2, 1, 4), torch.ones(3, 1, 4), torch.ones(2, 4), torch.ones(2, 4)),
     ValueError, "k must have q's token count"),
    (lambda: rotary_embedding(torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.ones(2, 3), torch.ones(2, 4)),
     ValueError, "cos must have shape"),
    (lambda: rotary_embedding(torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.ones(2, 4), torch.ones(2, 4),
                              precision="bf16"), ValueError, "precision must be one of"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(fused_mod._kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        swiglu(torch.ones(2), torch.ones(2), backend="triton")
    monkeypatch.setattr(fused_mod, "_kernels", None)  # no triton at all
    with pytest.raises(RuntimeError, match="swiglu: backend='triton' needs the triton package"):
        swiglu(torch.ones(2), torch.ones(2), backend="triton")
    # auto falls back to the reference on CPU
    torch.testing.assert_close(swiglu(torch.ones(2), torch.ones(2)), swiglu_reference(torch.ones(2), torch.ones(2)))


# ----------------------------------------------------------------------------------------------------------------
# fused layers in patched models
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_fused_layers_match_the_model_forward_and_backward(family):
    model = build_model(family).to(DEVICE)
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
             for k, v in make_batch(family, model, PROMPTS).items()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_logits, want_grads = loss_and_grads()
    patching.patch_model(model, attention="model", fused_layers="on")
    installed = patching._state_of(model).fused_forwards.modules
    names = {type(m).__name__ for m in installed}
    assert any(n.endswith("RMSNorm") for n in names) and any(n.endswith("MLP") for n in names)
    with RecordOps("vitos") as counter:
        got_logits, got_grads = loss_and_grads()
    assert counter.calls.get("rms_norm_fwd", 0) >= 2 * model.config.text_config.num_hidden_layers
    assert counter.calls.get("rms_norm_bwd", 0) > 0 and counter.calls.get("swiglu_bwd", 0) > 0
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    patching.unpatch_model(model)
    assert not any("forward" in m.__dict__ or "_vitos_fused" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_language_model_rotary_runs_fused_and_leaves_other_instances_alone(family):
    import sys

    patched, plain = build_model(family).to(DEVICE), build_model(family).to(DEVICE)
    attention_classes = {type(m) for m in plain.modules() if type(m).__name__ in fused_layers.TEXT_ATTENTION_CLASSES}
    assert len(attention_classes) == 1
    attention_class = attention_classes.pop()
    module = sys.modules[attention_class.__module__]
    helper, class_forward = module.apply_rotary_pos_emb, attention_class.forward
    patching.patch_model(patched, attention="varlen", fused_layers="on")
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
             for k, v in make_batch(family, plain, PROMPTS).items()}
    layers = plain.config.text_config.num_hidden_layers
    vision_rotary = 0 if family.is_llava else 2 * len(plain.model.visual.blocks)
    with torch.no_grad():
        with RecordOps("vitos") as counter:
            got = patched(**batch).logits
        assert counter.calls.get("rotary_embedding") == 2 * layers + vision_rotary  # q and k of every layer
        with RecordOps("vitos") as counter:
            want = plain(**batch).logits
        assert not counter.calls  # a second, unpatched instance of the same classes runs the eager code
    real = batch["attention_mask"].bool()  # varlen attention leaves padding rows out
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert module.apply_rotary_pos_emb is helper and attention_class.forward is class_forward
    patching.unpatch_model(patched)
    assert not any("forward" in m.__dict__ for m in patched.modules())


def test_rotary_rebinding_keeps_decorators_and_skips_forwards_without_the_helper():
    import functools
    import importlib
    import sys

    from vitos_ext.models.fused_layers import fused_rotary_attention_forward

    def renames_kwarg(func):  # a functools.wraps decorator, as transformers' deprecate_kwarg
        @functools.wraps(func)
        def wrapper(self, *args, **kwargs):
            if "old" in kwargs:
                kwargs["new"] = kwargs.pop("old")
            return func(self, *args, **kwargs)
        return wrapper

    namespace = {"apply_rotary_pos_emb": lambda q, k, cos, sin, unsqueeze_dim=1: ("eager", q, k)}
    exec("def forward(self, q, k, new=None):\n    return apply_rotary_pos_emb(q, k, new, new)\n"
         "def other(self, q, k):\n    return q\n", namespace)
    with_helper = type("LlamaAttention", (), {"forward": renames_kwarg(namespace["forward"])})
    without_helper = type("LlamaAttention", (), {"forward": namespace["other"]})
    assert fused_rotary_attention_forward(without_helper, "on") is None
    rebound = fused_rotary_attention_forward(with_helper, "on")
    assert rebound is not with_helper.forward and rebound.__wrapped__ is not with_helper.forward.__wrapped__
    x = torch.ones(1, 1, 2, 4, dtype=torch.float64)  # float64: the wrapper hands the call to the eager helper
    assert rebound(None, x, x, old=torch.ones(1, 2, 4, dtype=torch.float64))[0] == "eager"
    helper = rebound.__wrapped__.__globals__["apply_rotary_pos_emb"]
    y, table = torch.randn(1, 2, 3, 4), torch.randn(1, 3, 4)  # a fused-eligible call, but with other arguments
    assert helper(y, y, table, table, 2)[0] == "eager" and helper(y, y, table, table, unsqueeze_dim=2)[0] == "eager"
    assert isinstance(helper(y, y, table, table)[0], torch.Tensor)  # the default call runs the fused op
    assert fused_rotary_attention_forward(with_helper, "on") is rebound  # one function per class and mode
    assert namespace["forward"].__globals__["apply_rotary_pos_emb"] is namespace["apply_rotary_pos_emb"]
    # torch.compile finds (and guards) an inlined function's globals as sys.modules[globals["__name__"]]: the rebound
    # namespace must be that module's own, not claim the original module's name (torch 2.11 failed to compile)
    rebound_globals = rebound.__wrapped__.__globals__
    assert sys.modules[rebound_globals["__name__"]].__dict__ is rebound_globals
    assert importlib.import_module(rebound_globals["__name__"]).apply_rotary_pos_emb is helper


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_pruned_generate_with_fused_layers_gives_the_same_tokens(family):
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.5, 0.0, 1.0, 1.0]]),
             torch.tensor([[0.0, 0.5, 1.0, 1.0]])]
    tokens = []
    for mode in ("off", "on"):
        model = patching.patch_model(build_model(family).to(DEVICE), attention="varlen", fused_layers=mode)
        batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                 for k, v in make_batch(family, model, PROMPTS).items()}
        with torch.no_grad():
            tokens.append(model.generate(**batch, max_new_tokens=6, do_sample=False,
                                         vitos_boxes=[b.to(DEVICE) for b in boxes]))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.is_llava], ids=lambda f: f.name)
def test_vision_tower_with_fused_rotary_matches_eager(family):
    eager = build_model(family).to(DEVICE)
    fused = patching.patch_model(build_model(family).to(DEVICE), attention="varlen", fused_layers="on")
    batch = make_batch(family, eager, PROMPTS)
    grid = batch["image_grid_thw"].to(DEVICE)
    pixels = batch["pixel_values"].to(DEVICE)
    with torch.no_grad():
        want = patching.encode_images(eager, pixels, image_grid_thw=grid).output.pooler_output
        with RecordOps("vitos") as counter:
            got = patching.encode_images(fused, pixels, image_grid_thw=grid).output.pooler_output
    depth = len(fused.model.visual.blocks)
    assert counter.calls.get("rotary_embedding") == 2 * depth  # q and k of every vision layer
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_layer_modes():
    family = FAMILIES[1]  # Qwen2.5-VL: RMSNorm + gated MLP in the vision tower too
    model = build_model(family)
    batch = make_batch(family, model, PROMPTS)
    with torch.no_grad():
        want = model(**batch).logits
    with pytest.raises(ValueError, match="fused_layers must be one of"):
        patching.patch_model(model, fused_layers="always")
    patching.patch_model(model, attention="model", fused_layers="off")
    assert not patching._state_of(model).fused_forwards.modules
    # "auto" installs the forwards, which on CPU tensors run the modules' own code (no fused op at all)
    patching.patch_model(model, attention="model", fused_layers="auto")
    state = patching._state_of(model)
    vision_blocks = model.model.visual.blocks
    assert {vision_blocks[0].norm1, vision_blocks[0].mlp} <= set(state.fused_forwards.modules)
    with torch.no_grad(), RecordOps("vitos") as counter:
        got = model(**batch).logits
    if DEVICE == "cpu":
        assert not counter.calls
        assert torch.equal(got, want)
    patching.patch_model(model, attention="model", fused_layers="off")  # switching modes removes them again
    assert not any("forward" in m.__dict__ for m in vision_blocks.modules())


def test_fused_layers_skip_modules_with_other_formulas():
    class GemmaLikeRMSNorm(torch.nn.Module):  # not in the verified list: left alone
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

    gelu_mlp = type("Qwen2MLP", (torch.nn.Module,), {})()
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(gelu_mlp, name, torch.nn.Linear(4, 4))
    gelu_mlp.act_fn = torch.nn.GELU()  # a gated MLP with another activation: left alone
    container = torch.nn.ModuleList([GemmaLikeRMSNorm(), gelu_mlp])
    assert list(fused_layers.fused_layer_replacements(container)) == []


# ----------------------------------------------------------------------------------------------------------------
# GPU: the eager modules' bits, and Hopper code generation checked without a GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_low_precision_results_equal_the_eager_code_almost_everywhere(dtype):
    x = _randn(4096, 1280, dtype=dtype, scale=2)
    weight = _randn(1280, dtype=dtype, seed=1)
    gate, up = _randn(4096, 3420, dtype=dtype, seed=2, scale=3), _randn(4096, 3420, dtype=dtype, seed=3)
    qkv = _randn(4096, 3, 16, 80, dtype=dtype, seed=4)
    q, k = qkv[:, 0], qkv[:, 1]
    angles = _randn(4096, 40, seed=5, scale=10)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    # the language models' rotary: transposed [B, H, L, D] projections, tables in the model dtype
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    text_q = _randn(2, 1024, 28, 128, dtype=dtype, seed=6).transpose(1, 2)
    text_k = _randn(2, 1024, 4, 128, dtype=dtype, seed=7).transpose(1, 2)
    text_angles = _randn(2, 1024, 64, seed=8, scale=100)
    text_cos, text_sin = (f(torch.cat([text_angles, text_angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    pairs = [(rms_norm(x, weight), rms_norm_reference(x, weight)), (swiglu(gate, up), swiglu_reference(gate, up)),
             *zip(rotary_embedding(q, k, cos, sin), rotary_embedding_reference(q, k, cos, sin)),
             *zip(fused_layers._fused_text_rotary(text_q, text_k, text_cos, text_sin),
                  apply_rotary_pos_emb(text_q, text_k, text_cos, text_sin))]
    for got, want in pairs:
        assert (got == want).float().mean() > 0.99  # the rest differ by one rounding step (reduction order, FMA)
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


_HOPPER_COMPILE_SCRIPT = r"""
import inspect, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vitos_ext.kernels.fused_elementwise as K

FLOATS = ("eps",)
# integers the launch does not make multiples of 16 (Triton specializes the others, e.g. widths and strides)
ANY_VALUE = ("num_rows", "rows_per_program", "num_heads")

def source(kernel, consts):
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("rstd_ptr", "dw_partial_ptr", "cos_ptr", "sin_ptr") else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
            if name not in FLOATS and name not in ANY_VALUE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)

report = {}
for name, kernel, consts, warps in (
        ("rms_fwd_1280", K._rms_norm_fwd_kernel, {"BLOCK_N": 2048}, 8),
        ("rms_bwd_3584", K._rms_norm_bwd_kernel, {"BLOCK_N": 4096}, 16),
        ("swiglu_fwd", K._swiglu_fwd_kernel, {"BLOCK": 1024}, 4),
        ("swiglu_bwd", K._swiglu_bwd_kernel, {"BLOCK": 1024}, 4),
        ("rotary_16x80", K._rotary_kernel,
         {"HALF": 40, "BACKWARD": False, "ROUND_PRODUCTS": False, "BLOCK_H": 16, "BLOCK_D": 64}, 4),
        ("rotary_text_28x128", K._rotary_kernel,
         {"HALF": 64, "BACKWARD": False, "ROUND_PRODUCTS": True, "BLOCK_H": 32, "BLOCK_D": 64}, 8)):
    compiled = triton.compile(source(kernel, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    report[name] = {"cubin_bytes": len(compiled.asm["cubin"]), "vector_loads": ptx.count("ld.global.v4"),
                    "scalar_loads": ptx.count("ld.global.b16")}
print(json.dumps(report))
"""


def test_fused_kernels_cross_compile_for_hopper():
    """The real Triton pipeline (not the interpreter) lowers every fused kernel to sm_90 code at the block sizes
    the 7B vision tower and language model use (rows of 1280 and 3584, 16 heads x 80, 28 heads x 128), with
    vectorized loads."""
    from hopper_compile import compile_report

    report = compile_report(_HOPPER_COMPILE_SCRIPT)
    assert len(report) == 6
    for name, info in report.items():
        assert info["cubin_bytes"] > 0
        # memory-bound kernels: 16-byte accesses (8 bf16), never element by element
        assert info["vector_loads"] > 0 and info["scalar_loads"] == 0, (name, info)


# ----------------------------------------------------------------------------------------------------------------
# eager fast path: inference calls launch the kernels without the torch.library dispatch
# ----------------------------------------------------------------------------------------------------------------


def test_eager_fast_path_conditions():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vitos_ext.ops._registration import eager_fast_path

    x, w = _randn(3, 8), torch.nn.Parameter(_randn(8, seed=1))
    assert not eager_fast_path(x, w)  # the parameter needs a gradient
    with torch.no_grad():
        assert eager_fast_path(x, w)
        with RecordOps("vitos"):  # a dispatch mode must see the op
            assert not eager_fast_path(x)
        assert torch.vmap(lambda row: torch.tensor(eager_fast_path(row)))(x).logical_not().all()
        with FakeTensorMode():
            assert not eager_fast_path(torch.empty(2))


def test_fast_path_results_equal_the_op_path():
    x, w = _randn(6, 40, dtype=torch.bfloat16, scale=3), _randn(40, dtype=torch.bfloat16, seed=1)
    gate, up = _randn(5, 33, dtype=torch.bfloat16, seed=2), _randn(5, 33, dtype=torch.bfloat16, seed=3)
    qkv = _randn(4, 3, 2, 16, seed=4)
    cos, sin = _randn(4, 16, seed=5), _randn(4, 16, seed=6)

    def run():
        return [rms_norm(x, w, backend="triton"), swiglu(gate, up, backend="triton"),
                *rotary_embedding(qkv[:, 0], qkv[:, 1], cos, sin, backend="triton")]

    with torch.no_grad():
        fast = run()
        with RecordOps("vitos") as counter:
            through_ops = run()
    assert counter.calls == {"rms_norm_fwd": 1, "swiglu_fwd": 1, "rotary_embedding": 2}
    for a, b in zip(fast, through_ops):
        assert torch.equal(a, b)


def test_fused_layers_leave_dtypes_the_kernels_do_not_take_to_the_modules():
    family = FAMILIES[1]
    model = build_model(family).to(torch.float64)
    batch = make_batch(family, model, PROMPTS)
    batch["pixel_values"] = batch["pixel_values"].to(torch.float64)
    with torch.no_grad():
        want = model(**batch).logits
        patching.patch_model(model, attention="model", fused_layers="on")
        with RecordOps("vitos") as counter:
            got = model(**batch).logits
    assert not counter.calls  # float64: every module ran its own forward
    assert torch.equal(got, want)
