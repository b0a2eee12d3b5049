"""Read what an offline W&B run recorded, straight from its `.wandb` transaction log.

The log is LevelDB's record format after a 7-byte header (":W&B", magic, version): 32 KiB blocks
of chunks [crc32c:4][length:2][type:1][data], type FULL=1 or FIRST=2 / MIDDLE=3 / LAST=4, each
record a `wandb_internal_pb2.Record`. The tests check offline runs with it, without a W&B server.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7


def records(path: str | Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, parts = HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        if (pos % BLOCK) + CHUNK_HEADER > BLOCK:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding
            pos += BLOCK - pos % BLOCK
            continue
        if pos + CHUNK_HEADER + length > len(data):  # a chunk still being written
            return
        parts.append(data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (1, 4):  # FULL or LAST ends a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_run(run_dir: str | Path, timeout: float = 60) -> dict:
    """{"name", "group", "job_type", "tags", "config", "summary", "history", "artifacts"} of one offline run
    directory; each artifact is {"name", "type", "metadata", "entries": {path: reference URI or None}}.
    wandb's service may still be writing the log when `finish()` has returned: this waits (up to `timeout`
    seconds) for the run's last record, `exit`."""
    deadline = time.monotonic() + timeout
    while not (run := parse(run_dir))["exited"] and time.monotonic() < deadline:
        time.sleep(0.2)
    return run


def parse(run_dir: str | Path) -> dict:
    (log,) = Path(run_dir).glob("*.wandb")
    run = {"config": {}, "summary": {}, "history": [], "artifacts": [], "exited": False}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        run["exited"] |= kind == "exit"
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type,
                       tags=list(record.run.tags))
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "artifact":
            a = record.artifact
            run["artifacts"].append({"name": a.name, "type": a.type, "metadata": json.loads(a.metadata or "{}"),
                                     "entries": {e.path: e.ref or None for e in a.manifest.contents}})
    return run
