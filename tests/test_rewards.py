"""Rewards: IoU against hand-computed values, format/accuracy on tricky outputs, cross-feedback, TRL wrappers."""

import pytest
import torch

from vitos_ext.rewards import (
    accuracy_reward,
    box_iou,
    completion_text,
    cross_feedback_rewards,
    format_reward,
    iou_reward,
    trl_accuracy_reward,
    trl_format_reward,
    trl_iou_reward,
)

OPTIONS = {"A": "hyperdense nodule", "B": "hypodense cyst", "C": "ring-enhancing lesion", "D": "speckled calcification"}


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0], [2.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    expected = torch.tensor(
        [
            [1 / 7, 1 / 4, 0.0, 1.0],  # overlap 1 of union 7; contains 1x1; touches an edge; identical
            [4 / 16, 1 / 16, 2 / 16, 4 / 16],
            [0.0, 0.0, 0.0, 0.0],  # zero-area box: 0, not NaN
        ]
    )
    iou = box_iou(a, b)
    assert iou.shape == (3, 4) and iou.dtype == torch.float32
    torch.testing.assert_close(iou, expected)
    assert box_iou(a.double(), b).dtype == torch.float64
    assert box_iou(a[:0], b).shape == (0, 4)
    assert box_iou(a[2:], a[2:]).item() == 0.0  # two identical points: empty union


def test_box_iou_half_precision_and_errors():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]], dtype=torch.bfloat16)
    assert box_iou(a, a).dtype == torch.bfloat16 and box_iou(a, a).item() == 1.0
    with pytest.raises(ValueError, match="a must have shape"):
        box_iou(torch.zeros(3, 5), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="b must be a floating"):
        box_iou(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="b must be a torch.Tensor"):
        box_iou(torch.zeros(1, 4), [[0, 0, 1, 1]])


def test_iou_reward_mean_over_ground_truth_of_best_match():
    gt = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    # first gt matched exactly; second covered by a quarter-size box: IoU 0.0625 / 0.25
    pred = [[0.5, 0.5, 0.75, 0.75], [0.0, 0.0, 0.5, 0.5], [0.9, 0.0, 1.0, 0.1]]
    assert iou_reward(pred, gt) == pytest.approx((1.0 + 0.25) / 2)
    assert iou_reward([], gt) == 0.0
    assert iou_reward(torch.empty(0, 4), gt) == 0.0
    assert iou_reward([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]) == pytest.approx(1.0)  # flat single boxes
    assert iou_reward([[float("nan"), 0, 1, 1], [0.0, 0.0, 0.5, 0.5]], gt) == pytest.approx(0.5)
    text = "<think>x</think><box>[[0.0,0.0,0.5,0.5]]</box><answer>A</answer>"
    assert iou_reward(text, gt) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gt_boxes must contain"):
        iou_reward(pred, [])
    with pytest.raises(ValueError, match="pred_boxes must have shape"):
        iou_reward([[0.1, 0.2, 0.3]], gt)
    with pytest.raises(ValueError, match="gt_boxes must be finite"):
        iou_reward(pred, [[0.0, 0.0, float("inf"), 1.0]])


GOOD = "<think>Lesion: ring.</think><box>[[0.2,0.2,0.4,0.4]]</box><answer>C</answer>"


@pytest.mark.parametrize(
    "text, fmt, acc",
    [
        (GOOD, 1.0, 1.0),
        (GOOD.replace(">C<", ">c<"), 1.0, 1.0),  # lowercase letter
        (GOOD.replace(">C<", ">(C) ring-enhancing lesion<"), 1.0, 1.0),
        (GOOD.replace(">C<", ">ring-enhancing lesion<"), 1.0, 1.0),  # option text only
        (GOOD.replace(">C<", ">The answer is C.<"), 1.0, 1.0),
        (GOOD.replace(">C<", ">B<"), 1.0, 0.0),  # wrong letter
        (GOOD.replace(">C<", ">C or B<"), 1.0, 0.0),  # hedging is not rewarded
        (GOOD.replace("<box>[[0.2,0.2,0.4,0.4]]</box>", ""), 0.0, 1.0),  # missing box: format only
        (GOOD.replace("[[0.2,0.2,0.4,0.4]]", "[[0.2,0.2,0.4,0.4],[0.6,0.6,0.8,0.9]]"), 1.0, 1.0),
        ("<think>it is C</think><box>[[0.2,0.2,0.4,0.4]]</box><answer>A</answer>", 1.0, 0.0),  # think ignored
        ("<think>x</think> C", 0.0, 1.0),  # no answer tag: the text after </think> is the answer
        ("C", 0.0, 1.0),
        ("", 0.0, 0.0),
        ("]]]<<answer>>", 0.0, 0.0),
    ],
)
def test_format_and_accuracy_rewards_table(text, fmt, acc):
    assert format_reward(text) == fmt
    assert accuracy_reward(text, "C", OPTIONS) == acc


def test_accuracy_reward_gold_forms_and_free_text():
    assert accuracy_reward(GOOD, "ring-enhancing lesion", OPTIONS) == 1.0  # gold as option text
    assert accuracy_reward(GOOD, "(c)", OPTIONS) == 1.0
    assert accuracy_reward(GOOD, "C", None) == 1.0  # letters without an options table
    assert accuracy_reward(GOOD, "C", "A. x\nB. y\nC. z") == 1.0  # inline options
    free = "<think>x</think><box>[[0,0,1,1]]</box><answer>Yes.</answer>"
    assert accuracy_reward(free, "yes") == 1.0
    assert accuracy_reward(free, "no") == 0.0
    assert accuracy_reward(free, "") == 0.0


def test_format_reward_bbox2d_needs_image_size():
    text = '<think>x</think><box>[{"bbox_2d": [10, 10, 50, 50]}]</box><answer>C</answer>'
    assert format_reward(text) == 0.0
    assert format_reward(text, image_size=(100, 100)) == 1.0


def test_cross_feedback_hand_example():
    grounding_acc = torch.tensor([1.0, 0.0, 1.0])
    sparse_acc = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    grounding_reward, sparse_reward = cross_feedback_rewards(grounding_acc, sparse_acc)
    torch.testing.assert_close(grounding_reward, torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(sparse_reward, torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4]))
    sparse_reward[0, 0] = 5.0  # the result owns its memory (not a view of grounding_acc)
    assert grounding_acc[0] == 1.0


def test_cross_feedback_lists_bool_and_errors():
    grounding_reward, sparse_reward = cross_feedback_rewards([True, False], [[1, 0, 1], [1, 1, 1]])
    assert grounding_reward.dtype == torch.float32 and sparse_reward.shape == (2, 3)
    torch.testing.assert_close(grounding_reward, torch.tensor([2 / 3, 1.0]))
    torch.testing.assert_close(sparse_reward[1], torch.zeros(3))
    g64, _ = cross_feedback_rewards(torch.ones(1, dtype=torch.float64), torch.ones(1, 2))
    assert g64.dtype == torch.float64
    with pytest.raises(ValueError, match="grounding_acc must have shape"):
        cross_feedback_rewards(torch.ones(2, 1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="sparse_acc must have shape"):
        cross_feedback_rewards(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="they must match"):
        cross_feedback_rewards(torch.ones(3), torch.ones(2, 4))


def test_completion_text_forms():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "ab"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]) == "x"
    assert completion_text(None) == ""


def test_trl_wrappers_match_core_rewards():
    completions = [
        GOOD,
        [{"role": "assistant", "content": GOOD.replace(">C<", ">B<")}],
        [{"role": "assistant", "content": [{"type": "text", "text": "garbage"}]}],
        '<think>x</think><box>[{"bbox_2d": [20, 20, 40, 40]}]</box><answer>C</answer>',
    ]
    prompts = ["p"] * 4
    columns = dict(
        answer=["C", "C", "C", None],
        bbox=[[[0.2, 0.2, 0.4, 0.4]], [[0.2, 0.2, 0.4, 0.4]], [[0.2, 0.2, 0.4, 0.4]], [[0.2, 0.2, 0.4, 0.4]]],
        options=[OPTIONS, OPTIONS, OPTIONS, OPTIONS],
        image_size=[None, None, None, (100, 100)],
        completion_ids=[[1], [2], [3], [4]],  # TRL passes extra keywords; they must be ignored
        trainer_state=None,
    )
    assert trl_format_reward(prompts, completions, **columns) == [1.0, 1.0, 0.0, 1.0]
    assert trl_accuracy_reward(prompts, completions, **columns) == [1.0, 0.0, 0.0, None]
    iou = trl_iou_reward(prompts, completions, **columns)
    assert iou[:3] == [pytest.approx(1.0), pytest.approx(1.0), 0.0] and iou[3] == pytest.approx(1.0)

    no_box = dict(columns, bbox=[None, [], [[0.2, 0.2, 0.4, 0.4]], None])
    assert trl_iou_reward(prompts, completions, **no_box)[:2] == [None, None]
    with pytest.raises(ValueError, match="'bbox'"):
        trl_iou_reward(prompts, completions, answer=columns["answer"])
    with pytest.raises(ValueError, match="answer has 2 entries"):
        trl_accuracy_reward(prompts, completions, answer=["C", "C"])
    assert [f.__name__ for f in (trl_format_reward, trl_iou_reward, trl_accuracy_reward)] == [
        "trl_format_reward",
        "trl_iou_reward",
        "trl_accuracy_reward",
    ]
