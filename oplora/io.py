"""Files: content hashes and atomic writes (a reader never sees a half-written file)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import xxhash
from filelock import FileLock


def content_hash(content) -> str:
    """sha256 of JSON-serialisable content (keys sorted): the hash of configs, settings and result keys."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def tensor_checksums(tensors: dict) -> dict[str, str]:
    """{name: xxh3-128 of the tensor's bytes}: stored with cached tensors and verified on every read."""
    import torch

    return {name: xxhash.xxh3_128_hexdigest(t.detach().contiguous().cpu().view(torch.uint8).numpy())
            for name, t in sorted(tensors.items())}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CorruptFile(ValueError):
    """A result or record file that exists but cannot be read (a truncated or edited JSON file)."""


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it does not exist; invalid JSON raises CorruptFile naming the file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path} is not valid JSON ({err}): delete it to recompute it") from err


def content_digest(path: str | Path) -> str:
    """xxh3-128 of a file's bytes, or of every file under a directory (names and bytes): cheap enough for
    multi-GB data files, and it changes when the content does, whatever the size and mtime."""
    path = Path(path)
    digest = xxhash.xxh3_128()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def temporary_sibling(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (`.NAME.tmpPID`, next to it)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def out_of_space(err: BaseException) -> bool:
    """Whether an error is a full disk: OSError ENOSPC, or the bare Exception that Rust libraries (tokenizers,
    safetensors) raise for it ("No space left on device (os error 28)")."""
    return getattr(err, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(err)


def no_space_error(target: Path, err: BaseException) -> OSError:
    return OSError(errno.ENOSPC, f"no space left on the device while writing {target}: free space on that file system "
                                 f"(df -h {target.parent}) or write elsewhere, then rerun ({err})")


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling path to write; it replaces `path` when the block succeeds. A full disk is reported
    as an OSError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        if out_of_space(err):
            raise no_space_error(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling directory that replaces `target` when the block succeeds. A full disk is reported
    as an OSError naming `target`."""
    target = Path(target)
    tmp = temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(err):
            raise no_space_error(target, err) from err
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


TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)(\d+)$")  # what atomic_file / atomic_dir leave behind when killed


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporary siblings (`.NAME.tmpPID`, `.NAME.oldPID`) of writers that no longer run."""
    removed = []
    for path in Path(directory).glob(".*"):
        match = TEMPORARY.match(path.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
