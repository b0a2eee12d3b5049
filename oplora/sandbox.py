"""Run model-generated code in a bubblewrap sandbox: no network, read-only system, one writable scratch directory.

`run(argv, scratch, env, mode)` runs `argv` with `scratch` as its working directory. With mode "bwrap" the process
sees only the system directories (/usr, /etc and the merged-usr links), the Python installation it needs and any
`read_only` paths, all read-only; `scratch` (bound at /scratch) is the only writable place besides a private /tmp
and /dev/shm; it has its own network (none), PID, IPC and UTS namespaces, a cleared environment (PATH, HOME, LANG
and `env` only), a new session (no terminal injection), and it dies with its parent. It runs as uid/gid 65534
(nobody): invoked as root, bwrap sets the namespaces up and `setpriv` drops to 65534 with no capabilities and no
supplementary groups, so root-only files stay unreadable; invoked as another user, an unprivileged user namespace
maps 65534 onto that user, who keeps only their own rights on the read-only binds.

Mode "none" runs `argv` directly, with this process's uid, files, network and environment: it is only taken when
asked for explicitly (`eval.sandbox=none`) and logs a warning every time.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
MODES = ("bwrap", "none")
NOBODY = 65534
INSIDE = "/scratch"
SYSTEM_DIRS = ("/usr", "/etc")
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": INSIDE, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1"}
INSTALL_HINT = ("install bubblewrap (`apt-get install bubblewrap`, which `make install` does as root), or accept "
                "running model-generated code with your own uid, files, network and environment: eval.sandbox=none")


class SandboxUnavailable(RuntimeError):
    pass


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


def bwrap_command(argv: list[str], scratch: Path, env: dict[str, str], read_only: list[str] = ()) -> list[str]:
    """The bwrap command line that runs `argv` (cwd /scratch) in the sandbox described in the module docstring."""
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv"]
    root = os.geteuid() == 0
    if not root:  # an unprivileged user namespace; 65534 inside is the invoking user outside
        args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    binds: list[str] = []
    for link in MERGED_USR_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            binds.append(link)
    for path in [*SYSTEM_DIRS, *python_paths(), *map(str, read_only)]:
        path = os.path.realpath(path)
        if os.path.exists(path) and not _covered(path, binds):
            binds = [b for b in binds if not _covered(b, [path])] + [path]
    args += ["--perms", "1777", "--tmpfs", "/tmp"]  # first: a venv or checkout under /tmp is bound on top of it
    made: set[str] = set()
    for path in sorted(binds):
        for parent in reversed(Path(path).parents[:-1]):  # bwrap would create them 0700, closed to uid 65534
            if str(parent) not in made and not _covered(str(parent), binds):
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += ["--ro-bind", path, path]
    args += ["--bind", str(scratch), INSIDE, "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--tmpfs", "/dev/shm", "--chdir", INSIDE]
    for key, value in {**BASE_ENV, **env}.items():
        args += ["--setenv", key, value]
    if root:  # drop to nobody inside: no capabilities, no groups, cannot regain them
        args += ["--", "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                 "--bounding-set=-all", "--"]
    else:
        args += ["--"]
    return args + list(argv)


@functools.cache
def _probe() -> str | None:
    """None when the sandbox starts here, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap (bubblewrap) is not installed"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as scratch:
        probe = subprocess.run(bwrap_command(["/bin/sh", "-c", "true"], Path(scratch), {}), capture_output=True,
                               text=True)
    if probe.returncode != 0:
        return f"bwrap cannot start a sandbox here: {probe.stderr.strip() or probe.returncode}"
    return None


def require(mode: str) -> None:
    """Refuse to go on when `mode` is "bwrap" and the sandbox cannot start; warn loudly for "none"."""
    check_mode(mode)
    if mode == "none":
        log.warning("eval.sandbox=none: model-generated code runs UNSANDBOXED with uid %d, this machine's files and "
                    "network and the full environment (tokens included)", os.geteuid())
        return
    reason = _probe()
    if reason:
        raise SandboxUnavailable(f"refusing to run model-generated code without a sandbox: {reason}. Fix: "
                                 f"{INSTALL_HINT}")


def prepare_scratch(scratch: Path) -> Path:
    """Make `scratch` (and what it holds) writable by the sandbox's uid."""
    if os.geteuid() == 0:
        for path in [scratch, *scratch.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    return scratch


def run(argv: list[str], scratch: str | Path, env: dict[str, str], mode: str, read_only: list[str] = (),
        **kwargs) -> subprocess.CompletedProcess:
    """Run `argv` in `scratch` (paths relative to it work in both modes), sandboxed unless mode is "none".

    Sandboxed, the environment is BASE_ENV + `env` (with HOME, XDG_CACHE_HOME and TMPDIR inside); unsandboxed it
    is this process's environment + `env`.
    """
    require(mode)
    scratch = Path(scratch)
    if mode == "none":
        return subprocess.run(argv, cwd=scratch, env={**os.environ, **env}, **kwargs)
    env = {"XDG_CACHE_HOME": f"{INSIDE}/.cache", **env}
    return subprocess.run(bwrap_command(argv, prepare_scratch(scratch), env, read_only), **kwargs)
