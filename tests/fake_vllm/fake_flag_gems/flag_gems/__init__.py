"""A CPU-only double of the `flag_gems` API surface our vLLM plugin uses (FlagGems 5.0.x signatures).

It registers nothing with torch; it remembers how it was called and, like FlagGems with
record=True, writes `[DEBUG] flag_gems.ops.<op>.<op>: GEMS <OP>` lines to `path` (opened with
mode "w") when an operator is called through `call_op`.
"""

__version__ = "5.0.2-fake"
KNOWN_OPS = ("mm", "embedding", "softmax", "index", "cat", "argmax")

calls = []  # (function name, keyword arguments) in call order
_state = {"registered": None, "log": None, "once": False, "logged": set()}


def _register(ops, record, once, path):
    _state.update(registered=sorted(ops), once=once, log=open(path, "w") if record else None)


def enable(lib=None, unused=None, registrar=None, record=False, once=False, path=None):
    calls.append(("enable", {"unused": unused, "record": record, "once": once, "path": path}))
    _register([op for op in KNOWN_OPS if op not in (unused or ())], record, once, path)


def only_enable(lib=None, include=None, registrar=None, record=False, once=False, path=None):
    calls.append(("only_enable", {"include": include, "record": record, "once": once, "path": path}))
    _register([op for op in KNOWN_OPS if op in (include or ())], record, once, path)


def all_registered_ops():
    if _state["registered"] is None:  # FlagGems fails the same way before enable()
        raise AttributeError("'NoneType' object has no attribute 'get_all_ops'")
    return list(_state["registered"])


def call_op(op):
    """What dispatching an aten op to a registered FlagGems kernel leaves in the op log."""
    if _state["registered"] is None or op not in _state["registered"] or _state["log"] is None:
        return
    if _state["once"] and op in _state["logged"]:
        return
    _state["logged"].add(op)
    _state["log"].write(f"[DEBUG] flag_gems.ops.{op}.{op}: GEMS {op.upper()}\n")
    _state["log"].flush()
