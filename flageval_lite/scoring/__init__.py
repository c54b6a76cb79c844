"""Scorers: `get_scorer(name)` → fn(response, gold, meta, **args) -> ScoreResult.

Every scorer is deterministic (no randomness; the MM-Vet judge is the one networked scorer and is cached)
and takes `compat=False`; `compat=True` reproduces the reference implementation's quirks (docs/scoring.md).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from ..errors import UserError
from ..records import ScoreResult
from .asr import cer, wer
from .choice import choice, gpqa, mmlu
from .cmmmu import cmmmu
from .common import strip_reasoning
from .integer import aime, exact_integer
from .judge import JudgeClient, JudgeError, mmvet_judge
from .livebench import livebench
from .livebench_bigcode import livebench_bigcode
from .livebench_coding import livebench_coding
from .mathvision import mathvision
from .mmmu import mmmu
from .musr import musr
from .ocrbench import ocrbench

Scorer = Callable[..., ScoreResult]

SCORERS: dict[str, Scorer] = {
    "choice": choice,
    "mmmu": mmmu,
    "cmmmu": cmmmu,
    "ocrbench": ocrbench,
    "mathvision": mathvision,
    "aime": aime,
    "gpqa": gpqa,
    "mmlu": mmlu,
    "musr": musr,
    "livebench": livebench,
    "livebench_coding": livebench_coding,
    "livebench_bigcode": livebench_bigcode,
    "mmvet_judge": mmvet_judge,
    "exact_integer": exact_integer,
    "wer": wer,
    "cer": cer,
}


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise UserError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}") from None


def scorer_args(name: str) -> list[str]:
    """The keyword arguments a scorer accepts beyond (response, gold, meta)."""
    parameters = list(inspect.signature(get_scorer(name)).parameters)
    return parameters[3:]


def validate_args(name: str, args: dict[str, Any], where: str = "") -> None:
    """Reject scorer arguments the scorer does not take (typos in a task YAML), naming the file/field."""
    allowed = scorer_args(name)
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise UserError(
            f"{prefix}scorer {name!r} has no argument(s) {', '.join(unknown)}; it takes {', '.join(allowed)}"
        )


__all__ = [
    "SCORERS", "JudgeClient", "JudgeError", "ScoreResult", "Scorer", "get_scorer", "scorer_args",
    "strip_reasoning", "validate_args",
]
