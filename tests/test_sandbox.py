"""scoring/sandbox.py with real bubblewrap sandboxes: what the sandboxed code can and cannot reach."""
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from flageval_lite.scoring.sandbox import NOBODY, Limits, SandboxError, run_python


def run(script: str, stdin: bytes = b"", **limits) -> str:
    finished = run_python(script, stdin, Limits(**limits))
    assert finished.returncode == 0, finished.stderr.decode()
    return finished.stdout.decode()


def sandbox_processes_left() -> int:
    """Processes of the sandbox user still on the host (meaningful when the tests run as root)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == NOBODY and (entry / "status").read_text().find("State:\tZ") < 0
            except OSError:
                pass
    return count


def test_stdin_reaches_the_script_and_its_stdout_comes_back():
    assert run("import sys; print(sys.stdin.read()[::-1])", b"olleh") == "hello\n"


def test_environment_is_cleared(monkeypatch):
    monkeypatch.setenv("FLAGEVAL_TEST_SECRET", "s3cret")
    out = run("import os, json; print(json.dumps(dict(os.environ)))")
    assert "s3cret" not in out and "FLAGEVAL_TEST_SECRET" not in out
    assert '"HOME": "/sandbox"' in out


def test_loopback_server_on_the_host_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    try:
        out = run(f"""
import shutil
import socket
import tempfile
for host in ("127.0.0.1", "1.1.1.1"):
    try:
        socket.create_connection((host, {port}), timeout=2)
        print(host, "connected")
    except OSError as exc:
        print(host, "refused", exc.errno)
""")
    finally:
        server.close()
    assert "connected" not in out and out.count("refused") == 2
    assert not accepted


def test_writes_outside_the_sandbox_fail_and_inside_are_thrown_away(tmp_path):
    target = tmp_path / "escape.txt"
    out = run(f"""
import os
for path in ("/usr/escape.txt", {str(target)!r}, "/etc/escape.txt"):
    try:
        open(path, "w").write("x")
        print(path, "written")
    except OSError as exc:
        print(path, "refused")
open("kept.txt", "w").write("x")
open("/tmp/kept.txt", "w").write("x")
print(sorted(os.listdir(".")), os.getcwd())
""")
    assert "written" not in out and out.count("refused") == 3
    assert "['kept.txt'] /sandbox" in out
    assert not target.exists()
    # a second sandbox starts empty: nothing of the first survived
    assert run("import os; print(os.listdir('.'), os.listdir('/tmp'))") == "[] []\n"


def test_host_files_are_not_visible():
    here = Path(__file__).resolve()
    out = run(f"import os; print(os.path.exists({str(here)!r}), os.path.exists('/root'), os.path.exists('/home'))")
    assert out == "False False False\n"


def test_libraries_of_the_harness_environment_are_importable_only_when_asked_for():
    """numpy is installed in the harness's environment (not in Debian's /usr): it loads, read-only, with
    `libraries`; without, the sandbox has the standard library only."""
    probe = "import importlib.util as u; print(u.find_spec('numpy') is not None)"
    assert run(probe) == "False\n"
    finished = run_python("import numpy, os; print(float(numpy.arange(4).sum()), "
                          "os.access(os.path.dirname(numpy.__file__), os.W_OK))", b"", libraries=True)
    assert finished.stdout.decode() == "6.0 False\n", finished.stderr.decode()


def test_a_harness_environment_under_tmp_stays_importable(monkeypatch):
    """The sandbox's /tmp is a fresh tmpfs: site-packages of a checkout under /tmp (as CI's may be) must still be
    seen, so they are mounted at places of their own."""
    import site

    folder = Path(tempfile.mkdtemp(prefix="flageval-site-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        (folder / "probe_module_under_tmp.py").write_text("VALUE = 42\n")
        (folder / "probe_module_under_tmp.py").chmod(0o644)
        real = site.getsitepackages()
        monkeypatch.setattr(site, "getsitepackages", lambda: [*real, str(folder)])
        finished = run_python("import probe_module_under_tmp as m; print(m.VALUE)", b"", libraries=True)
        assert finished.stdout.decode() == "42\n", finished.stderr.decode()
    finally:
        shutil.rmtree(folder)


def test_memory_hog_is_refused():
    out = run("""
try:
    block = bytearray(8 << 30)
    print("allocated")
except MemoryError:
    print("MemoryError")
""")
    assert out == "MemoryError\n"


def test_fork_bomb_hits_the_process_limit_and_leaves_nothing_behind():
    out = run("""
import os, time
children = 0
try:
    for _ in range(1000):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
except OSError:
    pass
print(children)
""", processes=32)
    assert int(out) < 32
    if os.geteuid() == 0:
        assert sandbox_processes_left() == 0


def test_wall_clock_limit_kills_the_process_group():
    start = time.monotonic()
    finished = run_python("import os, time\nos.fork()\nwhile True: time.sleep(0.01)", b"", Limits(wall_s=1.5))
    assert finished.timed_out and finished.returncode is None
    assert time.monotonic() - start < 8
    if os.geteuid() == 0:
        assert sandbox_processes_left() == 0


def test_cpu_limit_kills_a_busy_loop():
    finished = run_python("while True: pass", b"", Limits(cpu_s=1, wall_s=20))
    assert not finished.timed_out and finished.signal_name in ("SIGXCPU", "SIGKILL")


def test_missing_bwrap_is_a_sandbox_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxError, match="bubblewrap"):
        run_python("print(1)", b"")


def test_a_run_with_livebench_refuses_to_start_without_a_sandbox(tmp_path, monkeypatch):
    import yaml

    from flageval_lite.config.run import load_run_config
    from flageval_lite.errors import UserError
    from flageval_lite.pipeline import Pipeline

    path = tmp_path / "run.yaml"
    run_config = {"reference": "embedded_fp32", "candidate": "embedded_bf16", "tasks": ["livebench"]}
    path.write_text(yaml.safe_dump(run_config))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="LiveBench runs model code in a sandbox.*bubblewrap"):
        Pipeline(load_run_config(path), runs_root=tmp_path / "runs", reports_root=tmp_path / "reports").preflight()
