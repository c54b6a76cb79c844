"""Golden cases for the multiple-choice scorers (choice, mmmu) and the shared helpers."""
import pytest

from flageval_lite.errors import UserError
from flageval_lite.records import ScoreResult
from flageval_lite.scoring import SCORERS, get_scorer, scorer_args, strip_reasoning, validate_args

choice = get_scorer("choice")
mmmu = get_scorer("mmmu")
FOUR = {"options": ["12", "15", "18", "21"]}
TEN = {"options": [f"option {i}" for i in range(10)]}

# (reply, gold, meta, extracted, value, parsed)
DEFAULT_CASES = [
    ("Answer: B", "B", FOUR, "B", 1.0, True),
    ("ANSWER: B", "B", FOUR, "B", 1.0, True),
    ("**Answer: C**", "B", FOUR, "C", 0.0, True),
    ("Final Answer: $\\boxed{B}$", "B", FOUR, "B", 1.0, True),
    ("The answer is \\boxed{\\text{(D)}}.", "D", FOUR, "D", 1.0, True),
    ("答案：B", "B", FOUR, "B", 1.0, True),
    ("经过分析，故选C。", "C", FOUR, "C", 1.0, True),
    ("正确选项为 A", "A", FOUR, "A", 1.0, True),
    ("So the answer is B. Note that A is wrong.", "B", FOUR, "B", 1.0, True),
    ("Answer: A at first sight... wait, the correct answer is (C).", "C", FOUR, "C", 1.0, True),
    ("First I considered 15 and 18. Answer: D", "D", FOUR, "D", 1.0, True),
    ("B", "B", FOUR, "B", 1.0, True),
    ("b", "B", FOUR, "B", 1.0, True),
    ("B.", "B", FOUR, "B", 1.0, True),
    ("(B)", "B", FOUR, "B", 1.0, True),
    ("**B**", "B", FOUR, "B", 1.0, True),
    ("B) 15", "B", FOUR, "B", 1.0, True),
    ("C. 18 is the only multiple of 9 here.", "C", FOUR, "C", 1.0, True),
    ("D\nBecause 21 = 3 * 7.", "D", FOUR, "D", 1.0, True),
    ("Looking at the figure, it must be (C).", "C", FOUR, "C", 1.0, True),
    ("Option A gives 12 and option B gives 15, which fits.\n\n**B**", "B", FOUR, "B", 1.0, True),
    ("A. 12 looks plausible, but checking again...\nD", "D", FOUR, "D", 1.0, True),
    ("A triangle has three sides, so B.", "B", FOUR, "B", 1.0, True),
    ("I think it is C", "C", FOUR, "C", 1.0, True),
    ("Answer: I think it is C", "C", FOUR, "C", 1.0, True),
    ("Answer:\n\nA triangle with sides 3, 4, 5 is right-angled, hence D.", "D", FOUR, "D", 1.0, True),
    ("Answer: A because 12 is even.", "A", FOUR, "A", 1.0, True),
    ("A is wrong and B is wrong too.", "C", FOUR, "", 0.0, False),
    ("Either A or C could work.", "A", FOUR, "", 0.0, False),
    ("The answer is A or B", "A", FOUR, "AB", 0.0, True),
    ("(A) and (C) are both plausible", "A", FOUR, "AC", 0.0, True),
    ("the answer is a prime number", "A", FOUR, "", 0.0, False),
    ("The value is 18.", "C", FOUR, "C", 1.0, True),
    ("15", "B", FOUR, "B", 1.0, True),
    ("", "A", FOUR, "", 0.0, False),
    ("   \n ", "A", FOUR, "", 0.0, False),
    ("<think>Answer: A</think>Answer: D", "D", FOUR, "D", 1.0, True),
    ("<think>the reasoning was cut off here, Answer: A", "A", FOUR, "", 0.0, False),
    ("reasoning ends</think>\n\nC", "C", FOUR, "C", 1.0, True),
    ("Answer: I", "I", TEN, "I", 1.0, True),
    ("I.", "I", TEN, "I", 1.0, True),
    ("Answer: J", "J", TEN, "J", 1.0, True),
    ("Answer: E", "A", FOUR, "", 0.0, False),  # E is not an option of a 4-option item
    ("Answer: (A)", "(A)", {"choices": ["left", "right"]}, "A", 1.0, True),  # BLINK gold form
    ("答案：F", "F", {"options": list("一二三四五六")}, "F", 1.0, True),  # CII-Bench: 6 options
    ("Answer: A, C", "AC", FOUR, "AC", 1.0, True),
]


@pytest.mark.parametrize("reply,gold,meta,extracted,value,parsed", DEFAULT_CASES)
def test_choice_default(reply, gold, meta, extracted, value, parsed):
    result = choice(reply, gold, meta)
    assert (result.extracted, result.value, result.parsed) == (extracted, value, parsed)


# FlagEvalMM §0.3 behaviour, quirks included (verified reference outputs from BENCHMARKS.md)
COMPAT_CASES = [
    ("Answer: B", "B", FOUR, "B", 1.0, True),
    ("**Answer: C**", "C", FOUR, "C", 1.0, True),
    ("Final Answer: $\\boxed{B}$", "B", FOUR, "B", 1.0, True),
    ("答案：B", "B", FOUR, "B", 1.0, True),
    ("So the answer is B. Note that A is wrong.", "B", FOUR, "B", 1.0, True),
    ("ANSWER: B", "B", FOUR, "A", 0.0, True),  # N, S, T deleted → "AWERB"
    ("Answer: I", "I", TEN, "", 0.0, False),  # letter I is deleted
    ("I.", "I", TEN, "", 0.0, False),
    ("I", "I", TEN, "I", 1.0, True),  # ...unless the whole reply is "I"
    ("b", "B", FOUR, "B", 1.0, True),  # one character: upper-cased, nothing else
    ("(b)", "B", FOUR, "", 0.0, False),  # lower-case letters are deleted as noise
    ("C. 18 is the only multiple of 9 here.", "C", FOUR, "C", 1.0, True),
    ("", "A", FOUR, "", 0.0, False),
]


@pytest.mark.parametrize("reply,gold,meta,extracted,value,parsed", COMPAT_CASES)
def test_choice_compat(reply, gold, meta, extracted, value, parsed):
    result = choice(reply, gold, meta, compat=True)
    assert (result.extracted, result.value, result.parsed) == (extracted, value, parsed)


def test_choice_letters_argument_and_int_gold():
    assert choice("Answer: C", 2, {}, letters="ABCD").extracted == "C"
    assert choice("Answer: C", 2, {}, letters="ABCD").value == 1.0
    assert choice("Answer: E", "E", {"letters": ["A", "B", "C", "D", "E"]}).value == 1.0


@pytest.mark.parametrize("gold,meta", [("Z", FOUR), ("E", {}), (7, FOUR), ("", FOUR)])
def test_choice_bad_gold_is_a_user_error(gold, meta):
    with pytest.raises(UserError, match="gold"):
        choice("Answer: A", gold, meta)


MMMU_OPEN_CASES = [
    # (reply, gold, extracted, value)
    ("The answer is 3.50.", "3.5", "3.5", 1.0),
    ("I got 1,024 total", "24", "i got 1,024 total", 0.0),  # default: 024 is not read out of 1,024
    ("So the total cost is $1,200.", "1200", "1200", 1.0),
    ("The speed is 12 m/s. So the result is faster.", "12", "12", 1.0),
    ("Therefore x = 7", "7", "7", 1.0),
    ("The answer is 6.02e23", "6.02e23", "6.02e+23", 1.0),
    ("It is a parallelogram.", "Parallelogram", "a parallelogram", 1.0),
    ("It is a square.", "Parallelogram", "a square", 0.0),
    ("The answer is 0.333", "1/3", "0.33", 0.0),
    ("The answer is 5", "['5', '5.0']", "5", 1.0),
]


@pytest.mark.parametrize("reply,gold,extracted,value", MMMU_OPEN_CASES)
def test_mmmu_open(reply, gold, extracted, value):
    result = mmmu(reply, gold, {"question_type": "open"})
    assert (result.extracted, result.value, result.parsed) == (extracted, value, True)


def test_mmmu_open_compat_finds_the_number_inside_a_grouped_one():
    result = mmmu("I got 1,024 total", "24", {"question_type": "open"}, compat=True)
    assert (result.extracted, result.value) == ("24", 1.0)


def test_mmmu_open_empty_reply_is_unparsed():
    assert mmmu("", "5", {"question_type": "open"}) == ScoreResult(0.0, "", parsed=False)


def test_mmmu_multiple_choice_uses_choice_rules_in_both_modes():
    meta = {"question_type": "multiple-choice", "options": ["a", "b", "c", "d"]}
    assert mmmu("ANSWER: B", "B", meta).value == 1.0
    assert mmmu("ANSWER: B", "B", meta, compat=True).extracted == "A"
    assert mmmu("Answer: I", "I", {"question_type": "vision", "options": TEN["options"]}).value == 1.0


def test_mmmu_unknown_question_type():
    with pytest.raises(UserError, match="question_type"):
        mmmu("A", "A", {"question_type": "essay"})


@pytest.mark.parametrize(
    "text,answer,reasoning",
    [
        ("<think>step 1</think>The answer is 4", "The answer is 4", "step 1"),
        ("<think>a</think>x<think>b</think>y", "xy", "a\nb"),
        ("plan first</think>\nB", "B", "plan first"),
        ("<think>never finished", "", "never finished"),
        ("no reasoning at all", "no reasoning at all", ""),
        ("", "", ""),
    ],
)
def test_strip_reasoning(text, answer, reasoning):
    assert strip_reasoning(text) == (answer, reasoning)


def test_get_scorer_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError) as info:
        get_scorer("chioce")
    assert "choice" in str(info.value) and "livebench" in str(info.value)


def test_registry_and_argument_validation():
    assert set(SCORERS) == {
        "choice", "mmmu", "cmmmu", "ocrbench", "mathvision", "aime", "gpqa", "mmlu", "musr", "livebench", "livebench_coding",
        "livebench_bigcode",
        "mmvet_judge", "exact_integer", "wer", "cer",
    }
    assert all("compat" in scorer_args(name) for name in SCORERS)
    validate_args("choice", {"letters": "ABCD", "compat": True})
    with pytest.raises(UserError, match="leters"):
        validate_args("choice", {"leters": "ABCD"}, where="tasks/mmlu.yaml: scorer_args")
