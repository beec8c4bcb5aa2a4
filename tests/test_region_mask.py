"""vitos_ext.region_to_patch_mask against the plain-PyTorch reference, plus opcheck, compile and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitos_ext
from vitos_ext.reference import region_to_patch_mask_reference

# CUDA variants always exist (marked, so `-m cuda` selects them); conftest skips them without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Coordinates that hit the edge cases: cell boundaries (k/8 for grids of 2, 4, 8 cells), outside [0, 1], non-finite.
SPECIAL = [0.0, 0.125, 0.25, 0.5, 0.75, 1.0, -0.3, 1.7, 1e-8, 1 - 1e-7, math.nan, math.inf, -math.inf]
coordinate = st.one_of(st.floats(-0.5, 1.5, width=32), st.sampled_from(SPECIAL))


@st.composite
def mask_inputs(draw):
    merge = draw(st.sampled_from([1, 2]))
    num_images = draw(st.integers(0, 4))
    grid = [
        (draw(st.integers(1, 3)), merge * draw(st.integers(1, 7)), merge * draw(st.integers(1, 7)))
        for _ in range(num_images)
    ]
    num_boxes = draw(st.integers(0, 8)) if num_images else 0
    boxes = []
    for _ in range(num_boxes):
        x1, y1 = draw(coordinate), draw(coordinate)
        shape = draw(st.sampled_from(["any", "zero_width", "zero_size", "inverted"]))
        if shape == "any":
            x2, y2 = draw(coordinate), draw(coordinate)
        elif shape == "zero_width":
            x2, y2 = x1, draw(coordinate)
        elif shape == "zero_size":
            x2, y2 = x1, y1
        else:
            x2, y2 = x1 - 0.2, y1 + 0.1
        boxes.append((x1, y1, x2, y2))
    box_image = [draw(st.integers(0, num_images - 1)) for _ in range(num_boxes)]
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(box_image, dtype=torch.int64),
        torch.tensor(grid, dtype=torch.int64).reshape(-1, 3),
        merge,
        draw(st.integers(0, 3)),
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=300, deadline=None)
@given(inputs=mask_inputs())
def test_matches_reference(device, inputs):
    boxes, box_image, grid, merge, dilate = inputs
    expected = region_to_patch_mask_reference(boxes, box_image, grid, merge, dilate)
    args = (boxes.to(device), box_image.to(device), grid.to(device), merge, dilate)
    got = vitos_ext.region_to_patch_mask(*args)
    assert got.dtype == torch.bool and got.device.type == device
    assert torch.equal(got.cpu(), expected)
    # The sync-free form (token count supplied) computes the same mask.
    assert torch.equal(vitos_ext.region_to_patch_mask(*args, num_tokens=expected.numel()).cpu(), expected)


def test_rules_by_hand():
    # Two images: 8x8 patches (4x4 tokens) with one box, and a 2-frame 4x6 image (2x3 tokens) with none.
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    mask = vitos_ext.region_to_patch_mask(boxes, torch.tensor([0]), torch.tensor([[1, 8, 8], [2, 4, 6]]))
    first = torch.zeros(4, 4, dtype=torch.bool)
    first[0:2, 0:2] = True  # floor(0.4)=0 .. ceil(2)-1=1
    assert torch.equal(mask, torch.cat([first.flatten(), torch.ones(12, dtype=torch.bool)]))


def test_zero_width_box_keeps_containing_cell_and_dilation_clips():
    grid = torch.tensor([[1, 4, 4]])  # merge 1: 4x4 tokens
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    mask = vitos_ext.region_to_patch_mask(point, torch.tensor([0]), grid, merge_size=1).view(4, 4)
    assert mask.nonzero().tolist() == [[2, 2]]
    grown = vitos_ext.region_to_patch_mask(point, torch.tensor([0]), grid, merge_size=1, dilate=2).view(4, 4)
    assert grown.all()  # rows/cols 0..4 clipped to 0..3


def test_invalid_boxes_only_keep_everything():
    boxes = torch.tensor([[math.nan, 0, 1, 1], [0.8, 0.1, 0.2, 0.9], [2.0, 2.0, 3.0, 3.0]])
    mask = vitos_ext.region_to_patch_mask(boxes, torch.tensor([0, 0, 0]), torch.tensor([[1, 4, 4]]))
    # The first two are invalid; the third clamps to the point (1, 1) -> the last cell only.
    assert mask.tolist() == [False, False, False, True]
    mask = vitos_ext.region_to_patch_mask(boxes[:2], torch.tensor([0, 0]), torch.tensor([[1, 4, 4]]))
    assert mask.all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_box_dtypes_are_rounded_to_float32(dtype):
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]], dtype=dtype)
    grid = torch.tensor([[1, 14, 10]])
    expected = region_to_patch_mask_reference(boxes.float(), torch.tensor([0]), grid)
    assert torch.equal(vitos_ext.region_to_patch_mask(boxes, torch.tensor([0]), grid), expected)


def _args(device="cpu"):
    return (
        torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.0, 0.5, 0.3, 1.0]], device=device),
        torch.tensor([0, 1], device=device),
        torch.tensor([[1, 8, 8], [2, 4, 6]], device=device),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    boxes, box_image, grid = _args(device)
    for num_tokens in (None, 28):
        torch.library.opcheck(torch.ops.vitos.region_to_patch_mask.default, (boxes, box_image, grid, 2, 1, num_tokens))


def test_compile_fullgraph():
    boxes, box_image, grid = _args()

    def kept_fraction(boxes, box_image, grid):
        mask = vitos_ext.region_to_patch_mask(boxes, box_image, grid, 2, 1, num_tokens=28)
        return mask.float().mean()

    compiled = torch.compile(kept_fraction, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(boxes, box_image, grid), kept_fraction(boxes, box_image, grid))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b, i, g: (b[:, :3], i, g), "boxes"),
        (lambda b, i, g: (b.long(), i, g), "boxes"),
        (lambda b, i, g: (b, i.int(), g), "box_image"),
        (lambda b, i, g: (b, i[:1], g), "box_image"),
        (lambda b, i, g: (b, torch.tensor([0, 2]), g), "box_image"),
        (lambda b, i, g: (b, torch.tensor([-1, 0]), g), "box_image"),
        (lambda b, i, g: (b, i, g[:, :2]), "grid_thw"),
        (lambda b, i, g: (b, i, g.int()), "grid_thw"),
        (lambda b, i, g: (b, i, torch.tensor([[1, 8, 8], [2, 5, 6]])), "divisible by merge_size"),
        (lambda b, i, g: (b, i, torch.tensor([[1, 8, 8], [0, 4, 6]])), "positive"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        vitos_ext.region_to_patch_mask(*change(*_args()))


def test_bad_scalars():
    with pytest.raises(ValueError, match="dilate"):
        vitos_ext.region_to_patch_mask(*_args(), dilate=-1)
    with pytest.raises(ValueError, match="merge_size"):
        vitos_ext.region_to_patch_mask(*_args(), merge_size=0)
    with pytest.raises(ValueError, match="num_tokens"):
        vitos_ext.region_to_patch_mask(*_args(), num_tokens=5)
    with pytest.raises(TypeError, match="boxes"):
        vitos_ext.region_to_patch_mask([[0, 0, 1, 1]], *_args()[1:])


@pytest.mark.cuda
def test_device_mix_is_an_error():
    boxes, box_image, grid = _args()
    with pytest.raises(RuntimeError, match="same device"):
        vitos_ext.region_to_patch_mask(boxes.cuda(), box_image, grid)


@pytest.mark.cuda
def test_cuda_anchor_batch_matches_reference():
    """The DESIGN.md anchor shape: 8 images, 10640 tokens, a few boxes each."""
    grid = torch.tensor([[1, 2 * h, 2 * w] for h, w in [(38, 38), (36, 40), (30, 44), (34, 34), (40, 30), (32, 40),
                                                         (38, 34), (34, 44)]])
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(24, 2, 2, generator=generator).sort(dim=1).values
    boxes = torch.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], dim=1)
    box_image = torch.arange(24) % 8
    expected = region_to_patch_mask_reference(boxes, box_image, grid, 2, 1)
    got = vitos_ext.region_to_patch_mask(boxes.cuda(), box_image.cuda(), grid.cuda(), 2, 1,
                                         num_tokens=expected.numel())
    assert torch.equal(got.cpu(), expected)
