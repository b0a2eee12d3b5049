"""Run model-generated code in a bubblewrap sandbox: no network, read-only system, limits, nothing trusted back.

`run(argv, env, mode, limits, scratch, inputs)` runs `argv` in the working directory /scratch: a private tmpfs that
disappears with the run, or the host directory `scratch` when the caller needs files back (it reads them with
`read_output` only: no link followed, regular files only, a size cap). `inputs` (name → text, bytes or a host file)
are written to a fresh root-owned directory, bound read-only at /scratch/input. With mode "bwrap" the process sees
only the system directories (/usr, /etc and the merged-usr links) and the Python installation it needs, read-only;
/scratch is the only writable place besides a private /tmp and /dev/shm; it has its own network (none), PID, IPC and
UTS namespaces, a cleared environment (PATH, HOME, LANG, one thread per numeric library and `env` only), a new
session (no terminal injection), and it dies with its parent. It runs as uid/gid 65534 (nobody): invoked as root,
bwrap sets the namespaces up and `setpriv` drops to 65534 with no capabilities and no supplementary groups, so
root-only files stay unreadable; invoked as another user, an unprivileged user namespace maps 65534 onto that user,
who keeps only their own rights on the read-only binds. The interpreter is run from its resolved directory, so a
venv reached through a symlink works.

Every run has `Limits`: a wall-clock deadline enforced from outside (the host kills the sandbox's first process, and
the kernel every other process of its PID namespace with it, before `run` returns), and, set by `prlimit` before the
code starts, each process's address space, the number of processes of its uid, the size of each file it writes
(stdout and stderr included) and the size of each tmpfs. stdout and stderr go to files the host opened; the
`Outcome` holds stdout, the end of stderr, and whether the deadline ended the run.

Mode "none" runs `argv` directly, with this process's uid, files, network and environment, under the same deadline
(its process group is killed) and rlimits: it is only taken when asked for explicitly (`eval.sandbox=none`) and
`require` logs a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
MODES = ("bwrap", "none")
NOBODY = 65534
INSIDE = "/scratch"
INPUT = "input"  # the read-only inputs, relative to the working directory
SYSTEM_DIRS = ("/usr", "/etc")
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}  # threads count
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": INSIDE, "TMPDIR": "/tmp",  # as processes and reserve
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **ONE_THREAD}  # address space
STDERR_TAIL = 4000
KILL_WAIT_S = 30  # for bwrap to exit once its namespace is gone
INSTALL_HINT = ("install bubblewrap (`apt-get install bubblewrap`, which `make install` does as root), or accept "
                "running model-generated code with your own uid, files, network and environment: eval.sandbox=none")


class SandboxUnavailable(RuntimeError):
    pass


class UntrustedOutput(RuntimeError):
    """A file sandboxed code could have written that is not a plain, small enough regular file."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use."""

    deadline_s: float  # wall clock, enforced from outside
    memory_bytes: int = 1 << 30  # address space of each process (RLIMIT_AS)
    processes: int = 128  # processes and threads of its uid (RLIMIT_NPROC; as root: all of uid 65534's on the machine)
    file_bytes: int = 64 << 20  # each file written, stdout and stderr included (RLIMIT_FSIZE)
    tmpfs_bytes: int = 256 << 20  # each of /tmp, /dev/shm and a private /scratch (needs bwrap ≥ 0.8)

    def prlimit(self, processes: bool = True) -> list[str]:
        """`prlimit` and its options; `processes`=False leaves the process count alone (unsandboxed, it would count
        every process of the invoking user)."""
        return ["prlimit", f"--as={self.memory_bytes}", *([f"--nproc={self.processes}"] if processes else []),
                f"--fsize={self.file_bytes}", "--core=0", "--"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: bytes
    stderr: str  # its last STDERR_TAIL characters
    deadline_s: float | None  # set when the deadline ended the run

    def failure(self) -> str | None:
        """None after a clean exit, else what ended the run: the deadline, or the exit status and stderr's last line."""
        if self.deadline_s is not None:
            return f"exceeded the sandbox's wall-clock deadline of {self.deadline_s:g} s"
        if self.returncode == 0:
            return None
        last = self.stderr.strip().splitlines()[-1:]
        return f"exit status {self.returncode}" + (f": {last[0]}" if last else "")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown sandbox {mode!r} (eval.sandbox); valid: {', '.join(MODES)}")


def python_paths() -> list[str]:
    """Directories this Python needs to start and import its packages (venv, base installation, site dirs)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent),
             *site.getsitepackages()}
    paths |= {p for p in sys.path if p and Path(p).is_dir() and "site-packages" in p}
    return sorted(paths)


def _covered(path: str, binds: list[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds)


def _resolved_program(program: str) -> str:
    """`program` with its directory resolved (the sandbox binds resolved paths) and its name kept: a venv's
    bin/python is a link to the base interpreter, and only its own name makes Python find the venv."""
    if not os.path.isabs(program):
        return program
    return os.path.join(os.path.realpath(os.path.dirname(program)), os.path.basename(program))


@functools.cache
def _tmpfs_size() -> bool:
    """Whether this bwrap sizes a tmpfs (`--size`, bubblewrap ≥ 0.8)."""
    return "--size" in subprocess.run(["bwrap", "--help"], capture_output=True, text=True).stdout


def bwrap_command(argv: list[str], env: dict[str, str], limits: Limits, scratch: Path | None = None,
                  input_dir: Path | None = None, info_fd: int | None = None) -> list[str]:
    """The bwrap command line that runs `argv` (cwd /scratch) in the sandbox described in the module docstring."""
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv"]
    args += ["--info-fd", str(info_fd)] if info_fd is not None else []
    root = os.geteuid() == 0
    if not root:  # an unprivileged user namespace; 65534 inside is the invoking user outside
        args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    binds: list[str] = []
    for link in MERGED_USR_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            binds.append(link)
    for path in [*SYSTEM_DIRS, *python_paths()]:
        path = os.path.realpath(path)
        if os.path.exists(path) and not _covered(path, binds):
            binds = [b for b in binds if not _covered(b, [path])] + [path]
    tmpfs = ["--perms", "1777", *(["--size", str(limits.tmpfs_bytes)] if _tmpfs_size() else []), "--tmpfs"]
    args += [*tmpfs, "/tmp"]  # first: a venv or checkout under /tmp is bound on top of it
    made: set[str] = set()
    for path in sorted(binds):
        for parent in reversed(Path(path).parents[:-1]):  # bwrap would create them 0700, closed to uid 65534
            if str(parent) not in made and not _covered(str(parent), binds):
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += ["--ro-bind", path, path]
    args += ["--bind", str(scratch), INSIDE] if scratch is not None else [*tmpfs, INSIDE]
    args += ["--ro-bind", str(input_dir), f"{INSIDE}/{INPUT}"] if input_dir is not None else []
    args += ["--proc", "/proc", "--dev", "/dev", *tmpfs, "/dev/shm", "--chdir", INSIDE]
    for key, value in {**BASE_ENV, **env}.items():
        args += ["--setenv", key, value]
    args += ["--", *limits.prlimit()]
    if root:  # drop to nobody inside: no capabilities, no groups, cannot regain them
        args += ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                 "--bounding-set=-all", "--"]
    return args + [_resolved_program(argv[0]), *argv[1:]]


@functools.cache
def _probe() -> str | None:
    """None when the sandbox starts this Python under the default limits here, else why not."""
    tools = {"bwrap": "bubblewrap", "prlimit": "util-linux", **({"setpriv": "util-linux"} if os.geteuid() == 0 else {})}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            return f"{tool} ({package}) is not installed"
    probe = run([sys.executable, "-I", "-c", "pass"], {}, "bwrap", Limits(deadline_s=60), checked=False)
    if probe.returncode != 0:
        return f"bwrap cannot start a sandbox here: {probe.failure()}"
    return None


def _refuse_unavailable() -> None:
    if reason := _probe():
        raise SandboxUnavailable(f"refusing to run model-generated code without a sandbox: {reason}. Fix: "
                                 f"{INSTALL_HINT}")


def require(mode: str) -> None:
    """Refuse to go on when `mode` is "bwrap" and the sandbox cannot start; warn loudly for "none"."""
    check_mode(mode)
    if mode == "none":
        log.warning("eval.sandbox=none: model-generated code runs UNSANDBOXED with uid %d, this machine's files and "
                    "network and the full environment (tokens included)", os.geteuid())
        return
    _refuse_unavailable()


def prepare_scratch(scratch: Path) -> Path:
    """Make `scratch` (and what it holds) writable by the sandbox's uid."""
    if os.geteuid() == 0:
        for path in [scratch, *scratch.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    return scratch


def _write_inputs(directory: Path, inputs: dict[str, str | bytes | Path]) -> Path:
    """The inputs as files of `directory` (made here), readable by everyone, writable by this process's user only."""
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)  # whatever the umask
    for name, content in inputs.items():
        path = directory / name
        if isinstance(content, Path):
            shutil.copyfile(content, path)
        else:
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(0o644)
    return directory


def _kill_namespace(info: int) -> None:
    """SIGKILL the first process of the sandbox's PID namespace, named by what bwrap wrote to its --info-fd (checked
    to still be in that namespace: its pid could have been reused). The kernel kills every other process of the
    namespace before that one is gone, and bwrap exits after it."""
    os.set_blocking(info, False)
    started = json.loads(os.read(info, 4096))
    pidfd = os.pidfd_open(started["child-pid"])
    try:
        if os.stat(f"/proc/{started['child-pid']}/ns/pid").st_ino == started["pid-namespace"]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _kill_sandbox(process: subprocess.Popen, info: int | None) -> None:
    """End a run at its deadline: its PID namespace when it has one, waiting for bwrap to go; if it has not gone (or
    without a namespace), SIGKILL the process group `process` leads (not reaped yet: its id is still its own)."""
    if info is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired):
            _kill_namespace(info)
            process.wait(KILL_WAIT_S)
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _execute(command: list[str], cwd: Path | None, env: dict[str, str] | None, limits: Limits,
             info: tuple[int, int] | None = None) -> Outcome:
    """Run `command` until it exits or its deadline; `info`: the pipe bwrap writes its --info-fd to (read, write)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   start_new_session=True, pass_fds=info[1:] if info else ())
        try:
            code, deadline = process.wait(limits.deadline_s), None
        except subprocess.TimeoutExpired:
            _kill_sandbox(process, info[0] if info else None)
            code, deadline = process.wait(), limits.deadline_s
        out.seek(0)
        stdout = out.read(limits.file_bytes)
        err.seek(max(0, err.seek(0, os.SEEK_END) - STDERR_TAIL))
        return Outcome(code, stdout, err.read().decode(errors="replace"), deadline)


def run(argv: list[str], env: dict[str, str], mode: str, limits: Limits, scratch: str | Path | None = None,
        inputs: dict[str, str | bytes | Path] | None = None, checked: bool = True) -> Outcome:
    """Run `argv` in the sandbox (mode "bwrap") or directly ("none"), with its working directory `scratch` (None: a
    private one) and `inputs` in its subdirectory INPUT; relative paths work the same in both modes.

    Sandboxed, the environment is BASE_ENV + `env` (with HOME, XDG_CACHE_HOME and TMPDIR inside); unsandboxed it
    is this process's environment + `env`. `checked`=False skips the check that the sandbox starts (the probe's run).
    """
    check_mode(mode)
    if mode == "bwrap" and checked:
        _refuse_unavailable()
    with tempfile.TemporaryDirectory(prefix="oplora-sandbox-") as private:
        private = Path(private)
        if mode == "none":
            cwd = Path(scratch) if scratch is not None else private
            if inputs:
                _write_inputs(cwd / INPUT, inputs)
            return _execute(limits.prlimit(processes=False) + list(argv), cwd, {**os.environ, **env}, limits)
        input_dir = _write_inputs(private / INPUT, inputs) if inputs else None
        scratch = prepare_scratch(Path(scratch)) if scratch is not None else None
        env = {"XDG_CACHE_HOME": f"{INSIDE}/.cache", **env}
        info = os.pipe()
        try:
            return _execute(bwrap_command(argv, env, limits, scratch, input_dir, info[1]), None, None, limits, info)
        finally:
            os.close(info[0])
            os.close(info[1])


def read_output(directory: Path, name: str, max_bytes: int) -> bytes:
    """The file `name` (a relative path) under the host directory `directory`, which sandboxed code could write: read
    without following any link, refused unless it is a regular file of at most `max_bytes`."""
    parts = Path(name).parts
    where = Path(directory) / name
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise UntrustedOutput(f"{where}: not a plain relative name")
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
        inner = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = inner
    except OSError as err:
        os.close(descriptor)
        why = "is a symlink or under one (never followed)" if err.errno in (errno.ELOOP, errno.ENOTDIR) else err
        raise UntrustedOutput(f"{where}: {why}") from err
    with os.fdopen(descriptor, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedOutput(f"{where}: not a regular file")
        content = f.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise UntrustedOutput(f"{where}: larger than {max_bytes} bytes")
    return content
