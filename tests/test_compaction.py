"""vitos_ext.compact_tokens against the plain-PyTorch reference: values, gradients, determinism, compile, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitos_ext
from vitos_ext.reference import compact_tokens_reference

# CUDA variants always exist (marked, so `-m cuda` selects them); conftest skips them without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def random_batch(lengths, dim, num_pos, keep_prob, fuse, dtype=torch.float32, seed=0, device="cpu"):
    """A packed batch with random keep pattern and (optionally) random valid fusion targets."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    hidden = torch.randn(total, dim, generator=g).to(dtype)
    keep = torch.rand(total, generator=g) < keep_prob
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    positions = torch.randint(0, 10_000, (num_pos, total), generator=g)
    fuse_into = None
    if fuse:
        fuse_into = torch.full((total,), -1, dtype=torch.int64)
        for b in range(len(lengths)):
            kept = keep[cu[b] : cu[b + 1]].nonzero().flatten() + cu[b]
            for j in range(int(cu[b]), int(cu[b + 1])):
                if not keep[j] and len(kept) and torch.rand(1, generator=g) < 0.7:
                    fuse_into[j] = kept[torch.randint(len(kept), (1,), generator=g)]
        # Values at kept rows are ignored: fill them with junk.
        fuse_into[keep] = torch.randint(-5, 5 * total + 5, (int(keep.sum()),), generator=g)
    moved = lambda t: None if t is None else t.to(device)  # noqa: E731
    return moved(hidden), moved(keep), moved(cu), moved(positions), moved(fuse_into)


def assert_same(got, expected):
    assert torch.equal(got.hidden.cpu(), expected.hidden.cpu())
    assert torch.equal(got.position_ids.cpu(), expected.position_ids.cpu())
    assert torch.equal(got.cu_seqlens.cpu(), expected.cu_seqlens.cpu())
    assert torch.equal(got.kept_index.cpu(), expected.kept_index.cpu())
    assert got.max_seqlen == expected.max_seqlen
    assert got.cu_seqlens.dtype == torch.int32 and got.kept_index.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    dim=st.integers(1, 20),
    num_pos=st.sampled_from([1, 3, 4]),
    keep_prob=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    fuse=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(device, lengths, dim, num_pos, keep_prob, fuse, dtype, seed):
    inputs = random_batch(lengths, dim, num_pos, keep_prob, fuse, dtype, seed, device)
    expected = compact_tokens_reference(*(t if t is None else t.cpu() for t in inputs))
    assert_same(vitos_ext.compact_tokens(*inputs), expected)


def test_positions_are_gathered_not_renumbered():
    hidden = torch.arange(12.0).view(6, 2)
    keep = torch.tensor([True, False, True, False, False, True])
    cu = torch.tensor([0, 2, 2, 6], dtype=torch.int32)  # the middle sequence is empty
    positions = torch.tensor([[0, 1, 0, 5, 6, 7], [0, 1, 0, 9, 9, 9], [0, 1, 0, 2, 3, 4]])
    out = vitos_ext.compact_tokens(hidden, keep, cu, positions)
    assert out.kept_index.tolist() == [0, 2, 5]
    assert out.position_ids.tolist() == [[0, 0, 7], [0, 0, 9], [0, 0, 4]]
    assert out.cu_seqlens.tolist() == [0, 1, 1, 3]
    assert out.max_seqlen == 2
    assert torch.equal(out.hidden, hidden[[0, 2, 5]])


def test_fusion_mean_by_hand():
    hidden = torch.tensor([[1.0], [2.0], [4.0], [8.0], [16.0]])
    keep = torch.tensor([True, False, False, True, False])
    cu = torch.tensor([0, 5], dtype=torch.int32)
    fuse = torch.tensor([99, 0, 0, -7, -1])  # rows 1, 2 -> row 0; row 4 discarded; kept rows' values ignored
    out = vitos_ext.compact_tokens(hidden, keep, cu, torch.zeros(1, 5, dtype=torch.int64), fuse)
    assert torch.equal(out.hidden.flatten(), torch.tensor([(1 + 2 + 4) / 3, 8.0], dtype=torch.float32))


def test_all_dropped_and_empty_input():
    out = vitos_ext.compact_tokens(
        torch.randn(3, 4), torch.zeros(3, dtype=torch.bool), torch.tensor([0, 3], dtype=torch.int32),
        torch.zeros(3, 3, dtype=torch.int64),
    )
    assert out.hidden.shape == (0, 4) and out.position_ids.shape == (3, 0)
    assert out.cu_seqlens.tolist() == [0, 0] and out.max_seqlen == 0
    empty = vitos_ext.compact_tokens(
        torch.randn(0, 4), torch.zeros(0, dtype=torch.bool), torch.zeros(1, dtype=torch.int32),
        torch.zeros(3, 0, dtype=torch.int64),
    )
    assert empty.hidden.shape == (0, 4) and empty.cu_seqlens.tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fuse", [False, True])
def test_out_capacity_form(device, fuse):
    inputs = random_batch([7, 0, 9, 4], 6, 3, 0.5, fuse, seed=3, device=device)
    exact = vitos_ext.compact_tokens(*inputs)
    kept = exact.hidden.shape[0]
    padded = vitos_ext.compact_tokens(*inputs, out_capacity=kept + 5)
    assert padded.hidden.shape == (kept + 5, 6)
    assert torch.equal(padded.hidden[:kept], exact.hidden) and not padded.hidden[kept:].any()
    assert torch.equal(padded.position_ids[:, :kept], exact.position_ids) and not padded.position_ids[:, kept:].any()
    assert torch.equal(padded.kept_index[:kept], exact.kept_index) and (padded.kept_index[kept:] == -1).all()
    assert torch.equal(padded.cu_seqlens, exact.cu_seqlens)
    assert padded.max_seqlen == min(kept + 5, 20) >= exact.max_seqlen
    if device == "cpu":
        with pytest.raises(ValueError, match="out_capacity"):
            vitos_ext.compact_tokens(*inputs, out_capacity=kept - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fuse", [False, True])
def test_gradcheck(device, fuse):
    hidden, keep, cu, positions, fuse_into = random_batch([5, 0, 6], 3, 3, 0.5, fuse, torch.float64, 7, device)
    hidden.requires_grad_(True)
    torch.autograd.gradcheck(lambda h: vitos_ext.compact_tokens(h, keep, cu, positions, fuse_into).hidden, (hidden,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fuse", [False, True])
def test_backward_matches_reference(device, fuse):
    hidden, keep, cu, positions, fuse_into = random_batch([9, 4, 11], 8, 3, 0.4, fuse, torch.float32, 11, device)
    upstream = torch.randn(int(keep.sum()), 8, device=device)
    grads = []
    for fn in (vitos_ext.compact_tokens, compact_tokens_reference):
        h = hidden.clone().requires_grad_(True)
        (fn(h, keep, cu, positions, fuse_into).hidden * upstream).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fusion_is_bitwise_deterministic(device, dtype):
    inputs = random_batch([300, 257, 511], 64, 3, 0.2, True, dtype, 5, device)
    first = vitos_ext.compact_tokens(*inputs).hidden
    for _ in range(5):
        assert torch.equal(vitos_ext.compact_tokens(*inputs).hidden, first)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for fuse in (False, True):
        hidden, keep, cu, positions, fuse_into = random_batch([5, 0, 6], 4, 3, 0.5, fuse, seed=2, device=device)
        hidden.requires_grad_(True)
        for capacity in (None, 12):
            torch.library.opcheck(
                torch.ops.vitos.compact_tokens.default, (hidden, keep, cu, positions, fuse_into, capacity)
            )


def test_compile_fullgraph():
    hidden, keep, cu, positions, fuse_into = random_batch([5, 3, 6], 4, 3, 0.5, True, seed=4)

    def pooled(hidden, keep, cu, positions, fuse_into):
        out = vitos_ext.compact_tokens(hidden * 2, keep, cu, positions, fuse_into)
        return out.hidden.sum(0), out.position_ids.max(), out.cu_seqlens, out.max_seqlen

    compiled = torch.compile(pooled, fullgraph=True, backend="aot_eager")
    hidden.requires_grad_(True)
    got, want = compiled(hidden, keep, cu, positions, fuse_into), pooled(hidden, keep, cu, positions, fuse_into)
    for a, b in zip(got, want):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    got[0].sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def _good():
    return random_batch([3, 4], 2, 3, 0.5, True, seed=1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, k, c, p, f: (h[0], k, c, p, f), "hidden"),
        (lambda h, k, c, p, f: (h.long(), k, c, p, f), "hidden"),
        (lambda h, k, c, p, f: (h, k.int(), c, p, f), "keep"),
        (lambda h, k, c, p, f: (h, k[:-1], c, p, f), "keep"),
        (lambda h, k, c, p, f: (h, k, c.long(), p, f), "cu_seqlens"),
        (lambda h, k, c, p, f: (h, k, torch.tensor([1, 3, 7], dtype=torch.int32), p, f), r"cu_seqlens\[0\]"),
        (lambda h, k, c, p, f: (h, k, torch.tensor([0, 5, 3, 7], dtype=torch.int32), p, f), "non-decreasing"),
        (lambda h, k, c, p, f: (h, k, torch.tensor([0, 3, 6], dtype=torch.int32), p, f), r"cu_seqlens\[-1\]"),
        (lambda h, k, c, p, f: (h, k, c, p[0], f), "position_ids"),
        (lambda h, k, c, p, f: (h, k, c, p.int(), f), "position_ids"),
        (lambda h, k, c, p, f: (h, k, c, p[:, :-1], f), "position_ids"),
        (lambda h, k, c, p, f: (h, k, c, p, f[:-1]), "fuse_into"),
        (lambda h, k, c, p, f: (h, k, c, p, f.int()), "fuse_into"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        vitos_ext.compact_tokens(*change(*_good()))


def _fusion_case(target):
    hidden = torch.randn(6, 2)
    keep = torch.tensor([True, False, True, True, False, True])
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    fuse = torch.full((6,), -1, dtype=torch.int64)
    fuse[1] = target
    return hidden, keep, cu, torch.zeros(1, 6, dtype=torch.int64), fuse


@pytest.mark.parametrize(
    "target, message", [(6, "out of range"), (4, "not kept"), (3, "another sequence"), (2, None)]
)
def test_invalid_fusion_targets(target, message):
    if message is None:
        vitos_ext.compact_tokens(*_fusion_case(target))  # a valid target
        return
    with pytest.raises(ValueError, match=rf"fuse_into\[1\] = {target} .*{message}"):
        vitos_ext.compact_tokens(*_fusion_case(target))


@pytest.mark.cuda
@pytest.mark.parametrize("target, message", [(6, "outside"), (4, "not kept"), (3, "another sequence")])
def test_invalid_fusion_targets_cuda(target, message):
    with pytest.raises(ValueError, match=message):
        vitos_ext.compact_tokens(*(t.cuda() for t in _fusion_case(target)))


@pytest.mark.cuda
def test_device_mix_is_an_error():
    hidden, keep, cu, positions, fuse = _good()
    with pytest.raises(RuntimeError, match="same device"):
        vitos_ext.compact_tokens(hidden.cuda(), keep, cu, positions, fuse)


@pytest.mark.cuda
@pytest.mark.parametrize("fuse", [False, True])
def test_cuda_anchor_shape_matches_reference(fuse):
    """DESIGN.md anchor: 16410 rows of 3584 bf16, ~77% kept, 8 sequences."""
    lengths = [2051, 2052, 2051, 2052, 2051, 2051, 2051, 2051]
    inputs = random_batch(lengths, 3584, 3, 0.77, False, torch.bfloat16, 9)
    if fuse:  # every dropped row fused into the previous kept row of its sequence, if any
        hidden, keep, cu, positions, _ = inputs
        last_kept = torch.where(keep, torch.arange(len(keep)), -1).cummax(0).values
        starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(lengths))
        fuse_into = torch.where(last_kept >= starts, last_kept, -1)
        inputs = (hidden, keep, cu, positions, fuse_into)
    expected = compact_tokens_reference(*inputs)
    got = vitos_ext.compact_tokens(*(None if t is None else t.cuda() for t in inputs))
    assert_same(got, expected)
