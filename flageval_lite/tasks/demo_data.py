"""Generate the demo suite's data: small seeded tasks a 135M model gets partly right on CPU.

    .venv/bin/python -m flageval_lite.tasks.demo_data [OUT_DIR]

writes `demo_arith.jsonl` (integer word problems) and `demo_mcq.jsonl` (single-letter multiple choice) to
OUT_DIR (default `tasks/data/demo/`).  The output is committed; rerunning reproduces it byte for byte.
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


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in (("demo_arith", demo_arith), ("demo_mcq", demo_mcq)):
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
