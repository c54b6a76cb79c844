"""The MM-Vet v2 judge's prompts, how each reads a reply, and how each asks again after a reply without a score.

Which prompt (`resolve_prompt`): the official MM-Vet v2 evaluator's, or FlagEvalMM's MM-Vet evaluator's, read from
the user's checkout of that upstream file (`judge: {prompt: official|flagevalmm, source: PATH}`); a prompt file the
user saved (`judge: {prompt_file: PATH}`); or else our own wording. No upstream text is part of this project: the
official evaluator's re-ask sentence is read from the same file as its prompt.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..errors import UserError
from ..records import stable_hash
from .common import strip_reasoning

PROMPT_VERSION = "mmvet-judge-1"  # part of the cache key: a reworded prompt must not reuse old verdicts

_INSTRUCTIONS = """You grade answers to questions about images. Compare the model's prediction with the ground truth and rate how correct the prediction is.

Rules:
- "<image k>" in a question marks where the k-th image was shown. You do not see the images; judge against the ground truth only.
- "<AND>" in the ground truth joins parts that are all required. A prediction that gives only some of them earns partial credit in proportion.
- "<OR>" in the ground truth joins acceptable alternatives. Any one of them is fully correct.
- For free-form answers, judge whether the prediction states the same facts as the ground truth. Extra detail that does not contradict it is fine; missing or wrong key points lower the score.
- The score is one of 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 (0.0 = wrong, 1.0 = fully correct).

Worked examples:
| Question | Ground truth | Prediction | Score |
| --- | --- | --- | --- |
| Which two fruits are on the plate?<image 1> | apple <AND> banana | an apple and a banana | 1.0 |
| Which two fruits are on the plate?<image 1> | apple <AND> banana | a banana | 0.5 |
| Which two fruits are on the plate?<image 1> | apple <AND> banana | an orange | 0.0 |
| What colour is the car?<image 1> | red <OR> maroon | It is maroon. | 1.0 |
| How many people are in the photo?<image 1> | 4 | There are five people. | 0.0 |
| Describe the trend in the chart.<image 1> | Sales rise every year from 2015 to 2020, with the sharpest jump in 2018. | Sales grow steadily over the period. | 0.6 |
| Describe the trend in the chart.<image 1> | Sales rise every year from 2015 to 2020, with the sharpest jump in 2018. | Sales increase each year, and the biggest increase happens in 2018. | 1.0 |

Now grade this item:
| Question | Ground truth | Prediction |
| --- | --- | --- |
"""
_REPLY_FORMAT = 'Reply with JSON only, in the form {"score": <number from 0.0 to 1.0>}.'


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def judge_prompt(question: str, gold: str, prediction: str) -> str:
    row = f"| {_cell(question)} | {_cell(_padded(gold))} | {_cell(prediction)} |"
    return f"{_INSTRUCTIONS}{row}\n\n{_REPLY_FORMAT}"


# The slots a prompt file may hold; without any, the item is appended as the table's next row to complete.
PROMPT_SLOTS = ("{question}", "{gold}", "{prediction}")


def _padded(gold: str) -> str:
    return gold.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")


def file_prompt(template: str, question: str, gold: str, prediction: str) -> str:
    """A user-supplied prompt with the item filled in: its `{question}`, `{gold}`, `{prediction}` slots replaced
    (plain replacement: the few-shot text may hold braces), or else the item appended as the table's next row on
    its own line (a saved file's final newline, or its absence, is the editor's, not the prompt's)."""
    if not any(slot in template for slot in PROMPT_SLOTS):
        return table_completion(template.rstrip("\n") + "\n", question, gold, prediction)
    for slot, value in zip(PROMPT_SLOTS, (question, _padded(gold), prediction)):
        template = template.replace(slot, value)
    return template


def table_completion(template: str, question: str, gold: str, prediction: str) -> str:
    """The few-shot table with the item appended as its next row for the judge to complete with the score, as the
    MM-Vet v2 evaluator builds it: the template as it is (its `prompt` ends with its last row's newline), then
    `| question | gold | prediction | `, newlines as `<br>`, every `<image k>` mark as the bare `<image>`."""
    return template + _item_row(_IMAGE_MARK.sub("<image>", question), gold, prediction)


def read_prompt_file(path: Union[str, Path]) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"judge.prompt_file {path}: cannot read: {exc.strerror or exc}") from None
    if not text.strip():
        raise UserError(f"judge.prompt_file {path}: empty")
    return text


# Where each upstream evaluator keeps its judge prompt (instruction and few-shot table in one string constant).
UPSTREAM_PROMPTS = {
    "official": ("prompt", "v2/mm-vet-v2_evaluator.py of github.com/yuweihao/MM-Vet"),
    "flagevalmm": ("MM_VET_PROMPT", "tasks/mmvet/evaluate.py of github.com/flageval-baai/FlagEvalMM"),
}
PROMPT_STYLES = ("own", "official", "flagevalmm")


def _assigns(node: ast.AST, name: str) -> bool:
    if isinstance(node, ast.Assign):
        return any(isinstance(target, ast.Name) and target.id == name for target in node.targets)
    return isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name


def read_upstream(style: str, source: Union[str, Path]) -> tuple[str, str]:
    """(prompt, re-ask sentence) of an upstream evaluator, found by parsing the file (never importing it: it would
    need that project's dependencies and run its code): the string constant assigned to the prompt's module-level
    name, and for the official evaluator the sentence it appends to the prompt when a reply holds no score."""
    name, upstream = UPSTREAM_PROMPTS[style]
    where = f"judge.source {source}"
    try:
        tree = ast.parse(Path(source).read_bytes(), filename=str(source))
    except OSError as exc:
        raise UserError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except (SyntaxError, ValueError) as exc:
        raise UserError(f"{where}: not Python source ({exc}); expected {upstream}") from None
    found = [node.value.value for node in tree.body if _assigns(node, name)
             and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    if not found or not found[-1].strip():
        raise UserError(f"{where}: no module-level string `{name}`, where {upstream} keeps the {style} judge prompt")
    template = found[-1]  # the binding the module ends with, as an import would see it
    if style == "flagevalmm":
        try:
            template.format(DATA="")
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"{where}: `{name}` does not format with DATA alone ({exc!r})") from None
        if "{DATA}" not in template:
            raise UserError(f"{where}: `{name}` has no {{DATA}} slot for the item")
        return template, ""
    return template, _official_reask(tree, where)


def _official_reask(tree: ast.Module, where: str) -> str:
    """The string the official evaluator adds to its question for every re-ask: `question_try = question + "..."`
    inside its grading loop."""
    for node in ast.walk(tree):
        if (_assigns(node, "question_try") and isinstance(node.value, ast.BinOp) and isinstance(node.value.op, ast.Add)
                and isinstance(node.value.right, ast.Constant) and isinstance(node.value.right.value, str)):
            return node.value.right.value
    raise UserError(f"{where}: no `question_try = question + \"...\"`, the re-ask that "
                    f"{UPSTREAM_PROMPTS['official'][1]} sends after a reply without a score")


def _item_row(question: str, gold: str, prediction: str) -> str:
    """The item as the upstream evaluators append it to their few-shot table: `| question | gold | prediction | `,
    newlines as `<br>`, no `|` escaping, left for the judge to complete with the score."""
    return "| " + " | ".join([c.replace("\n", "<br>") for c in (question, _padded(gold), prediction)] + [""])


@dataclass(frozen=True)
class ReaskRule:
    """What a prompt style does after a reply that holds no score (a failed request is no reply: the client retries
    it as an infrastructure fault): ask again at each of `temperatures` in turn, the prompt with `suffix` appended
    from the second request on, and once every reply was unusable score `fallback` (None: a judge failure, which
    leaves the item out of the comparison like any other error)."""

    temperatures: tuple[float, ...]
    suffix: str = ""
    fallback: Optional[float] = None

    def prompt(self, base: str, attempt: int) -> str:
        return base + self.suffix if attempt else base

    def key(self) -> str:
        """Part of the verdict cache key: another schedule or re-ask gives other verdicts for the same item."""
        return stable_hash([list(self.temperatures), self.suffix, self.fallback])

    def describe(self) -> str:
        asks = ", ".join(f"{t:g}" for t in self.temperatures)
        then = f"then {self.fallback:.1f}" if self.fallback is not None else "then a judge failure"
        return f"an unusable reply is asked again{' with the re-ask appended' if self.suffix else ''} " \
               f"(temperatures {asks}), {then}"


# The official evaluator asks again at the temperature it just used and raises it by 0.5 after each re-ask; the
# fifth reply is the last it reads (it sends a sixth, at 2.0, whose reply it discards before scoring 0.0).
OFFICIAL_TEMPERATURES = (0.0, 0.0, 0.5, 1.0, 1.5)
# FlagEvalMM raises the temperature by 0.5 after each unusable reply and gives 0.0 once it reaches 2.
FLAGEVALMM_TEMPERATURES = (0.0, 0.5, 1.0, 1.5)
# Ours: a deterministic judge repeats itself at one temperature, so each re-ask goes warmer; no score is made up.
OWN_TEMPERATURES = (0.0, 0.5, 1.0)


def _reply_text(content: Optional[str]) -> str:
    """The reply as the upstream evaluators read it, less a reasoning judge's `<think>` block (theirs emit none)."""
    answer, reasoning = strip_reasoning(content)
    return answer if reasoning else (content or "")


def official_score(content: Optional[str]) -> Optional[float]:
    """The official evaluator's reading: the reply's first space-separated word, stripped, as a float in [0, 1]
    (a NaN, which its range check lets through, is refused here)."""
    try:
        score = float(_reply_text(content).split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def flagevalmm_score(content: Optional[str]) -> Optional[float]:
    """FlagEvalMM's reading: the whole reply as JSON, its "score" compared with 0.0 and 1.0 as Python compares
    (so true counts as 1); anything that raises there, or a value out of range, is no score."""
    try:
        score = json.loads(_reply_text(content))["score"]
        usable = 0.0 <= score <= 1.0
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return float(score) if usable else None


@dataclass(frozen=True)
class JudgePrompt:
    """The prompt the judge is asked with: `style` own | file | official | flagevalmm; `template` the file's or
    upstream constant's text; `origin` the file it came from; `reask` the official evaluator's re-ask sentence."""

    style: str
    template: str = ""
    origin: str = ""
    reask: str = ""

    @property
    def version(self) -> str:
        """Part of the cache key: verdicts are cached per style and content, so an edited prompt never reuses them."""
        if self.style == "own":
            return PROMPT_VERSION
        return f"{self.style}-" + hashlib.sha256(self.template.encode("utf-8")).hexdigest()[:16]

    @property
    def rule(self) -> ReaskRule:
        if self.style == "official":
            return ReaskRule(OFFICIAL_TEMPERATURES, self.reask, fallback=0.0)
        if self.style == "flagevalmm":  # the same prompt each time
            return ReaskRule(FLAGEVALMM_TEMPERATURES, fallback=0.0)
        return ReaskRule(OWN_TEMPERATURES)

    def parse(self, content: Optional[str]) -> Optional[float]:
        """The score in a reply, read as this style's evaluator reads it; None: an unusable reply."""
        if self.style == "official":
            return official_score(content)
        if self.style == "flagevalmm":
            return flagevalmm_score(content)
        return parse_verdict(content or "", bare_number=self.style == "file")  # a table completion gives the number

    def build(self, question: str, gold: str, prediction: str) -> str:
        if self.style == "own":
            return judge_prompt(question, gold, prediction)
        if self.style == "file":
            return file_prompt(self.template, question, gold, prediction)
        if self.style == "official":  # its few-shot rows show every image as the bare <image>
            return table_completion(self.template, question, gold, prediction)
        return self.template.format(DATA=_item_row(question, gold, prediction))  # FlagEvalMM keeps <image k>

    def describe(self) -> str:
        """For the run manifest."""
        if self.style == "own":
            text = (f"own prompt ({PROMPT_VERSION}); the card's MM-Vet v2 row needs the official one "
                    f"(judge: {{prompt: official, source: PATH}})")
        elif self.style == "file":
            text = f"prompt file {self.origin} (sha256 {stable_hash(self.template)})"
        else:
            name, upstream = UPSTREAM_PROMPTS[self.style]
            text = f"{self.style} prompt: `{name}` of {self.origin} ({upstream}; sha256 {stable_hash(self.template)})"
        return f"{text}; {self.rule.describe()}"


def resolve_prompt(prompt: str = "", source: Union[str, Path, None] = None,
                   prompt_file: Union[str, Path, None] = None) -> JudgePrompt:
    """The run config's `judge:` prompt keys as one JudgePrompt: `source` alone means the official prompt."""
    if prompt and prompt not in PROMPT_STYLES:
        raise UserError(f"judge.prompt: {prompt!r} is not one of {', '.join(PROMPT_STYLES)}")
    if prompt_file and (prompt or source):
        raise UserError("judge: prompt_file is an alternative to prompt/source; give one of them")
    if prompt_file:
        return JudgePrompt("file", read_prompt_file(prompt_file), str(prompt_file))
    style = prompt or ("official" if source else "own")
    if style == "own":
        if source:
            raise UserError("judge.source is read only with prompt: official or flagevalmm, not own")
        return JudgePrompt("own")
    if not source:
        name, upstream = UPSTREAM_PROMPTS[style]
        raise UserError(f"judge.prompt: {style} needs judge.source, the path of your checkout of {upstream} "
                        f"(its `{name}` is read from it; the text is not shipped with this project)")
    template, reask = read_upstream(style, source)
    return JudgePrompt(style, template, str(source), reask)


_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_IMAGE_MARK = re.compile(r"<image \d+>")


def parse_verdict(content: str, bare_number: bool = False) -> Optional[float]:
    """Our reading of a reply to our prompt or a prompt file ({"score": x}, maybe fenced or amid text; with
    `bare_number`, also a reply that starts with the number, as a table completion gives); None if absent or
    outside [0, 1]."""
    text = strip_reasoning(content)[0]
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    first = text.split(maxsplit=1)[0] if text else ""
    if bare_number and _NUMBER.fullmatch(first):  # the evaluator reads the reply's first word as the score
        return float(first) if 0.0 <= float(first) <= 1.0 else None
    candidates = [text] + re.findall(r"\{[^{}]*\}", text)[::-1]
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if not isinstance(data, dict) or "score" not in data:
            continue
        score = data["score"]
        if isinstance(score, bool):
            return None
        if isinstance(score, str):
            try:
                score = float(score)
            except ValueError:
                return None
        if isinstance(score, (int, float)) and 0.0 <= float(score) <= 1.0:
            return float(score)
        return None
    return None


