"""Output contract: parse_output on tricky outputs, format_output round trip, multiple-choice extraction."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitos_ext.parsing import (
    BoxSyntax,
    extract_choice,
    format_output,
    normalize_options,
    parse_output,
    split_inline_options,
)

GOOD = "<think>Bright round focus.</think><box>[[0.1,0.2,0.3,0.4]]</box><answer>C</answer>"

# (text, image_size, format_ok, boxes, answer, box_syntax)
CASES = [
    pytest.param(GOOD, None, True, [[0.1, 0.2, 0.3, 0.4]], "C", "box_tag", id="canonical"),
    pytest.param(
        "  <think> x </think>\n<box> [ [0.1, 0.2, 0.3, 0.4] , [0.5,0.5,0.9,0.95] ] </box>\n<answer> (b) </answer>\n",
        None, True, [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.95]], "(b)", "box_tag", id="whitespace-two-boxes",
    ),
    pytest.param(
        "<think>x</think><box>[0.1,0.2,0.3,0.4]</box><answer>c</answer><|im_end|>",
        None, True, [[0.1, 0.2, 0.3, 0.4]], "c", "box_tag", id="flat-box-lowercase-trailing-eos",
    ),
    pytest.param(
        "<THINK>x</THINK><Box>[[0, 0, 1, 1]]</Box><ANSWER>A</ANSWER>",
        None, True, [[0.0, 0.0, 1.0, 1.0]], "A", "box_tag", id="uppercase-tags-integer-coords",
    ),
    pytest.param(
        "<think>x</think><box>[[1e-1, 2E-1, .3, 0.4]]</box><answer>A</answer>",
        None, True, [[0.1, 0.2, 0.3, 0.4]], "A", "box_tag", id="scientific-and-bare-decimals",
    ),
    pytest.param(
        "<think>x</think><box>[[-0.005,0.2,1.004,0.4]]</box><answer>A</answer>",
        None, True, [[0.0, 0.2, 1.0, 0.4]], "A", "box_tag", id="overshoot-within-tolerance-clamped",
    ),
    pytest.param(
        "<think>x</think><answer>C</answer>", None, False, [], "C", "none", id="missing-box-block",
    ),
    pytest.param(
        "<box>[[0.1,0.2,0.3,0.4]]</box><answer>C</answer>", None, False, [[0.1, 0.2, 0.3, 0.4]], "C", "box_tag",
        id="missing-think",
    ),
    pytest.param(
        "<think>x</think><box>[[0.1,0.2,0.3,0.4]]</box>", None, False, [[0.1, 0.2, 0.3, 0.4]], None, "box_tag",
        id="missing-answer",
    ),
    pytest.param(
        "<think>x</think><box>[[0.1,0.2,0.3,0.4]]</box><answer>D", None, False, [[0.1, 0.2, 0.3, 0.4]], "D",
        "box_tag", id="unclosed-answer-truncated",
    ),
    pytest.param(
        "<answer>C</answer><think>x</think><box>[[0.1,0.2,0.3,0.4]]</box>", None, False,
        [[0.1, 0.2, 0.3, 0.4]], "C", "box_tag", id="wrong-order",
    ),
    pytest.param(
        GOOD + "<answer>D</answer>", None, False, [[0.1, 0.2, 0.3, 0.4]], "C", "box_tag", id="two-answers",
    ),
    pytest.param(
        GOOD + " and some chatter", None, False, [[0.1, 0.2, 0.3, 0.4]], "C", "box_tag", id="trailing-text",
    ),
    pytest.param(
        "<think>x</think><box>[]</box><answer>C</answer>", None, False, [], "C", "none", id="empty-box-list",
    ),
    pytest.param(
        "<think>x</think><box>[[0.1,0.2,1.5,0.4]]</box><answer>C</answer>", None, False, [], "C", "box_tag",
        id="box-outside-unit-square",
    ),
    pytest.param(
        "<think>x</think><box>[[0.3,0.2,0.1,0.4]]</box><answer>C</answer>", None, False, [], "C", "box_tag",
        id="inverted-box",
    ),
    pytest.param(
        "<think>x</think><box>[[0.1,0.2,0.3]]</box><answer>C</answer>", None, False, [], "C", "box_tag",
        id="three-numbers",
    ),
    pytest.param(
        "<think>x</think><box>[[0.1,0.2,0.3,0.4],[0.1,0.2]]</box><answer>C</answer>", None, False,
        [[0.1, 0.2, 0.3, 0.4]], "C", "box_tag", id="one-good-one-malformed",
    ),
    pytest.param(
        "<think>x</think><box>[[12, 30, 50, 60]]</box><answer>C</answer>", (100, 100), False, [], "C", "box_tag",
        id="absolute-numbers-in-box-tag-are-not-rescaled",
    ),
    pytest.param(
        '<think>x</think><box>{"bbox_2d": [10, 20, 50, 60]}</box><answer>C</answer>', (100, 200), True,
        [[0.1, 0.1, 0.5, 0.3]], "C", "bbox_2d", id="bbox2d-in-box-tag",
    ),
    pytest.param(
        'Findings:\n```json\n[{"bbox_2d": [28, 56, 84, 112], "label": "nodule"}, '
        '{"bbox_2d": [0, 0, 56, 28], "label": "cyst"}]\n```\n<answer>B</answer>',
        (112, 224), False, [[0.25, 0.25, 0.75, 0.5], [0.0, 0.0, 0.5, 0.125]], "B", "bbox_2d",
        id="bbox2d-fenced-list-outside-tags",
    ),
    pytest.param(
        '{"bbox_2d": [10, 20, 50, 60], "label": "x"}', None, False, [], None, "bbox_2d",
        id="bbox2d-without-image-size",
    ),
    pytest.param("", None, False, [], None, "none", id="empty"),
    pytest.param("I cannot tell.", None, False, [], None, "none", id="prose"),
    # opened-but-empty blocks give "" (present, empty), absent blocks give None
    pytest.param("<<<>>>[[[]]]{{}}\x00\xff<think><box><answer>", None, False, [], "", "none", id="garbage"),
]


@pytest.mark.parametrize("text, image_size, format_ok, boxes, answer, syntax", CASES)
def test_parse_output_table(text, image_size, format_ok, boxes, answer, syntax):
    parsed = parse_output(text, image_size=image_size)
    assert parsed.format_ok is format_ok, parsed.problems
    assert parsed.box_syntax == syntax
    assert parsed.answer == answer
    assert len(parsed.boxes) == len(boxes)
    for got, want in zip(parsed.boxes, boxes):
        assert got == pytest.approx(want, abs=1e-9)
    assert (not parsed.problems) == format_ok


def test_bbox2d_without_size_is_reported_not_guessed():
    parsed = parse_output('<think>x</think><box>[{"bbox_2d": [10, 20, 50, 60]}]</box><answer>A</answer>')
    assert parsed.boxes == [] and parsed.normalizable is False
    assert parsed.raw_boxes == [[10.0, 20.0, 50.0, 60.0]]
    assert any("image_size" in p for p in parsed.problems)
    # an invalid size is treated like no size
    assert parse_output('{"bbox_2d": [1, 2, 3, 4]}', image_size=(0, 10)).normalizable is False
    assert parse_output('{"bbox_2d": [1, 2, 3, 4]}', image_size="big").normalizable is False


def test_bbox2d_single_quoted_python_dicts_and_overshoot():
    parsed = parse_output("[{'bbox_2d': [0, 0, 101, 50]}]", image_size=(100, 100))
    assert parsed.box_syntax == BoxSyntax.BBOX_2D
    assert parsed.boxes == [[0.0, 0.0, 1.0, 0.5]]  # 1% overshoot clamped


@pytest.mark.parametrize("bad", [None, 3, 4.5, b"<think>", ["<think>"], {"a": 1}, object()])
def test_parse_output_non_strings(bad):
    parsed = parse_output(bad)
    assert parsed.format_ok is False and parsed.boxes == [] and parsed.answer is None


_PIECES = list("<>/[](){},.:-0123456789eE abcxyz\n\"'") + [
    "<think>", "</think>", "<box>", "</box>", "<answer>", "</answer>", '"bbox_2d":', "nan", "inf", "1e309", "```json",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join) | st.text(max_size=60))
def test_parse_output_never_raises(text):
    parsed = parse_output(text, image_size=(64, 32))
    # the safety net in parse_output must never be what handled it
    assert not any(problem.startswith("parser error") for problem in parsed.problems), parsed.problems
    assert isinstance(parsed.format_ok, bool)
    for box in parsed.boxes:
        assert len(box) == 4 and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box)
        assert box[0] <= box[2] and box[1] <= box[3]


unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(unit, unit, unit, unit), min_size=1, max_size=4),
    st.text(alphabet="abc .,:", max_size=20),
    st.sampled_from(["A", "B", "c", "(D)"]),
    st.integers(min_value=0, max_value=4),
)
def test_format_output_round_trip(raw_boxes, think, answer, decimals):
    boxes = [[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in raw_boxes]
    text = format_output(think, boxes, answer, decimals=decimals)
    parsed = parse_output(text)
    assert parsed.format_ok, parsed.problems
    assert parsed.think == think.strip() and parsed.answer == answer.strip()
    tolerance = 0.5 * 10.0**-decimals + 1e-12
    assert len(parsed.boxes) == len(boxes)
    for got, want in zip(parsed.boxes, boxes):
        assert got == pytest.approx(want, abs=tolerance)


def test_format_output_layout_and_tensor_input():
    torch = pytest.importorskip("torch")
    text = format_output("t", torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]), "B")
    assert text == "<think>t</think><box>[[0.10,0.20,0.30,0.40], [0.50,0.60,0.70,0.80]]</box><answer>B</answer>"
    assert format_output("t", [0.1, 0.2, 0.3, 0.4], "A", decimals=1) == (
        "<think>t</think><box>[[0.1,0.2,0.3,0.4]]</box><answer>A</answer>"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(think="t", boxes=[], answer="A"), "boxes"),
        (dict(think="t", boxes=[[0.1, 0.2, 0.3]], answer="A"), "boxes\\[0\\]"),
        (dict(think="t", boxes=[[0.1, 0.2, 1.3, 0.4]], answer="A"), "boxes\\[0\\]"),
        (dict(think="t", boxes=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.2, 0.3, 0.4]], answer="A"), "boxes\\[1\\]"),
        (dict(think="t", boxes=[[0.1, 0.2, 0.3, 0.4]], answer=" "), "answer"),
        (dict(think="<box>", boxes=[[0.1, 0.2, 0.3, 0.4]], answer="A"), "think"),
        (dict(think=None, boxes=[[0.1, 0.2, 0.3, 0.4]], answer="A"), "think"),
        (dict(think="t", boxes=[[0.1, 0.2, 0.3, 0.4]], answer="A", decimals=-1), "decimals"),
    ],
)
def test_format_output_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        format_output(**kwargs)


OPTIONS = {"A": "Normal", "B": "Pleural effusion", "C": "Pneumonia", "D": "Pneumothorax"}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("C", "C"),
        ("c", "C"),
        ("(c)", "C"),
        ("C.", "C"),
        ("**B**", "B"),
        ("b)", "B"),
        ("C. Pneumonia", "C"),
        ("(c) pneumonia", "C"),
        ("the answer is C", "C"),
        ("The answer is c.", "C"),
        ("Answer: (B)", "B"),
        ("The correct option is D because the lung is collapsed.", "D"),
        ("Final answer: **C**", "C"),
        ("B is correct", "B"),
        ("A lesion is seen in the lung", None),  # the article, not option A
        ("Answer: a.", "A"),
        ("pneumonia", "C"),
        ("PNEUMONIA.", "C"),
        ("It shows a pleural effusion", "B"),
        ("Pneumothorax", "D"),  # contains no other option text
        ("C. Pleural effusion", None),  # letter and text disagree
        ("A or B", None),
        ("the answer is A, or maybe the answer is B", None),
        ("the answer is a bright lesion", None),  # 'a' is an article here
        ("E", None),  # not an option
        ("", None),
        ("   ", None),
        ("no idea", None),
        # LaTeX final answers: the last \\boxed{} counts
        ("\\boxed{C}", "C"),
        ("The answer is $\\boxed{\\text{(b)}}$.", "B"),
        ("\\boxed{Pneumothorax}", "D"),
        ("First I thought \\boxed{A}, but on reflection \\boxed{C}", "C"),
        ("\\boxed{}", None),
        # option text after a negation cue in its clause does not pick the option
        ("not pneumonia", None),
        ("No evidence of pneumonia", None),
        ("without pneumothorax", None),
        ("It is not pneumonia but a pleural effusion", "B"),
        ("Pleural effusion rather than pneumonia.", "B"),
        ("Pneumonia is ruled out; pneumothorax", None),  # a cue after the option text is not read: both named
        ("Not sure. Pneumonia", "C"),  # the cue is in another clause
        ("This isn't normal: pneumothorax", "D"),
    ],
)
def test_extract_choice(answer, expected):
    assert extract_choice(answer, OPTIONS) == expected


def test_extract_choice_prefers_specific_option_text_and_handles_option_forms():
    options = ["round", "bright round", "dark"]
    assert extract_choice("a bright round lesion", options) == "B"
    assert extract_choice("round", options) == "A"
    assert extract_choice("C", None) == "C"  # without options any letter is valid
    assert extract_choice("Z", ["x", "y"]) is None
    assert extract_choice(None, OPTIONS) is None
    assert extract_choice("B", "A. x\nB. y") == "B"


def test_extract_choice_option_texts_that_are_negations_themselves():
    options = {"A": "Pleural effusion", "B": "No pleural effusion", "C": "Normal, no findings"}
    assert extract_choice("no pleural effusion", options) == "B"
    assert extract_choice("There is no pleural effusion.", options) == "B"  # the more specific option text
    assert extract_choice("A small pleural effusion", options) == "A"
    assert extract_choice("normal, no findings", options) == "C"
    assert extract_choice("The scan is normal no findings", options) == "C"  # punctuation is optional
    assert extract_choice("not normal, no findings", options) is None


def test_normalize_and_split_options():
    assert normalize_options({"(a)": "x", "B.": " y "}) == {"A": "x", "B": "y"}
    assert normalize_options(["x", "y"]) == {"A": "x", "B": "y"}
    assert normalize_options(None) == {}
    assert normalize_options({"A": "x", "B": "y", "E": None}) == {"A": "x", "B": "y"}  # Arrow-padded structs
    with pytest.raises(ValueError, match="options key"):
        normalize_options({"AB": "x"})
    with pytest.raises(ValueError, match="twice"):
        normalize_options({"a": "x", "A": "y"})
    with pytest.raises(ValueError, match="options must be"):
        normalize_options(3)

    question = "<image>What is shown?\nA. Normal\nB) Pleural effusion\n(C) Pneumonia\nD: Pneumothorax"
    assert split_inline_options(question) == OPTIONS
    assert split_inline_options("Which? A. cyst B. nodule C. mass") == {"A": "cyst", "B": "nodule", "C": "mass"}
    assert split_inline_options("A. Only one option here") == {}
    assert split_inline_options("Is there a mass? B. not a run from A") == {}
