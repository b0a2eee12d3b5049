"""A fake Hugging Face Hub for tests: a local HTTP server that `huggingface_hub` and `datasets` reach through
`HF_ENDPOINT`, so that snapshot_download, hf_hub_download, HfFileSystem and load_dataset run unchanged against it
and fill the normal HF caches (which later serve the same calls with HF_HUB_OFFLINE=1).

Endpoints (revision: "main" or the repo's sha, URL-quoted or not; `kind`: models or datasets):
- GET  /api/{kind}/{repo}[/revision/{rev}]           repo info: id, sha, siblings, gated, private
- GET  /api/{kind}/{repo}/tree/{rev}[/{path}]        tree listing (`recursive`, `expand`: adds lastCommit), one page
- POST /api/{kind}/{repo}/paths-info/{rev}           form fields `paths` (repeated) and `expand`
- HEAD|GET /{repo}/resolve/{rev}/{path}, /datasets/{repo}/resolve/{rev}/{path}
                                                     X-Repo-Commit, ETag, Content-Length; GET honours `Range`
Files matching the hub's default LFS patterns (*.safetensors, *.bin, *.parquet, ...) are LFS files (sha256 etag,
`lfs` in listings), the others plain git blobs (git sha1). There are no Xet headers, so clients download over HTTP.
Errors carry the hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo): a gated repo
answers 401 GatedRepo to a request without `Authorization: Bearer …` and serves any bearer token. Every request
the server cannot answer is logged (logger `fakehub`) and answered 404.

The clients read HF_ENDPOINT and the offline flags at import: run them in a subprocess with `hub_env(...)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("fakehub")
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf",
                "*.model", "*.parquet", "*.arrow", "*.zip", "*.gz", "*.tar")
DATE = "2024-01-01T00:00:00.000Z"


@dataclass
class Repo:
    """A repository at one commit: `files` maps repo paths to contents (bytes or a local file)."""

    kind: str  # "model" | "dataset"
    repo_id: str
    files: dict[str, bytes | Path]
    gated: bool = False
    sha: str = field(init=False)

    def __post_init__(self):
        if self.kind not in ("model", "dataset"):
            raise ValueError(f"repo kind must be model or dataset, not {self.kind!r}")
        self.files = {path: data if isinstance(data, bytes) else Path(data).read_bytes()
                      for path, data in sorted(self.files.items())}
        digest = hashlib.sha1(f"{self.kind}:{self.repo_id}".encode())
        for path, data in self.files.items():
            digest.update(f"\0{path}\0{hashlib.sha256(data).hexdigest()}".encode())
        self.sha = digest.hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return any(fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in LFS_PATTERNS)

    def git_blob(self, path: str) -> bytes:
        """What git stores for `path`: its content, or for an LFS file the pointer to it."""
        data = self.files[path]
        if not self.is_lfs(path):
            return data
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.etag(path)}\nsize {len(data)}\n".encode()

    def blob_oid(self, path: str) -> str:
        blob = self.git_blob(path)
        return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()

    def etag(self, path: str) -> str:
        """The hub's ETag: the sha256 of an LFS file, else the git blob id."""
        return hashlib.sha256(self.files[path]).hexdigest() if self.is_lfs(path) else self.blob_oid(path)

    def folders(self) -> set[str]:
        return {path.rsplit("/", i)[0] for path in self.files for i in range(1, path.count("/") + 1)}

    def entry(self, path: str, expand: bool) -> dict:
        """One tree / paths-info entry, as the hub lists it."""
        if path in self.files:
            size = len(self.files[path])
            item = {"type": "file", "path": path, "size": size, "oid": self.blob_oid(path)}
            if self.is_lfs(path):
                item["lfs"] = {"oid": self.etag(path), "size": size, "pointerSize": len(self.git_blob(path))}
        else:
            item = {"type": "directory", "path": path, "size": 0,
                    "oid": hashlib.sha1(f"tree {self.sha} {path}".encode()).hexdigest()}
        if expand:
            item["lastCommit"] = {"id": self.sha, "title": "Upload", "date": DATE}
        return item

    def tree(self, folder: str, recursive: bool, expand: bool) -> list[dict] | None:
        """Entries under `folder` ("" for the root); None when it is no folder of the repo."""
        if folder and folder not in self.folders():
            return None
        prefix = f"{folder}/" if folder else ""
        paths = {p for p in (*self.folders(), *self.files) if p.startswith(prefix)}
        if not recursive:
            paths = {p for p in paths if "/" not in p[len(prefix):]}
        return [self.entry(p, expand) for p in sorted(paths)]

    def info(self) -> dict:
        return {"id": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.sha, "private": False,
                "gated": "manual" if self.gated else False, "disabled": False, "lastModified": DATE, "tags": [],
                "siblings": [{"rfilename": path} for path in self.files]}


API = re.compile(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?")
RESOLVE = re.compile(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    repos: dict[tuple[str, str], Repo]  # (kind, repo_id) → repo; set on the subclass `serve` makes

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self):
        self.answer(body=True)

    def do_HEAD(self):
        self.answer(body=False)

    def do_POST(self):
        self.answer(body=True)

    def answer(self, body: bool):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            query.update(parse_qs(self.rfile.read(length).decode()))
        try:
            if api := API.fullmatch(url.path):
                self.api(api, query)
            elif resolve := RESOLVE.fullmatch(url.path):
                self.resolve(resolve, body)
            else:
                raise HubError(404, "", "Sorry, we can't find the page you are looking for.")
        except HubError as err:
            if err.status == 404 and not err.code:  # an endpoint or path this fake hub does not know
                log.warning("fakehub cannot answer %s %s", self.command, self.path)
            headers = {"X-Error-Message": str(err), **({"X-Error-Code": err.code} if err.code else {}),
                       **({"X-Repo-Commit": err.commit} if err.commit else {})}
            self.send(err.status, json.dumps({"error": str(err)}).encode(), "application/json", headers, body)

    def repo(self, kind: str, repo_id: str, rev: str) -> Repo:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        if repo.gated and not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "GatedRepo", f"Access to {kind} {repo_id} is restricted. You must have access to it "
                                             "and be authenticated to access it. Please log in.")
        if unquote(rev) not in ("main", repo.sha):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
        return repo

    def api(self, match: re.Match, query: dict):
        kind, repo_id, endpoint, rev, path = match.groups()
        repo = self.repo(kind[:-1], repo_id, rev or "main")
        expand = query.get("expand", ["false"])[0].lower() == "true"
        if endpoint in (None, "revision"):
            if path:
                raise HubError(404, "", "unknown revision sub-path")
            result = repo.info()
        elif endpoint == "tree":
            result = repo.tree(unquote(path or "").strip("/"), query.get("recursive", ["false"])[0].lower() == "true",
                               expand)
            if result is None:
                raise HubError(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", repo.sha)
        elif endpoint == "paths-info" and self.command == "POST":
            paths = [p.strip("/") for p in query.get("paths", [])]
            result = [repo.entry(p, expand) for p in paths if p in repo.files or p in repo.folders()]
        else:
            raise HubError(404, "", "unknown endpoint")
        self.send(200, json.dumps(result).encode(), "application/json", {"X-Repo-Commit": repo.sha})

    def resolve(self, match: re.Match, body: bool):
        datasets, repo_id, rev, path = match.groups()
        repo = self.repo("dataset" if datasets else "model", repo_id, rev)
        path = unquote(path)
        if path not in repo.files:
            raise HubError(404, "EntryNotFound", "Entry not found", repo.sha)
        data, status = repo.files[path], 200
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(path)}"', "Accept-Ranges": "bytes"}
        if repo.is_lfs(path):
            headers.update({"X-Linked-Etag": headers["ETag"], "X-Linked-Size": str(len(data))})
        if ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start, end = int(ranged[1]), int(ranged[2] or len(data) - 1)
            if start >= len(data):
                raise HubError(416, "", "Range Not Satisfiable")
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start:end + 1], 206
        self.send(status, data, "application/octet-stream", headers, body)

    def send(self, status: int, data: bytes, content_type: str, headers: dict, body: bool = True):
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@contextlib.contextmanager
def serve(repos: list[Repo]):
    """Serve `repos` on 127.0.0.1 (a free port) in a daemon thread; yields the endpoint URL."""
    handler = type("RepoHandler", (Handler,), {"repos": {(r.kind, r.repo_id): r for r in repos}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fakehub", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def hub_env(hf_home: Path, endpoint: str | None = None, token: str | None = "fake") -> dict[str, str]:
    """The environment of a subprocess that uses the HF caches under `hf_home`: online against `endpoint`, or offline
    (endpoint None). Other HF_* variables (a user's token, cache paths, offline flags) are dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(hf_home)
    if endpoint:
        env.update({"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"})
    else:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if token:
        env["HF_TOKEN"] = token
    return env
