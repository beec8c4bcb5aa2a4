"""The ViToS output contract: parse policy outputs, format gold targets, extract multiple-choice letters.

Contract (normalized coordinates, x right, y down, each in [0, 1]):

    <think>...</think><box>[[x1,y1,x2,y2], ...]</box><answer>...</answer>

Qwen2.5-VL's native grounding syntax is accepted as well: ``{"bbox_2d": [x1, y1, x2, y2], ...}`` objects (one
object, a list of them, optionally inside a ```json fence) with *absolute pixel* coordinates in the resized image.
Those are normalized with the ``image_size`` the caller passes; without it they cannot be normalized and the
result says so instead of guessing a scale.

Nothing here imports torch: the parser is shared by rewards, the pipeline and data tooling.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BOX_TOLERANCE",
    "BoxSyntax",
    "ParsedOutput",
    "parse_output",
    "format_output",
    "extract_choice",
    "normalize_options",
    "split_inline_options",
]

# Coordinates this far outside the image (in normalized units) are clamped rather than rejected: models often
# overshoot the border by a pixel or two.
BOX_TOLERANCE = 0.01


class BoxSyntax:
    """Which box syntax a parsed output used (plain string constants, JSON friendly)."""

    NONE = "none"
    BOX_TAG = "box_tag"  # numeric lists inside <box>...</box>, normalized coordinates
    BBOX_2D = "bbox_2d"  # Qwen2.5-VL {"bbox_2d": [...]} objects, absolute pixel coordinates


@dataclass(frozen=True)
class ParsedOutput:
    """Result of :func:`parse_output`.

    Attributes:
        think: text inside ``<think>...</think>`` (stripped), or None when absent.
        boxes: valid boxes as normalized ``[x1, y1, x2, y2]`` floats in [0, 1] with x1 <= x2 and y1 <= y2, in the
            order they were written. Empty when none was found or none could be normalized.
        answer: text inside ``<answer>...</answer>`` (stripped), or None when absent.
        format_ok: the whole text follows the contract: think, box and answer blocks in this order with only
            whitespace around them, at least one box, every box valid, a non-empty answer.
        box_syntax: one of :class:`BoxSyntax` (``"box_tag"``, ``"bbox_2d"``, ``"none"``).
        raw_boxes: every 4-number box as written (before normalization), including invalid ones.
        normalizable: False when absolute ``bbox_2d`` coordinates were found but no ``image_size`` was given.
        problems: human-readable reasons why ``format_ok`` is False (empty when it is True).
    """

    think: str | None
    boxes: list[list[float]]
    answer: str | None
    format_ok: bool
    box_syntax: str = BoxSyntax.NONE
    raw_boxes: list[list[float]] = field(default_factory=list)
    normalizable: bool = True
    problems: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# parsing

_TAG_NAMES = ("think", "box", "answer")
_TRAILING_SPECIALS = re.compile(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>|</s>|<eos>))+\s*$")
_STRICT_LAYOUT = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<box>(?P<box>.*?)</box>\s*<answer>(?P<answer>.*?)</answer>\s*\Z",
    re.IGNORECASE | re.DOTALL,
)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# innermost bracket groups: [..] or (..) with no nested brackets inside
_INNER_GROUP = re.compile(r"[\[(]([^\[\]()]*)[\])]")
_BBOX_2D = re.compile(r"""["']bbox_2d["']\s*:\s*\[([^\[\]]*)\]""", re.IGNORECASE)


def _tag_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<{name}>(.*?)</{name}>", re.IGNORECASE | re.DOTALL)


_CLOSED_TAG = {name: _tag_pattern(name) for name in _TAG_NAMES}
_OPEN_TAG = {name: re.compile(rf"<{name}>", re.IGNORECASE) for name in _TAG_NAMES}
_ANY_TAG = re.compile(r"</?(?:think|box|answer)>", re.IGNORECASE)


def _block(text: str, name: str) -> tuple[str | None, int]:
    """Content of the first ``<name>`` block and how many closed blocks there are.

    An opened but unclosed block runs to the next contract tag or the end of the text, so truncated generations
    still yield their content.
    """
    closed = _CLOSED_TAG[name].findall(text)
    if closed:
        return closed[0], len(closed)
    opened = _OPEN_TAG[name].search(text)
    if opened is None:
        return None, 0
    rest = text[opened.end() :]
    next_tag = _ANY_TAG.search(rest)
    return (rest[: next_tag.start()] if next_tag else rest), 0


def _numbers(text: str) -> list[float]:
    return [float(m) for m in _NUMBER.findall(text)]


def _numeric_boxes(payload: str) -> tuple[list[list[float]], int]:
    """4-number boxes in a ``<box>`` payload and the count of bracket groups that were not 4 numbers."""
    groups = _INNER_GROUP.findall(payload)
    if not groups:
        values = _numbers(payload)
        if len(values) == 4:  # "0.1, 0.2, 0.3, 0.4" without brackets
            return [values], 0
        return [], (1 if values else 0)
    boxes, malformed = [], 0
    for group in groups:
        values = _numbers(group)
        if len(values) == 4:
            boxes.append(values)
        elif group.strip():
            malformed += 1
    return boxes, malformed


def _bbox_2d_boxes(text: str) -> tuple[list[list[float]], int]:
    """Absolute ``bbox_2d`` boxes anywhere in ``text`` (fences, lists and broken JSON are all fine)."""
    boxes, malformed = [], 0
    for group in _BBOX_2D.findall(text):
        values = _numbers(group)
        if len(values) == 4:
            boxes.append(values)
        else:
            malformed += 1
    return boxes, malformed


def _clamp_normalized(box: Sequence[float]) -> list[float] | None:
    """Clamp a normalized box within ``BOX_TOLERANCE`` of [0, 1]; None when it is invalid."""
    if not all(math.isfinite(v) for v in box):
        return None
    if any(v < -BOX_TOLERANCE or v > 1.0 + BOX_TOLERANCE for v in box):
        return None
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in box)
    if x2 < x1 or y2 < y1:
        return None
    return [x1, y1, x2, y2]


def _valid_image_size(image_size) -> tuple[float, float] | None:
    try:
        width, height = (float(v) for v in image_size)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        return None
    return width, height


def _strip_trailing_specials(text: str) -> str:
    return _TRAILING_SPECIALS.sub("", text)


def _collect_boxes(text: str, box_payload: str | None, image_size) -> tuple[str, list, list, bool, list[str]]:
    """Find boxes (box tag first, then bbox_2d anywhere) and normalize them."""
    problems: list[str] = []
    syntax, raw, malformed = BoxSyntax.NONE, [], 0
    if box_payload is not None and _BBOX_2D.search(box_payload):
        syntax = BoxSyntax.BBOX_2D
        raw, malformed = _bbox_2d_boxes(box_payload)
    elif box_payload is not None:
        raw, malformed = _numeric_boxes(box_payload)
        syntax = BoxSyntax.BOX_TAG if raw or malformed else BoxSyntax.NONE
    if syntax == BoxSyntax.NONE and _BBOX_2D.search(text):
        syntax = BoxSyntax.BBOX_2D
        raw, malformed = _bbox_2d_boxes(text)
    if malformed:
        problems.append(f"{malformed} box(es) without exactly 4 numbers")

    normalizable = True
    if syntax == BoxSyntax.BBOX_2D:
        size = _valid_image_size(image_size) if image_size is not None else None
        if size is None:
            normalizable = False
            problems.append("bbox_2d boxes use absolute pixels but no valid image_size=(width, height) was given")
            return syntax, raw, [], normalizable, problems
        width, height = size
        candidates = [[b[0] / width, b[1] / height, b[2] / width, b[3] / height] for b in raw]
    else:
        candidates = raw

    boxes = []
    for box in candidates:
        clamped = _clamp_normalized(box)
        if clamped is None:
            problems.append(f"invalid box {box} (outside [0, 1], inverted or not finite)")
        else:
            boxes.append(clamped)
    return syntax, raw, boxes, normalizable, problems


def parse_output(text, image_size: Sequence[float] | None = None) -> ParsedOutput:
    """Parse a policy output against the ViToS contract. Never raises, whatever ``text`` is.

    Args:
        text: the generated text (special tokens such as ``<|im_end|>`` at the end are ignored). Non-strings
            give an empty, not-ok result.
        image_size: ``(width, height)`` in pixels of the image *as the model saw it* (after the processor's
            resize); needed only to normalize Qwen2.5-VL ``bbox_2d`` absolute coordinates. For Qwen2-VL /
            Qwen2.5-VL processors that is ``(grid_w * 14, grid_h * 14)`` from ``image_grid_thw = (t, grid_h, grid_w)``.

    Returns:
        A :class:`ParsedOutput`. Fields are filled leniently (an unclosed ``<answer>`` still yields its text);
        ``format_ok`` is the strict verdict.
    """
    try:
        return _parse(text, image_size)
    except Exception as error:  # noqa: BLE001 - the contract is "never raises"; report instead
        return ParsedOutput(None, [], None, False, problems=(f"parser error: {type(error).__name__}: {error}",))


def _parse(text, image_size) -> ParsedOutput:
    if not isinstance(text, str):
        return ParsedOutput(None, [], None, False, problems=(f"expected a string, got {type(text).__name__}",))
    text = _strip_trailing_specials(text)
    problems: list[str] = []

    think, n_think = _block(text, "think")
    box_payload, n_box = _block(text, "box")
    answer, n_answer = _block(text, "answer")
    syntax, raw, boxes, normalizable, box_problems = _collect_boxes(text, box_payload, image_size)
    problems.extend(box_problems)

    think = think.strip() if think is not None else None
    answer = answer.strip() if answer is not None else None

    strict = _STRICT_LAYOUT.match(text)
    if strict is None or (n_think, n_box, n_answer) != (1, 1, 1):
        problems.append("text does not follow <think>...</think><box>...</box><answer>...</answer> exactly once")
    if not boxes and normalizable:
        problems.append("no valid box")
    if not answer:
        problems.append("empty or missing answer")
    return ParsedOutput(
        think=think,
        boxes=boxes,
        answer=answer,
        format_ok=not problems,
        box_syntax=syntax,
        raw_boxes=raw,
        normalizable=normalizable,
        problems=tuple(problems),
    )


# ----------------------------------------------------------------------------------------------------------------
# formatting


def _check_box(box, index: int) -> list[float]:
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"boxes[{index}] must be 4 numbers, got {box!r}") from None
    if len(values) != 4:
        raise ValueError(f"boxes[{index}] must have 4 coordinates (x1, y1, x2, y2), got {len(values)}")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"boxes[{index}] must be normalized to [0, 1], got {values}")
    if values[2] < values[0] or values[3] < values[1]:
        raise ValueError(f"boxes[{index}] must have x1 <= x2 and y1 <= y2, got {values}")
    return values


def format_output(think: str, boxes, answer: str, decimals: int = 2) -> str:
    """Render a gold target in the contract format (for SFT warm-up and prompts with examples).

    Args:
        think: the reasoning text (may be empty; must not contain contract tags).
        boxes: normalized boxes, a sequence of ``[x1, y1, x2, y2]`` (or anything with ``tolist()``: a float
            tensor/array of shape [N, 4]); at least one.
        answer: the answer text, e.g. ``"C"``; must be non-empty.
        decimals: digits after the decimal point for every coordinate (fixed width keeps targets regular).

    Returns:
        ``<think>{think}</think><box>[[x1,y1,x2,y2], ...]</box><answer>{answer}</answer>``, which
        :func:`parse_output` reads back with ``format_ok=True``.
    """
    if not isinstance(think, str):
        raise ValueError(f"think must be a string, got {type(think).__name__}")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("answer must be a non-empty string")
    for name, value in (("think", think), ("answer", answer)):
        if _ANY_TAG.search(value):
            raise ValueError(f"{name} must not contain <think>/<box>/<answer> tags: {value!r}")
    if not isinstance(decimals, int) or not 0 <= decimals <= 8:
        raise ValueError(f"decimals must be an int in [0, 8], got {decimals!r}")
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    if not isinstance(boxes, Sequence) or isinstance(boxes, str) or len(boxes) == 0:
        raise ValueError("boxes must be a non-empty sequence of [x1, y1, x2, y2]")
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes]  # a single flat box
    rendered = ", ".join(
        "[" + ",".join(f"{v:.{decimals}f}" for v in _check_box(box, i)) + "]" for i, box in enumerate(boxes)
    )
    return f"<think>{think}</think><box>[{rendered}]</box><answer>{answer.strip()}</answer>"


# ----------------------------------------------------------------------------------------------------------------
# multiple choice

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_KEY = re.compile(r"^\W*([A-Za-z])\W*$")
# "A. text", "(B) text", "C) text", "D: text" at the start of a line
_INLINE_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])\s*[.):：]\s*(\S.*?)\s*$")
# the same on one line: "... A. x B. y" / "(A) x (B) y"
_INLINE_OPTION_SPAN = re.compile(r"(?:(?<=\s)|^)\(?([A-Z])[.):]\s+")


def normalize_options(options) -> dict[str, str]:
    """Options as an ordered ``{"A": text, ...}`` dict.

    Args:
        options: a dict (keys like ``"A"``, ``"(b)"``, ``"C."``; None values are absent options), a list/tuple of
            option texts (lettered A, B, ...), a string with one option per line (``"A. x\\nB. y"``), or None.

    Raises:
        ValueError: ``options`` has another type, a key that is not a single letter, or duplicate letters.
    """
    if options is None:
        return {}
    if isinstance(options, str):
        return split_inline_options(options)
    if isinstance(options, Mapping):
        result = {}
        for key, value in options.items():
            if value is None:  # absent option (e.g. Arrow pads option structs with nulls)
                continue
            match = _OPTION_KEY.match(str(key))
            if match is None:
                raise ValueError(f"options key {key!r} is not a single letter")
            letter = match.group(1).upper()
            if letter in result:
                raise ValueError(f"options has the letter {letter!r} twice")
            result[letter] = str(value).strip()
        return result
    if isinstance(options, Sequence):
        if len(options) > len(_LETTERS):
            raise ValueError(f"options has {len(options)} entries; at most 26 letters are supported")
        return {_LETTERS[i]: str(text).strip() for i, text in enumerate(options)}
    raise ValueError(f"options must be a dict, list, string or None, got {type(options).__name__}")


def _consecutive_from_a(letters: list[str]) -> bool:
    return len(letters) >= 2 and letters == list(_LETTERS[: len(letters)])


def split_inline_options(question: str) -> dict[str, str]:
    """Options written inside a question (``"A. x\\nB. y"`` lines, or ``"A. x B. y"`` on one line).

    Only a run of letters A, B, C, ... (at least two) counts, so ordinary prose is not mistaken for options.
    Returns an empty dict when there are none.
    """
    if not isinstance(question, str):
        return {}
    found: dict[str, str] = {}
    for line in question.splitlines():
        match = _INLINE_OPTION_LINE.match(line)
        if match and match.group(1) not in found:
            found[match.group(1)] = match.group(2)
    if _consecutive_from_a(list(found)):
        return found
    for line in question.splitlines():
        starts = list(_INLINE_OPTION_SPAN.finditer(line))
        letters = [m.group(1) for m in starts]
        if not _consecutive_from_a(letters):
            continue
        spans = {}
        for i, match in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(line)
            spans[match.group(1)] = line[match.end() : end].strip().rstrip(",;")
        return spans
    return {}


def _normalize_text(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


# Clause punctuation becomes this marker in the text that option texts are searched in, so that a negation cue is
# only looked for inside the clause that names the option ("Not sure. Pneumonia" picks pneumonia).
_CLAUSE_BREAK = "~"


def _normalize_clauses(text: str) -> str:
    marked = re.sub(r"[.,;:!?]+(?=\s|$)", f" {_CLAUSE_BREAK} ", text.lower())
    return " ".join(re.sub(rf"[^0-9a-z{_CLAUSE_BREAK}]+", " ", marked).split())


# "not pneumonia", "no evidence of pneumonia", "effusion rather than pneumonia": the option text right after such a
# cue (at most two words between, same clause) is ruled out, not chosen
_NEGATION_BEFORE = re.compile(
    r"\b(?:not|no|never|without|nor|neither|excluding|except|exclude|excludes|ruled out|rule out|rules out|"
    r"rather than|instead of|isn t|aren t|doesn t|don t)(?:\s+[0-9a-z]+){0,2}\s*$"
)


def _named_without_negation(option_text: str, clauses: str) -> bool:
    """Whether the normalized ``option_text`` occurs in ``clauses`` at least once without a negation cue before it
    in its clause (a clause break may stand between the option's own words: "Normal, no findings")."""
    words = (re.escape(word) for word in option_text.split())
    pattern = rf"(?<![0-9a-z]){rf'(?: {_CLAUSE_BREAK})? '.join(words)}(?![0-9a-z])"
    for match in re.finditer(pattern, clauses):
        clause = clauses[: match.start()].rsplit(_CLAUSE_BREAK, 1)[-1]
        if not _NEGATION_BEFORE.search(clause):
            return True
    return False


_BARE_LETTER = re.compile(r"^\W*\(?([A-Za-z])\)?\W*$")
_LEADING_LETTER = re.compile(r"^\W*(?:\(([A-Za-z])\)|([A-Za-z])[.):])\s*(.*)$", re.DOTALL)
_ANSWER_PHRASE = re.compile(
    r"(?:answer|option|choice)\b\s*(?:is|would be|should be)?\s*:?[\s*_\"'(\[]*([A-Za-z])(?=[\s*_\"')\].,;:]|$)",
    re.IGNORECASE,
)
# "B is correct": an upper-case letter opening the answer and followed by a verb (never the article "A lesion ...")
_LETTER_THEN_VERB = re.compile(r"^\W*([A-Z])\s+(?:is|was|would|seems|appears|should)\b")


# LaTeX final answers of reasoning models: "\boxed{C}", "$\boxed{\text{(B) Pneumonia}}$" (one level of inner braces)
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` with LaTeX commands and braces removed, or None."""
    found = _BOXED.findall(text)
    if not found:
        return None
    return re.sub(r"\\[A-Za-z]+|[{}$]", " ", found[-1]).strip() or None


def _phrase_letters(text: str) -> set[str]:
    letters = set()
    for match in _ANSWER_PHRASE.finditer(text):
        letter = match.group(1)
        rest = text[match.end(1) :]
        # "the answer is a bright lesion": a lowercase 'a'/'i' followed by words is an article, not a letter
        if letter.islower() and re.match(r"[)*_\"'\]]*\s+[A-Za-z]", rest):
            continue
        letters.add(letter.upper())
    return letters


def _text_match(answer: str, options: dict[str, str]) -> str | None:
    normalized = _normalize_text(answer)
    if not normalized:
        return None
    texts = {letter: _normalize_text(text) for letter, text in options.items() if _normalize_text(text)}
    exact = [letter for letter, text in texts.items() if text == normalized]
    if len(exact) == 1:
        return exact[0]
    clauses = _normalize_clauses(answer)
    contained = [letter for letter, text in texts.items() if _named_without_negation(text, clauses)]
    # "bright round" also contains "round": keep only the most specific matches
    specific = [a for a in contained if not any(a != b and texts[a] in texts[b] for b in contained)]
    return specific[0] if len(specific) == 1 else None


def extract_choice(answer_text, options=None) -> str | None:
    """The option letter an answer picks, or None when it picks none or is ambiguous.

    Understands ``"C"``, ``"(c)"``, ``"C. Pneumonia"``, ``"c) pneumonia"``, ``"The answer is C"``,
    ``"Answer: (C)"``, ``"Final answer: **C**"``, ``"C is correct"``, ``"\\boxed{C}"`` (the last one counts) and the
    option text alone (``"pneumonia"``, case and punctuation insensitive). Option text after a negation cue in its
    clause (``"not pneumonia"``, ``"no evidence of pneumonia"``, ``"effusion rather than pneumonia"``) does not
    pick that option.
    A letter whose trailing text names a *different* option (``"C. Effusion"`` when Effusion is B) and two
    different letters (``"the answer is A or the answer is B"``) are ambiguous and give None.

    Args:
        answer_text: the answer (e.g. :attr:`ParsedOutput.answer`); non-strings give None.
        options: anything :func:`normalize_options` accepts. With options only their letters are valid; without,
            any single letter A-Z is.
    """
    if not isinstance(answer_text, str):
        return None
    try:
        options = normalize_options(options)
    except ValueError:
        options = {}
    valid = set(options) if options else set(_LETTERS)
    text = _last_boxed(answer_text) or _ANY_TAG.sub(" ", answer_text).strip()
    if not text:
        return None

    def accept(letter: str | None) -> str | None:
        return letter.upper() if letter and letter.upper() in valid else None

    bare = _BARE_LETTER.match(text)
    if bare:
        return accept(bare.group(1))
    leading = _LEADING_LETTER.match(text)
    if leading:
        letter = (leading.group(1) or leading.group(2)).upper()
        rest = leading.group(3)
        # "C. Pneumonia" is a letter choice; so is "(c) x". "A. ..." whose rest names another option is ambiguous.
        if letter in valid:
            other = _text_match(rest, options) if options and rest else None
            return letter if other in (None, letter) else None
    verb = _LETTER_THEN_VERB.match(text)
    if verb and verb.group(1) in valid:
        return verb.group(1)
    phrase = _phrase_letters(text) & valid
    if len(phrase) == 1:
        return phrase.pop()
    if len(phrase) > 1:
        return None
    if options:
        return _text_match(text, options)
    return None
