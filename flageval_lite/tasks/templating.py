"""Jinja environment for task specs: prompt templates, value expressions and benchmark helpers.

`prompt` and `system` are templates (text out).  Every other computed field (`gold`, `meta`, `derive`,
`where`, `id_field`, `images.expr`) is a jinja *expression* compiled with `compile_expression`, so it
returns native Python values untouched (a gold "025" stays the string "025").

The helpers reproduce the prompt rules of the reference harnesses; each says which rule it follows.
"""
from __future__ import annotations

import ast
import hashlib
import random
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import jinja2
from jinja2 import pass_context

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# FlagEvalMM default instructions by question_type: (English, Chinese).  Chinese is chosen when the built
# question contains a CJK ideograph; unknown types (e.g. "open") get the last pair.
DEFAULT_INSTRUCTIONS = {
    "multiple-choice": ("Answer with the option's letter from the given choices directly.",
                        "从给定的选项中直接选择答案的字母，不要多余的解释。"),
    "fill-in-the-blank": ("Complete each blank with a single word or phrase directly. If there is more than one "
                          "blank, separate your answers with a semicolon (;).",
                          "在横线或者空白处直接填上答案，如果有多个空需要填，使用分号(;)分隔。直接给出答案，不需要多余的解释"),
    "yes-no": ("Answer with 'yes' or 'no'.", "直接回答'对'或'错'，不需要多余的解释"),
    "open": ("Answer the question using a single word or phrase.", "请认真读题并回答。"),
}

# CMMMU row `type` -> FlagEvalMM question_type.
CMMMU_TYPES = {"选择": "multiple-choice", "填空": "fill-in-the-blank", "判断": "yes-no"}

# LiveBench release dates (livebench/common.py); a question is live at release R when its release date is one
# of these dates <= R and it was not removed on or before R.
LIVEBENCH_RELEASES = ("2024-06-24", "2024-07-26", "2024-08-31", "2024-11-25", "2025-04-02", "2025-04-25",
                      "2025-05-30", "2025-11-25", "2025-12-23", "2026-01-08", "2026-06-25")

_CJK = re.compile(r"[\u4e00-\u9fff]")
_CMMMU_IMG = re.compile(r"<img=[\"']?([^\"'>]+)[\"']?>")
_MMVET_MARK = re.compile(r"<image_(\d+)>")


def literal(value: Any) -> Any:
    """A Python literal stored as a string (MMMU `options`, MuSR `choices`); other values pass through."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"not a Python literal: {value[:60]!r} ({exc.__class__.__name__})") from None


def flatten(values: Iterable[Any]) -> list[Any]:
    """One level of nesting removed (FlagEvalMM flattens nested MMMU option lists)."""
    out: list[Any] = []
    for value in values or []:
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text or ""))


def option_lines(options: Sequence[Any], style: str = "{letter}. {option}") -> str:
    """One `\\n`-prefixed line per option, lettered A, B, C, ..."""
    return "".join("\n" + style.format(letter=LETTERS[i], option=opt) for i, opt in enumerate(options or []))


@pass_context
def flagevalmm_prompt(ctx: Any, question: str, options: Sequence[Any] = (), question_type: str = "",
                      pre_prompt: str = "", post_prompt: Optional[str] = None) -> str:
    """FlagEvalMM `VqaBaseDataset.build_prompt` + `PromptTemplate` (BENCHMARKS.md §0.1).

    question + option lines; `<image 1> ` prepended when the item has images and the text lacks it; then
    pre_prompt + text + "\\n" + post_prompt, stripped.  post_prompt None = the default instruction for
    question_type (Chinese when the question has CJK text); "" = no instruction.
    """
    text = (question or "") + option_lines(options)
    if ctx.get("n_images", 0) and "<image 1>" not in text:
        text = "<image 1> " + text
    if post_prompt is None:
        english, chinese = DEFAULT_INSTRUCTIONS.get(question_type, DEFAULT_INSTRUCTIONS["open"])
        post_prompt = chinese if has_cjk(text) else english
    return (pre_prompt + text + "\n" + post_prompt).strip()


def cmmmu_question(question: str, options: Sequence[Any]) -> dict[str, Any]:
    """FlagEvalMM CMMMU: `<img="file">` references become `<image k>`, k by first appearance in the question,
    then in the options.  The images themselves stay in column order (image_1..5), as in FlagEvalMM."""
    names: list[str] = []

    def number(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"<image {names.index(match.group(1)) + 1}>"

    text = _CMMMU_IMG.sub(number, question or "")
    opts = [_CMMMU_IMG.sub(number, str(o)) for o in options]
    return {"question": text, "options": opts}


def mmvet_question(question: str) -> dict[str, Any]:
    """FlagEvalMM MM-Vet v2: split on `<IMG>`; a segment starting `<image_k>` becomes `<image j>` (j by order of
    appearance) and column image_k becomes the j-th image.  Returns {"text", "images": [column names]}."""
    columns: list[str] = []
    pieces = []
    for segment in (question or "").split("<IMG>"):
        match = _MMVET_MARK.match(segment)
        if match:
            columns.append(f"image_{match.group(1)}")
            segment = f"<image {len(columns)}>" + segment[match.end():]
        pieces.append(segment)
    return {"text": "".join(pieces).strip(), "images": columns}


def mathvision_question(question: str) -> str:
    """FlagEvalMM MathVision: a question with exactly one `<image…>` token gets it rewritten to `<image 1>`."""
    question = question or ""
    if question.count("<image") == 1:
        return re.sub(r"<image\s*\d*>", "<image 1>", question)
    return question


def seeded_shuffle(values: Iterable[Any], key: str) -> list[Any]:
    """Shuffle with a private RNG seeded by the first 8 bytes of SHA-256(key), big-endian (evalscope GPQA);
    shuffling `range(n)` gives the permutation applied to any list of length n."""
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    out = list(values)
    random.Random(seed).shuffle(out)
    return out


def permute(values: Sequence[Any], order: Sequence[int]) -> list[Any]:
    return [values[i] for i in order]


def tsv_options(row: dict[str, Any]) -> list[Any]:
    """VLMEvalKit TSV option columns A, B, C, ... up to the first missing one."""
    out = []
    for letter in LETTERS:
        value = row.get(letter)
        if value is None or value == "":
            break
        out.append(value)
    return out


def livebench_live(release_date: Any, removal_date: Any, release: str) -> bool:
    """True when a LiveBench question belongs to `release` (LiveBench `get_questions` rule)."""
    released = _date_text(release_date)
    removed = _date_text(removal_date)
    return released in LIVEBENCH_RELEASES and released <= release and (not removed or removed > release)


def _date_text(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d")
    return str(value)[:10]


def referenced_images(row: dict[str, Any], text: str, prefix: str = "image_") -> list[Optional[str]]:
    """FlagEvalMM MMMU image list: columns image_1, image_2, ... up to the first empty one, each kept only when
    `<image n>` occurs in `text` (question + options).  Unreferenced columns become None so that `<image n>`
    still names column n; an item referencing none of its images is sent as text only, as in FlagEvalMM."""
    out: list[Optional[str]] = []
    n = 1
    while row.get(f"{prefix}{n}") is not None:
        out.append(f"{prefix}{n}" if f"<image {n}>" in text else None)
        n += 1
    return out


def image_tags(count: int) -> str:
    """`<image 1> <image 2> ... ` for all of an item's images (FlagEvalMM BLINK puts every image first)."""
    return "".join(f"<image {k}> " for k in range(1, count + 1))


def matching_columns(row: dict[str, Any], pattern: str) -> list[str]:
    """Row columns fully matching `pattern` (one numeric group), ordered by that number."""
    regex = re.compile(pattern)
    found = [(int(m.group(1)), name) for name in row if (m := regex.fullmatch(name))]
    return [name for _, name in sorted(found)]


# `do` lets a template build a list in a loop (MuSR's numbered choices).
ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
                         extensions=["jinja2.ext.do"])
ENV.filters.update(literal=literal, flatten=flatten, seeded_shuffle=seeded_shuffle, cjk=has_cjk)
ENV.globals.update(
    LETTERS=LETTERS, CMMMU_TYPES=CMMMU_TYPES, option_lines=option_lines, flagevalmm_prompt=flagevalmm_prompt,
    cmmmu_question=cmmmu_question, mmvet_question=mmvet_question, mathvision_question=mathvision_question,
    seeded_shuffle=seeded_shuffle, permute=permute, tsv_options=tsv_options, livebench_live=livebench_live,
    has_cjk=has_cjk, literal=literal, referenced_images=referenced_images,
    image_tags=image_tags,
)


def compile_template(source: str) -> jinja2.Template:
    return ENV.from_string(source)


def compile_expression(source: str) -> Callable[..., Any]:
    return ENV.compile_expression(source, undefined_to_none=False)
