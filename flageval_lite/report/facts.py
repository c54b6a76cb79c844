"""The run's facts beside the tables: each side's backend (engine, model, dtype, device, parallelism, batching,
FlagGems evidence), the decision rules, diagnoses, and the warnings that qualify a comparison (hardware, server)."""
from __future__ import annotations

from typing import Any, Mapping

from .. import __version__
from ..analysis.compare import PairedTaskComparison
from ..analysis.comparison import Comparison

NOT_CHECKED = "not checked (external)"


def side_label(manifest: Mapping[str, Any], role: str) -> str:
    spec = (manifest.get("specs") or {}).get(role) or {}
    return str(spec.get("name") or role)


def backend_facts(manifest: Mapping[str, Any], role: str) -> dict[str, Any]:
    """What exactly ran in one role, from the ServeSpec and the ServerEvidence of the manifest."""
    spec = (manifest.get("specs") or {}).get(role) or {}
    evidence = (manifest.get("servers") or {}).get(role) or {}
    version = evidence.get("version") or {}
    batching, warnings = version.get("batching"), version.get("warnings")  # the embedded server's /version
    flaggems = spec.get("flaggems") or {}
    ops_registered, ops_called = list(evidence.get("ops_registered") or []), list(evidence.get("ops_called") or [])
    # An external server is described, not started: unless it serves our evidence (the embedded server's
    # /version, a plugin's evidence file, an op log on this host), its operators are only what the spec claims.
    checked = spec.get("engine") != "external" or bool(evidence.get("packages") or ops_registered or ops_called
                                                         or "flaggems_ops" in version)
    claimed = "" if checked else f" ({NOT_CHECKED})"
    unknown_ops = spec.get("ops") == "n/a"  # an import: the other tool's files record no operators
    return {
        "role": role,
        "label": side_label(manifest, role),
        "engine": spec.get("engine", "?"),
        "model": spec.get("model") or ", ".join(evidence.get("models") or []) or "engine default",
        "served_models": ", ".join(evidence.get("models") or []),
        "dtype": spec.get("dtype", "?"),
        "ops": f"{spec.get('ops', '?')}{claimed}",
        "flaggems_route": f"{flaggems.get('route', 'off')}{claimed}",
        "device": evidence.get("gpu") or spec.get("device", "?"),
        # an import states what the tool's files record (or n/a and why), never our serve spec's TP 1 × PP 1 default
        "parallelism": spec.get("parallelism") or _parallelism(spec, len((manifest.get("replicas") or {}).get(role)
                                                                         or ()) or 1),
        "spec": spec,
        "server_version": version.get("version") or ", ".join(f"{k} {v}" for k, v in version.items()) or "unknown",
        "packages": ", ".join(f"{k} {v}" for k, v in sorted((evidence.get("packages") or {}).items())) or "unknown",
        "env_switches": ", ".join(f"{k}={v}" for k, v in sorted((evidence.get("env_switches") or {}).items())),
        "command": " ".join(str(a) for a in evidence.get("command") or []),
        "ops_registered": ops_registered,
        "ops_called": ops_called,
        "ops_count": "n/a" if unknown_ops else f"{len(ops_registered)} / {len(ops_called)}" if checked else NOT_CHECKED,
        "evidence_checked": checked and not unknown_ops,
        "startup_s": evidence.get("startup_s"),
        "restarts": evidence.get("restarts", 0),
        "batching": _batching_text(batching if isinstance(batching, dict) else {}),
        "server_warnings": [str(w) for w in warnings if w] if isinstance(warnings, list) else [],
    }


def _batching_text(batching: Mapping[str, Any]) -> str:
    """The embedded server's batching block in words, e.g. "packed, up to 32 rows, padded to 16, row-invariant"."""
    if not batching:
        return ""
    invariant = "row-invariant" if batching.get("row_invariant") else "NOT row-invariant"
    return (f"{batching.get('mode', '?')}, up to {batching.get('max_batch', '?')} rows, padded to "
            f"{batching.get('row_multiple', '?')}, {invariant}")


def _parallelism(spec: Mapping[str, Any], replicas: int = 1) -> str:
    """e.g. "TP 2 × PP 1 on GPUs 0,1" or "TP 1 × PP 1 on GPUs 0,1, 2 replicas"; the GPU set is the spec's
    CUDA_VISIBLE_DEVICES (with the run's `gpus`)."""
    tp, pp = _tp_pp(spec)
    devices = spec.get("cuda_visible_devices") or ""
    where = f" on GPU{'s' if ',' in devices else ''} {devices}" if devices else ""
    return f"TP {tp} × PP {pp}{where}" + (f", {replicas} replicas" if replicas > 1 else "")


def _tp_pp(spec: Mapping[str, Any]) -> tuple[int, int]:
    return int(spec.get("tensor_parallel_size") or 1), int(spec.get("pipeline_parallel_size") or 1)


def hardware_warnings(backends: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why a difference might come from the machine rather than the operators: other GPU models or drivers,
    other parallelism, or other boards of the same model.  `backends`: role -> `backend_facts(...)`."""
    ref, cand = backends["reference"], backends["candidate"]
    warnings = []
    if ref["device"] != cand["device"]:
        warnings.append(f"The two sides ran on different hardware (reference: {ref['device']}; candidate: "
                        f"{cand['device']}): score and performance differences may come from the hardware, not "
                        "from the operators.")
    unknown = any(str(side["parallelism"]).startswith("n/a") for side in (ref, cand))  # an import's, unrecorded
    if _tp_pp(ref["spec"]) != _tp_pp(cand["spec"]) and not unknown:
        warnings.append(f"The two sides used different parallelism ({ref['parallelism']} vs {cand['parallelism']}): "
                        "the reductions differ, so outputs may differ without any operator being wrong.")
    ref_gpus, cand_gpus = (side["spec"].get("cuda_visible_devices") or "" for side in (ref, cand))
    if ref["device"] == cand["device"] and ref_gpus and cand_gpus and ref_gpus != cand_gpus:
        warnings.append(f"The sides ran on different GPUs of the same model (reference {ref_gpus}, candidate "
                        f"{cand_gpus}): boards differ by a few per cent in clocks and thermals, so compare "
                        "performance ratios with that margin.")
    return warnings


def server_warnings(backends: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a side's server warned about itself at start-up (the embedded server: batching with no proven row
    multiple, so that a request's tokens may depend on the other requests in its pass)."""
    return [f"The {side['role']} server ({side['label']}) warned: {warning}. Differences between the sides may come "
            "from batching rather than from the operators."
            for side in backends.values() for warning in side["server_warnings"]]


def run_facts(comparison: Comparison, manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    config = manifest.get("config") or {}
    facts = [
        ("run id", str(manifest.get("run_id") or config.get("run_id") or "?")),
        ("date", str(config.get("started") or manifest.get("date") or "?")),
        ("suite", str(config.get("suite") or "?")),
        ("items per task", "all" if config.get("limit") is None else f"first {config['limit']}"),
        ("decision rule", _default_rule_text(comparison)),
        ("alpha", f"{comparison.alpha:g} (regression and improvement Holm-adjusted across {len(comparison.tasks)} "
                  f"tasks)"),
        ("flageval-lite", str(config.get("flageval_lite") or __version__)),
    ]
    repeats = _repeat_notation(comparison, manifest)
    if repeats:
        sampling = ", ".join(f"{k} {v:g}" for k, v in ((config.get("sampling") or {}).items()))
        facts.append(("repeats per item", "; ".join(f"{title} {notation}" for title, notation in repeats.items())
                      + f" (each repeat its own seed{', ' + sampling if sampling else ''}; one score per item is "
                        f"compared)"))
    for failure in manifest.get("replica_failures") or ():
        facts.append(("replica given up", f"{failure.get('role')} replica {failure.get('replica')} "
                                          f"({failure.get('base_url')}): {failure.get('error')}"))
    if config.get("compared"):
        facts.append(("stored runs compared", " vs ".join(map(str, config["compared"]))))
    if revisions := _revision_fact(manifest):
        facts.append(("dataset revisions", revisions))
    facts += _diagnosis_facts(manifest)
    return facts


def revision_text(source: Mapping[str, Any]) -> str:
    """A source's revision; both, when two compared runs read it at different ones."""
    revision = str(source.get("revision", ""))
    other = source.get("candidate_revision")
    return f"{revision} (reference) / {other} (candidate)" if other is not None else revision


def _revision_fact(manifest: Mapping[str, Any]) -> str:
    """Each hub source once, at the revision the run read it (both when two compared runs differ)."""
    seen: dict[str, str] = {}
    for row in (manifest.get("provenance") or {}).values():
        for source in row.get("sources") or ():
            if "configs" in source:
                seen.setdefault(str(source.get("dataset")), revision_text(source))
    return "; ".join(f"{dataset} @ {revision}" for dataset, revision in seen.items())


def _default_rule_text(comparison: Comparison) -> str:
    """The run's default rule in words, and the tasks whose own rule differs."""
    parts = []
    if comparison.margin is not None:
        parts.append(f"equivalence ±{comparison.margin:g} points (90 % CI inside the margin)")
    if comparison.release_gate is not None:
        parts.append(f"non-inferiority −{comparison.release_gate:g} points (90 % CI above −δ: one-sided α = 0.05)")
    text = ", else ".join(parts) + (f"; incomplete above {100 * comparison.max_error_rate:g} % of items lost to "
                                    f"errors or with any lost on one side only")
    own = [f"{t.title}: {', '.join(_row_rules(t))}" for t in comparison.tasks
           if (t.equivalence_margin, t.non_inferiority_margin, t.max_error_rate)
           != (comparison.margin, comparison.release_gate, comparison.max_error_rate)]
    return text + (f" (own rules: {'; '.join(own)})" if own else "")


def _row_rules(t: PairedTaskComparison) -> list[str]:
    rules = [f"±{t.equivalence_margin:g}"] if t.equivalence_margin is not None else []
    rules += [f"−{t.non_inferiority_margin:g}"] if t.non_inferiority_margin is not None else []
    return rules + [f"errors ≤ {100 * t.max_error_rate:g} %"]


def _diagnosis_facts(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One line each for `flageval-lite bisect` and `ops` results stored in the run's meta (bisect.md, ops.md)."""
    facts = []
    bisect = manifest.get("bisect") or {}
    if bisect:
        restarts = f"{bisect.get('rounds', '?')} restarts over {len(bisect.get('universe') or ())} operators"
        if not bisect.get("reproduced"):
            text = f"the divergence did not reproduce with all operators on ({restarts})"
        else:
            early = "" if bisect.get("complete") else ", stopped early"
            crashes = (bisect.get("culprits_by_kind") or {}).get("crashes") or ()
            text = (f"{', '.join(bisect.get('culprits') or ()) or 'no culprit of the divergence'}"
                    f"{'; crashes: ' + ', '.join(crashes) if crashes else ''} ({restarts}{early})")
        facts.append(("FlagGems bisection", f"{text}; {bisect.get('report', 'bisect.md')}"))
    opcheck = manifest.get("opcheck") or {}
    if opcheck:
        failed = ", ".join(opcheck.get("failed") or ()) or "none"
        facts.append(("FlagGems operator check", f"{opcheck.get('replayed', 0)} of {opcheck.get('operators', 0)} "
                                                 f"operators replayed, outside tolerance: {failed}; "
                                                 f"{opcheck.get('report', 'ops.md')}"))
    return facts


def _repeat_notation(comparison: Comparison, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Row title -> "avg@k" / "pass@k" for the tasks asked more than once."""
    repeats = manifest.get("repeats") or {}
    return {t.title: f"{repeats[t.task]['aggregate']}@{repeats[t.task]['k']}" for t in comparison.tasks
            if t.task in repeats}
