"""EvalScope review files, the 0.x layout (`reviews/<model>/<dataset>_<subset>.jsonl`, `choices[].review`) and the
1.x one (`sample_score`), told apart by their first line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import UserError
from ..records import stable_hash
from .imported import (ImportedItem, ImportedRun, cell_text, chat_messages, check_unique, read_jsonl, unit_outcome,
                       unit_value)


def _evalscope_task(file: Path) -> tuple[str, str]:
    """(task, group) of `reviews/<model>/<benchmark>_<subset>.jsonl`: the benchmark named by the report EvalScope
    wrote beside it (`reports/<model>/<benchmark>.json`), the subset as the group; else the file stem."""
    reports = file.parents[2] / "reports" / file.parent.name if len(file.parents) > 2 else None
    benchmarks = sorted((r.stem for r in reports.glob("*.json")), key=len, reverse=True) if reports else []
    for benchmark in benchmarks:
        if file.stem.startswith(benchmark + "_"):
            return benchmark, file.stem[len(benchmark) + 1:]
    return file.stem, ""


def _evalscope_tokens(review_file: Path) -> dict[str, int]:
    """index -> output tokens, from `predictions/<model>/<same name>.jsonl` (its model_output.usage)."""
    predictions = review_file.parents[2] / "predictions" / review_file.parent.name / review_file.name
    if len(review_file.parents) <= 2 or not predictions.is_file():
        return {}
    tokens = {}
    for row in read_jsonl(predictions):
        usage = ((row.get("model_output") or {}).get("usage") or {})
        if isinstance(usage.get("output_tokens"), int):
            tokens[cell_text(row.get("index"))] = usage["output_tokens"]
    return tokens


def _evalscope_version(row: Any) -> str:
    """Which EvalScope wrote a review line: "1.x" (`sample_score`), "0.x" (an answer with `choices[].review`), or ""."""
    if not isinstance(row, dict) or "index" not in row:
        return ""
    if isinstance(row.get("sample_score"), dict):
        return "1.x"
    choices = row.get("choices")
    if "raw_input" in row and isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
        return "0.x"
    return ""


def _evalscope_item(task: str, group: str, key: str, value: float, metric: str, prompt_text: str,
                    messages: Optional[list[dict[str, Any]]], *, response: str, extracted: str, gold: str,
                    completion_tokens: int) -> ImportedItem:
    """One scored review line of either version: stored as `<subset>/<index>` (the index alone without a subset),
    the prompt text hashed, so that a 0.x run pairs with a 1.x one item by item."""
    item_id = f"{group}/{key}" if group else key
    return ImportedItem(
        task=task, key=item_id, item_id=item_id, value=value, outcome=unit_outcome(value), response=response,
        extracted=extracted, gold=gold, prompt=prompt_text,
        hashes={"input": stable_hash(prompt_text)} if prompt_text else {}, meta={"index": key, "metric": metric},
        group=group, messages=messages, completion_tokens=completion_tokens)


def load_evalscope_file(path: Path) -> tuple[str, list[ImportedItem]]:
    """One review file of EvalScope >= 1.0 (`ReviewResult` lines) or of 0.8–0.17 (answers with their review); the
    version is told from the first line, and every line must be of that version."""
    rows = read_jsonl(path)
    version = _evalscope_version(rows[0]) if rows else "1.x"
    if not version:
        raise UserError(f"{path}: line 1 is not an EvalScope review: neither >= 1.0 (index, sample_score.score.value) "
                        f"nor 0.x (index, raw_input, choices[].review.result); predictions files carry no correctness")
    load = _evalscope_v1_items if version == "1.x" else _evalscope_v0_items
    task, items = load(path, rows)
    for item in items:
        item.meta["evalscope"] = version
    return task, items


def _evalscope_v1_items(path: Path, rows: list[dict[str, Any]]) -> tuple[str, list[ImportedItem]]:
    """`{index, input, target, sample_score: {score: {value: {name: number}, main_score_name, prediction,
    extracted_prediction}, sample_id, sample_metadata}}` per line (EvalScope >= 1.0)."""
    task, group = _evalscope_task(path)
    tokens = _evalscope_tokens(path)
    items = []
    for number, row in enumerate(rows, 1):
        score = (row.get("sample_score") or {}).get("score") if isinstance(row.get("sample_score"), dict) else None
        if "index" not in row or not isinstance(score, dict) or not isinstance(score.get("value"), dict):
            raise UserError(f"{path}: line {number} is not an EvalScope >= 1.0 review (index and "
                            f"sample_score.score.value are required, as on line 1)")
        key = cell_text(row["index"])
        values = score["value"]
        name = score.get("main_score_name") if score.get("main_score_name") in values else next(iter(values), None)
        if name is None:
            raise UserError(f"{path}: index {key}: sample_score.score.value is empty")
        value = unit_value(values[name], f"{path}: index {key}: score {name}")
        prompt = row.get("input")
        messages = chat_messages(prompt)
        prompt_text = json.dumps(prompt, ensure_ascii=False) if messages else cell_text(prompt)
        response = cell_text(score.get("prediction"))
        items.append(_evalscope_item(
            task, group, key, value, name, prompt_text, messages, response=response,
            extracted=cell_text(score.get("extracted_prediction")) or response.strip(),
            gold=cell_text(row.get("target")), completion_tokens=tokens.get(key, 0)))
    return task, items


def _evalscope_v0_result(result: Any, metric: str, where: str) -> tuple[float, str]:
    """A 0.x `review.result` as (value, metric name): a bool or number (named by the reviewer spec's metric), or a
    dict of metrics (IFEval's) whose first per-item number counts (its lists, per instruction, are not per item)."""
    if isinstance(result, dict):
        name = next((k for k, v in result.items() if isinstance(v, (bool, int, float))), None)
        if name is None:
            raise UserError(f"{where}: review.result has no per-item number ({json.dumps(result)[:60]})")
        return unit_value(result[name], f"{where}: review.result.{name}"), name
    return unit_value(result, f"{where}: review.result"), metric


def _evalscope_v0_prompt(origin: Any) -> tuple[str, Optional[list[dict[str, Any]]]]:
    """(prompt text, chat messages) of a 0.x `origin_prompt` (`PromptData`: `data` = [prompt], `system_prompt`,
    `messages`): a one-prompt `data` is its text, as 1.x's `input` holds a text prompt, so the same text prompt hashes
    alike in both versions."""
    origin = origin if isinstance(origin, dict) else {}
    messages = chat_messages(origin.get("messages"))
    data = origin.get("data")
    text = data[0] if isinstance(data, list) and len(data) == 1 and isinstance(data[0], str) else \
        json.dumps(data, ensure_ascii=False) if data else ""
    if not messages and origin.get("system_prompt") and text:
        messages = [{"role": "system", "content": origin["system_prompt"]}, {"role": "user", "content": text}]
    return (json.dumps(messages, ensure_ascii=False) if messages else text), messages


def _evalscope_v0_items(path: Path, rows: list[dict[str, Any]]) -> tuple[str, list[ImportedItem]]:
    """EvalScope 0.8–0.17 (`Evaluator.get_reviews`): each line is the answer as the model API returned it
    (`choices[].message.content`, `usage`) with `index`, `subset_name`, `raw_input`, `origin_prompt`, `reviewed`,
    `reviewer_spec`, and each choice's `review: {gold, pred, result}`.  EvalScope leaves unreviewed or choiceless
    lines out of its score; so does this (such an item shows as present on one side only)."""
    subset = cell_text(rows[0].get("subset_name"))
    task, group = ((path.stem[:-len(subset) - 1], subset) if subset and path.stem.endswith("_" + subset)
                   else _evalscope_task(path))
    items = []
    for number, row in enumerate(rows, 1):
        where = f"{path}: line {number}"
        if _evalscope_version(row) != "0.x":
            raise UserError(f"{where} is not an EvalScope 0.x review (index, raw_input and choices are required, "
                            f"as on line 1)")
        if not row.get("reviewed") or not row["choices"]:
            continue
        reviews = [choice.get("review") for choice in row["choices"]]
        if not all(isinstance(review, dict) and "result" in review for review in reviews):
            raise UserError(f"{where}: a choice without review.result")
        metrics = (row.get("reviewer_spec") or {}).get("metric") if isinstance(row.get("reviewer_spec"), dict) else None
        metric = str(metrics[0]) if isinstance(metrics, list) and metrics else "result"
        scored = [_evalscope_v0_result(review["result"], metric, where) for review in reviews]
        value = sum(v for v, _ in scored) / len(scored)  # `n` samples of one item: their mean
        key = cell_text(row["index"])
        prompt_text, messages = _evalscope_v0_prompt(row.get("origin_prompt"))
        response = cell_text((row["choices"][0].get("message") or {}).get("content"))
        pred, gold = reviews[0].get("pred"), reviews[0].get("gold")
        usage = row.get("usage") if isinstance(row.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")  # the request's, so an item's own only with one choice
        items.append(_evalscope_item(
            task, group, key, value, scored[0][1], prompt_text, messages, response=response,
            extracted=(pred if isinstance(pred, str) else "") or response.strip(),
            gold=gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False, default=str),
            completion_tokens=tokens if isinstance(tokens, int) and len(reviews) == 1 else 0))
    return task, items


def _evalscope_parallelism(review_files: list[Path]) -> dict[str, Any]:
    """`eval_batch_size` (requests in flight for an API model, the batch size for a local one) of the task configs
    EvalScope wrote beside the reviews (`<timestamp>/configs/task_config*.yaml`); {} where none says."""
    sizes = {}
    for review in review_files:
        if len(review.parents) <= 2:
            continue
        for config_file in sorted((review.parents[2] / "configs").glob("task_config*.yaml")):
            try:
                config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise UserError(f"{config_file}: cannot read the EvalScope task config "
                                f"({str(exc).splitlines()[0]})") from None
            if isinstance(config, dict) and config.get("eval_batch_size") is not None:
                eval_type = f", eval_type {config['eval_type']}" if config.get("eval_type") else ""
                sizes[f"eval_batch_size {config['eval_batch_size']}{eval_type}"] = config_file
    if not sizes:
        return {}
    return {"parallelism": "EvalScope task config: " + "; ".join(sizes)}


def load_evalscope(path: Path) -> ImportedRun:
    """A review file, or an EvalScope output directory (`<timestamp>/reviews/<model>/*.jsonl`, searched
    recursively); the subsets of one benchmark become one task with a group per subset."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*.jsonl") if "reviews" in f.parts)
    if not files:
        raise UserError(f"{path}: no EvalScope reviews/<model>/<benchmark>_<subset>.jsonl files (predictions "
                        f"alone carry no correctness)")
    run = ImportedRun(source=str(path), fmt="evalscope", tasks={})
    run.spec = _evalscope_parallelism(files)
    for file in files:
        task, items = load_evalscope_file(file)
        run.tasks.setdefault(task, []).extend(items)
        run.titles[task] = f"{task} (EvalScope {items[0].meta['metric'] if items else ''})"
    for task, items in run.tasks.items():
        check_unique(items, f"{path}: task {task}")
    return run
