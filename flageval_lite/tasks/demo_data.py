"""Generate the demo suite's data: small seeded tasks a 135M model gets partly right on CPU.

    .venv/bin/python -m flageval_lite.tasks.demo_data [OUT_DIR]

writes `demo_arith.jsonl` (integer word problems), `demo_mcq.jsonl` (single-letter multiple choice) and
`demo_facts.jsonl` (one-word answers) to OUT_DIR (default `tasks/data/demo/`).  The output is committed; rerunning reproduces it byte for byte.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any, Callable

from .spec import tasks_dir

SEED = 20241125
N_ITEMS = 120

NAMES = ["Tom", "Mia", "Ravi", "Lena", "Omar", "Sara", "Ken", "Ada", "Luis", "Nina"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def _arith_item(rng: random.Random) -> tuple[str, int, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul", "div"])
    if kind == "add":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?", a + b, kind
    if kind == "sub":
        a = rng.randint(10, 40)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b, kind
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"There are {a} bags with {b} {thing} in each bag. How many {thing} are there in total?", a * b, kind
    b, share = rng.randint(2, 6), rng.randint(2, 9)
    return (f"{name} shares {b * share} {thing} equally among {b} friends. How many {thing} does each friend get?",
            share, kind)


def demo_arith(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for n in range(N_ITEMS):
        question, answer, kind = _arith_item(rng)
        rows.append({"id": f"arith-{n:03d}", "question": question, "answer": answer, "kind": kind})
    return rows


COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
ANIMALS = ["dog", "cat", "horse", "cow", "rabbit", "sheep"]
FRUITS = ["apple", "banana", "cherry", "grape", "mango", "pear"]
TOOLS = ["hammer", "wrench", "saw", "drill", "chisel", "pliers"]
CATEGORIES = {"colour": COLOURS, "animal": ANIMALS, "fruit": FRUITS, "tool": TOOLS}


def _largest(rng: random.Random) -> tuple[str, list[str], int]:
    values = rng.sample(range(1, 100), 4)
    return "Which number is the largest?", [str(v) for v in values], values.index(max(values))


def _smallest(rng: random.Random) -> tuple[str, list[str], int]:
    values = rng.sample(range(1, 100), 4)
    return "Which number is the smallest?", [str(v) for v in values], values.index(min(values))


def _metres(rng: random.Random) -> tuple[str, list[str], int]:
    metres = rng.randint(2, 9)
    right = metres * 100
    options = [right, metres * 10, metres * 1000, metres]
    rng.shuffle(options)
    return f"How many centimetres are in {metres} metres?", [str(v) for v in options], options.index(right)


def _category(rng: random.Random) -> tuple[str, list[str], int]:
    wanted, other = rng.sample(sorted(CATEGORIES), 2)
    right = rng.choice(CATEGORIES[wanted])
    options = [right] + rng.sample(CATEGORIES[other], 3)
    rng.shuffle(options)
    return f"Which of these is a {wanted}?", options, options.index(right)


def _sum(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    options = rng.sample([v for v in range(max(2, a + b - 6), a + b + 7) if v != a + b], 3) + [a + b]
    rng.shuffle(options)
    return f"What is {a} + {b}?", [str(v) for v in options], options.index(a + b)


MCQ_KINDS: dict[str, Callable[[random.Random], tuple[str, list[str], int]]] = {
    "largest": _largest, "smallest": _smallest, "metres": _metres, "category": _category, "sum": _sum}


def demo_mcq(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    kinds = sorted(MCQ_KINDS)
    for n in range(N_ITEMS):
        kind = kinds[n % len(kinds)]
        question, options, answer = MCQ_KINDS[kind](rng)
        rows.append({"id": f"mcq-{n:03d}", "question": question, "options": options, "answer": "ABCD"[answer],
                     "kind": kind})
    return rows


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Canada": "Ottawa",
            "Australia": "Canberra", "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm",
            "Austria": "Vienna", "Ireland": "Dublin", "Poland": "Warsaw", "Kenya": "Nairobi", "Peru": "Lima",
            "Thailand": "Bangkok", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
            "Turkey": "Ankara", "Cuba": "Havana", "Finland": "Helsinki", "Denmark": "Copenhagen",
            "Hungary": "Budapest", "Belgium": "Brussels", "Chile": "Santiago"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad",
             "open": "closed", "light": "dark", "old": "young", "wet": "dry", "early": "late", "full": "empty",
             "hard": "soft", "high": "low", "win": "lose", "push": "pull", "left": "right", "rich": "poor",
             "strong": "weak", "thick": "thin", "loud": "quiet", "first": "last", "clean": "dirty", "in": "out",
             "heavy": "light"}
PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives",
           "box": "boxes", "baby": "babies", "city": "cities", "bus": "buses", "wolf": "wolves"}
LEGS = {"spider": ("8", "eight"), "dog": ("4", "four"), "bird": ("2", "two"), "ant": ("6", "six"),
        "cat": ("4", "four"), "horse": ("4", "four"), "chicken": ("2", "two"), "bee": ("6", "six"),
        "cow": ("4", "four"), "duck": ("2", "two"), "octopus": ("8", "eight"), "beetle": ("6", "six")}
THING_COLOURS = {"banana": "yellow", "grass": "green", "snow": "white", "coal": "black", "a ripe tomato": "red",
                 "the sky on a clear day": "blue", "an orange": "orange", "milk": "white", "a lemon": "yellow",
                 "a strawberry": "red", "chocolate": "brown", "a lime": "green"}

YOUNG = {"cat": "kitten", "dog": "puppy", "cow": "calf", "sheep": "lamb", "horse": "foal", "duck": "duckling",
         "frog": "tadpole", "bear": "cub", "goat": "kid", "pig": "piglet"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def demo_facts(rng: random.Random) -> list[dict[str, Any]]:
    questions = (
        [(f"What is the capital of {k}?", [v], "capital") for k, v in CAPITALS.items()]
        + [(f"What is the opposite of '{k}'?", [v], "opposite") for k, v in OPPOSITES.items()]
        + [(f"What is the plural of '{k}'?", [v], "plural") for k, v in PLURALS.items()]
        + [(f"How many legs does a {k} have?", list(v), "legs") for k, v in LEGS.items()]
        + [(f"What colour is {k}?", [v], "colour") for k, v in THING_COLOURS.items()]
        + [(f"What is a young {k} called?", [v], "young") for k, v in YOUNG.items()]
        + [(f"Which day comes after {d}?", [DAYS[(i + 1) % 7]], "calendar") for i, d in enumerate(DAYS)]
        + [(f"Which month comes after {m}?", [MONTHS[(i + 1) % 12]], "calendar") for i, m in enumerate(MONTHS)]
    )
    rng.shuffle(questions)
    return [{"id": f"facts-{n:03d}", "question": q, "answers": a, "kind": kind}
            for n, (q, a, kind) in enumerate(questions[:N_ITEMS])]


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in (("demo_arith", demo_arith), ("demo_mcq", demo_mcq), ("demo_facts", demo_facts)):
        path = out_dir / f"{name}.jsonl"
        rows = build(random.Random(f"{SEED}-{name}"))
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else tasks_dir() / "data" / "demo"
    for path in write(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
