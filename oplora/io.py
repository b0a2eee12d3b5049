"""Files: the cache root, content hashes, and atomic writes (a reader never sees a half-written file)."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    """SVD cache, converted models, tokenized data, demo data: $OPLORA_CACHE or ~/.cache/oplora."""
    return Path(os.environ.get("OPLORA_CACHE", Path.home() / ".cache" / "oplora"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_sibling(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (`.NAME.tmpPID`, next to it)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling path to write; it replaces `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling directory that replaces `target` when the block succeeds."""
    target = Path(target)
    tmp = temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def build_once(target: Path, make, done: str) -> Path:
    """A directory built once by `make(tmp_dir)` and renamed into place; `target/done` marks it built.

    Concurrent callers (other processes, SLURM array tasks) wait for the first one under a file lock.
    """
    if (target / done).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / done).exists():
            with atomic_dir(target) as tmp:
                make(tmp)
    return target
