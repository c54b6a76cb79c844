"""Run an untrusted Python script in a throw-away bubblewrap sandbox.

The script sees: the harness interpreter and /usr read-only, a fresh size-capped tmpfs as cwd, HOME and /tmp,
no network (its own empty network namespace), its own pid namespace (everything in it dies with the sandbox), an
environment of HOME/PATH/LANG only (nothing of os.environ), and rlimits on CPU seconds, address space, file size
and process count.  Run as root, the sandbox drops to uid/gid 65534 first: the kernel does not apply
RLIMIT_NPROC to uid 0, and a fork bomb must hit it.  A wall-clock timeout kills the whole process group.

`SandboxError` means the harness could not run the sandbox (bwrap missing, namespaces refused): an
infrastructure fault the caller must report as such, never as the script's failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

NOBODY = 65534
SANDBOX_DIR = "/sandbox"
SCRIPT_PATH = "/sandbox_script.py"
LIBRARIES_DIR = "/sandbox_libraries"  # the harness's site-packages, read-only, with `libraries`
# The sandbox writes this line first; a run that never printed it did not start (a sandbox fault).
READY = b"flageval-sandbox-ready\n"


class SandboxError(RuntimeError):
    """The sandbox itself could not be started: not the sandboxed code's fault."""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 60
    wall_s: float = 60.0
    memory_bytes: int = 4 << 30
    file_bytes: int = 64 << 20  # any one file the script writes, its stdout/stderr capture included
    processes: int = 64
    tmpfs_bytes: int = 64 << 20  # each of /sandbox and /tmp


@dataclass
class Finished:
    returncode: Optional[int]  # None when killed at the wall-clock limit
    stdout: bytes  # after the READY line
    stderr: bytes
    timed_out: bool
    wall_s: float

    @property
    def signal_name(self) -> str:
        """The signal that ended the script: bwrap exits 128 + N when its child dies of signal N."""
        if self.returncode is None or self.returncode <= 128:
            return ""
        try:
            return signal.Signals(self.returncode - 128).name
        except ValueError:
            return f"signal {self.returncode - 128}"


def bwrap_path() -> Optional[str]:
    return shutil.which("bwrap")


def _system_mounts() -> list[str]:
    """/usr read-only, and the merged-/usr links (/bin, /lib, ...) as the host has them."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    for name in ("/etc/ld.so.cache", "/etc/localtime"):
        if os.path.exists(name):
            args += ["--ro-bind", name, name]
    return args


def _reachable_by_others(path: str, directory: bool = False) -> bool:
    """Every directory above `path` can be searched, and the file read (the directory listed and searched), by a
    user who owns none of them."""
    parts = Path(path).parents
    need = 0o005 if directory else 0o004
    return all(os.stat(p).st_mode & 0o001 for p in parts) and os.stat(path).st_mode & need == need


def sandbox_python() -> tuple[str, str]:
    """(interpreter, prefix to mount): this harness's Python, or where the sandbox user (uid 65534 when we run
    as root) cannot reach it, Debian's /usr/bin/python3.  The sandbox offers the standard library, and with
    `libraries` the harness's site-packages (library_paths)."""
    interpreter, prefix = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    if os.geteuid() != 0 or _reachable_by_others(interpreter):
        return interpreter, prefix
    system = os.path.realpath("/usr/bin/python3")
    if os.path.exists(system) and _reachable_by_others(system):
        return system, "/usr"
    raise SandboxError(f"no Python the sandbox user (uid {NOBODY}) can run: {interpreter} is not reachable and "
                       "/usr/bin/python3 is missing")


def library_paths(interpreter: str) -> list[str]:
    """The harness environment's site-packages, for programs that import third-party libraries (numpy, pandas,
    ...): those the sandbox user can read, and only when the sandbox's interpreter is this Python or the same
    minor version (the libraries' compiled extensions must load in it)."""
    ours = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if interpreter != os.path.realpath(sys.executable) and os.path.basename(interpreter) != ours:
        return []
    paths = [os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p)]
    return [p for p in dict.fromkeys(paths) if os.geteuid() != 0 or _reachable_by_others(p, directory=True)]


def _limit_and_drop(limits: Limits):
    def preexec() -> None:
        for kind, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_bytes),
                            (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NPROC, limits.processes),
                            (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(kind, (value, value))
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
    return preexec


def run_python(script: str, stdin: bytes, limits: Limits = Limits(), libraries: bool = False) -> Finished:
    """Run `script` (Python source) in the sandbox with `stdin` as its standard input; with `libraries`, the
    harness environment's site-packages are mounted read-only and importable too."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxError("bubblewrap (bwrap) is not installed; `apt-get install bubblewrap` to score code")
    interpreter, prefix = sandbox_python()
    extra = library_paths(interpreter) if libraries else []
    # Mounted at fixed places of their own: a venv under /tmp would be hidden by the sandbox's fresh /tmp.
    mounted = [f"{LIBRARIES_DIR}/{index}" for index in range(len(extra))]
    with tempfile.TemporaryDirectory(prefix="flageval-sandbox-") as host_dir:
        host = Path(host_dir)
        (host / "script.py").write_text(script, encoding="utf-8")
        (host / "stdin").write_bytes(stdin)
        # Opened here, before the privilege drop: the sandbox user cannot reach our temp dir.
        script_fd = os.open(host / "script.py", os.O_RDONLY)
        info_read, info_fd = os.pipe()  # bwrap reports the sandbox's pid 1 here once the namespaces exist
        command = [bwrap, "--info-fd", str(info_fd),
                   "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
                   "--setenv", "HOME", SANDBOX_DIR, "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
                   # /tmp first: an interpreter installed under /tmp is then bound on top of it, not hidden
                   "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp",
                   *_system_mounts(), *([] if prefix == "/usr" else ["--ro-bind", prefix, prefix]),
                   *[arg for path, target in zip(extra, mounted) for arg in ("--ro-bind", path, target)],
                   "--ro-bind-data", str(script_fd), SCRIPT_PATH,
                   "--proc", "/proc", "--dev", "/dev",
                   "--size", str(limits.tmpfs_bytes), "--tmpfs", SANDBOX_DIR, "--chdir", SANDBOX_DIR,
                   "--remount-ro", "/",  # bwrap's own root (where /etc, /sandbox_script.py live) read-only too
                   "--uid", str(NOBODY), "--gid", str(NOBODY),
                   interpreter, "-I", "-c",
                   f"import sys; sys.stdout.buffer.write({READY!r}); sys.stdout.flush(); "
                   f"sys.argv = [{SCRIPT_PATH!r}]; "
                   # ahead of the interpreter's own site-/dist-packages: the harness's versions of a library win
                   f"sys.path[next((i for i, p in enumerate(sys.path) if p.endswith('-packages')), len(sys.path)):0]"
                   f" = {mounted!r}; "
                   f"exec(compile(open({SCRIPT_PATH!r}).read(), {SCRIPT_PATH!r}, 'exec'))"]
        start = time.monotonic()
        try:
            with open(host / "stdin", "rb") as fin, open(host / "stdout", "wb") as fout, \
                    open(host / "stderr", "wb") as ferr:
                try:
                    process = subprocess.Popen(command, stdin=fin, stdout=fout, stderr=ferr, close_fds=True,
                                               pass_fds=(script_fd, info_fd), start_new_session=True,
                                               preexec_fn=_limit_and_drop(limits), env={})
                except OSError as exc:
                    raise SandboxError(f"cannot start bwrap: {exc}") from None
                os.close(info_fd)
                info_fd = -1
                timed_out = _supervise(process, info_read, start + limits.wall_s)
                returncode: Optional[int] = None if timed_out else process.returncode
        finally:
            for fd in (script_fd, info_fd, info_read):
                if fd >= 0:
                    os.close(fd)
        wall_s = time.monotonic() - start
        out = (host / "stdout").read_bytes()
        err = (host / "stderr").read_bytes()
    started = out.startswith(READY)
    if not started:
        why = "timed out" if timed_out else f"exit {returncode}"
        raise SandboxError(f"the sandbox did not start ({why}): {err.decode(errors='replace').strip()[-300:]}")
    return Finished(returncode, out[len(READY):], err, timed_out, wall_s)


def check_sandbox() -> None:
    """Start one empty sandbox; SandboxError says why it cannot start on this machine."""
    finished = run_python("", b"", Limits(cpu_s=10, wall_s=30))
    if finished.returncode != 0:
        stderr = finished.stderr.decode(errors="replace")[-300:]
        raise SandboxError(f"an empty sandbox exited {finished.returncode}: {stderr}")


def _sandbox_init(process: subprocess.Popen, info_read: int, bwrap_fd: int, deadline: float) -> Optional[int]:
    """A pidfd of the sandbox's pid 1, read from bwrap's --info-fd report while bwrap still runs.  The pid is
    checked to be bwrap's child: bwrap is alive and our child, so that is no unrelated process with a recycled pid."""
    report = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([info_read, bwrap_fd], [], [], max(0.0, deadline - time.monotonic()))
        if info_read not in ready:
            return None  # bwrap exited (or the time is up) before reporting
        chunk = os.read(info_read, 4096)
        if not chunk:
            return None
        report += chunk
        try:
            pid = int(json.loads(report)["child-pid"])
        except ValueError:
            continue  # the report is not complete yet
        except (KeyError, TypeError):
            return None
        try:
            pidfd = os.pidfd_open(pid)
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        parent = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        if parent == str(process.pid):
            return pidfd
        os.close(pidfd)
        return None
    return None


def _supervise(process: subprocess.Popen, info_read: int, deadline: float) -> bool:
    """Wait for the sandbox until `deadline`; past it, SIGKILL its pid 1 (the kernel then kills the whole pid
    namespace) and bwrap's process group.  Either way return only once no sandboxed process is left, so none
    outlives the call or counts against the next sandbox's process limit: bwrap exits as soon as the script does,
    before the rest of the namespace is gone.  True when the deadline was hit."""
    bwrap_fd = os.pidfd_open(process.pid)
    init_fd = _sandbox_init(process, info_read, bwrap_fd, deadline)
    try:
        done, _, _ = select.select([bwrap_fd], [], [], max(0.0, deadline - time.monotonic()))
        timed_out = not done
        if timed_out:
            if init_fd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(init_fd, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if init_fd is not None:
            select.select([init_fd], [], [], 10)  # a pidfd turns readable once its process has exited
        return timed_out
    finally:
        os.close(bwrap_fd)
        if init_fd is not None:
            os.close(init_fd)
