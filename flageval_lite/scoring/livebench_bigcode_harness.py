"""Runs INSIDE the sandbox (scoring/sandbox.py): one candidate program against a BigCodeBench-style unittest suite.

Reads {"code", "test_code", "time_limit_s"} as JSON on stdin and writes one JSON line {"status", "failures",
"exception", "missing_modules"} on the stdout it was started with.  Follows BigCodeBench's `unsafe_execute` as
LiveBench ships it (livebench/code_runner/eval/__init__.py): the program and the tests are executed together as
the module `__test__`, in a fresh temporary directory, with TZ=UTC, one OpenMP thread, a 10 MiB stack limit,
`exit`/`quit` removed, stdout/stderr captured and stdin unreadable; the `TestCases` class is run under one
`time_limit_s` alarm for the whole suite.  Status "pass" needs every test to pass; "timeout" when the alarm
fired; "fail" otherwise (a failing or erroring test, or an exception while loading the program).

`missing_modules` names the top-level module of every ModuleNotFoundError met (in the program, the tests, or the
exception chain of a library's own ImportError), so the caller can tell a library the scoring environment lacks
from a wrong answer.
"""
import builtins
import contextlib
import faulthandler
import io
import json
import os
import resource
import signal
import sys
import tempfile
import time
import types
import unittest

STACK_BYTES = 10 * 1024 * 1024  # BigCodeBench's max_stack_limit (10 MB)


class TimeoutException(Exception):
    pass


class WriteOnlyStringIO(io.StringIO):
    """stdin of the program under test: reading it raises, as in BigCodeBench."""

    def read(self, *args, **kwargs):
        raise IOError

    def readline(self, *args, **kwargs):
        raise IOError

    def readlines(self, *args, **kwargs):
        raise IOError

    def readable(self, *args, **kwargs):
        return False


def _missing_modules(exc, found):
    """Top-level names of the ModuleNotFoundErrors in `exc`'s cause/context chain, added to `found`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            found.add(exc.name.split(".")[0])
        exc = exc.__cause__ or exc.__context__


class RecordingResult(unittest.TestResult):
    """A TestResult that also keeps what the errors were, not only their formatted tracebacks."""

    def __init__(self):
        super().__init__()
        self.missing = set()
        self.timed_out = False

    def addError(self, test, err):
        super().addError(test, err)
        _missing_modules(err[1], self.missing)
        if isinstance(err[1], TimeoutException):
            # Upstream runs the remaining tests with no limit until its process is killed; the outcome is the same
            # (not a pass), so stop here rather than wait for the sandbox's wall-clock kill.
            self.timed_out = True
            self.stop()


def _alarm(signum, frame):
    raise TimeoutException("Timed out!")


def _guard():
    """BigCodeBench's reliability_guard, minus what the sandbox already does (address-space limit, no network)."""
    os.environ["TZ"] = "UTC"
    time.tzset()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    resource.setrlimit(resource.RLIMIT_STACK, (STACK_BYTES, STACK_BYTES))
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    try:  # BigCodeBench closes every figure before the program runs; without matplotlib there is none to close
        import matplotlib.pyplot as plt
        plt.close("all")
    except ModuleNotFoundError:
        pass


def _short(text, length=600):
    return text if len(text) <= length else text[: length // 2] + "...(truncated)..." + text[-length // 2:]


def run(code, test_code, time_limit_s):
    module = types.ModuleType("__test__")
    module.__dict__.update({"__builtins__": builtins, "__file__": "__test__.py", "__package__": None,
                            "__doc__": None, "sys": sys, "os": os, "environ": os.environ})
    missing = set()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                _redirect_stdin(WriteOnlyStringIO()):
            exec(compile(code + "\n" + test_code, "__test__.py", "exec"), module.__dict__)
            sys.modules["__test__"] = module
            suite = unittest.TestLoader().loadTestsFromTestCase(getattr(module, "TestCases"))
            result = RecordingResult()
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, time_limit_s)
            try:
                suite.run(result)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as exc:  # noqa: B902 - loading the program failed (syntax error, import, exit, alarm)
        signal.setitimer(signal.ITIMER_REAL, 0)
        _missing_modules(exc, missing)
        status = "timeout" if isinstance(exc, TimeoutException) else "fail"
        return {"status": status, "failures": {}, "exception": _short(repr(exc)), "missing_modules": sorted(missing)}
    failures = {test.id().split(".")[-1]: _short(trace) for test, trace in result.failures + result.errors}
    status = "timeout" if result.timed_out else ("fail" if failures else "pass")
    return {"status": status, "failures": failures, "exception": "", "tests_run": result.testsRun,
            "missing_modules": sorted(result.missing)}


@contextlib.contextmanager
def _redirect_stdin(stream):
    original, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = original


def main():
    main_pid = os.getpid()
    payload = json.loads(sys.stdin.read())
    # The verdict goes to a private copy of stdout; the program's own writes to fds 1 and 2 go nowhere.
    verdict_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    _guard()
    workdir = tempfile.mkdtemp()
    os.chdir(workdir)
    verdict = run(payload["code"], payload["test_code"], float(payload["time_limit_s"]))
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    if os.getpid() != main_pid:
        os._exit(0)  # a process the program forked got here: only the harness itself gives the verdict
    verdict_out.write(json.dumps(verdict, default=str) + "\n")
    verdict_out.flush()
    # End whatever the program left running (the sandbox's pid namespace is all it could reach) and skip the
    # interpreter teardown: no atexit hook or __del__ of the program runs after the verdict.
    os.kill(-1, signal.SIGKILL)
    os._exit(0)


if __name__ == "__main__":
    main()
