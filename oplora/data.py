"""Instruction data: hub ids or local json/jsonl, the Alpaca prompt, prompt tokens masked from the loss.

A record becomes `PROMPT.format(query=…)` followed by the response and EOS; labels are -100 on the
prompt so that only the response is learned (as PiSSA, MiLoRA and LoRA-Null train). Which record
fields fill the query and the response is a format string in the data config. Tokenized datasets
are cached on disk by a hash of everything that decides their content.
"""

from __future__ import annotations

import codecs
import logging
import string
from pathlib import Path

import datasets
from filelock import FileLock

from oplora.io import cache_root, content_digest, content_hash
from oplora.prompt import PROMPT
from oplora.resources import resolve

log = logging.getLogger(__name__)

IGNORE = -100


def check_limit(limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"data.limit={limit!r} must be a positive integer (the first N records) or null (all)")


def check_text_file(path: Path) -> None:
    """Refuse an empty or non-UTF-8 file, naming it, the offending byte offset and the fix."""
    decoder, offset, content = codecs.getincrementaldecoder("utf-8")(), 0, False
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                content |= bool(decoder.decode(chunk).strip())
            except UnicodeDecodeError as err:
                raise ValueError(f"data file {path} is not UTF-8 (byte 0x{chunk[err.start]:02x} at offset "
                                 f"{offset + err.start}): convert it, e.g. iconv -f latin1 -t utf-8") from err
            offset += len(chunk)
    if not content:
        raise ValueError(f"data file {path} is empty: data.path must name a json/jsonl file with records")


def local_file(path: str) -> Path | None:
    """The local .json/.jsonl file a data path names (a path or an `oplora:` resource); None for a hub id."""
    local = Path(resolve(path))
    if local.suffix not in (".json", ".jsonl"):
        return None
    if not local.is_file():
        raise FileNotFoundError(f"data file {local} does not exist (data.path={path})")
    return local


def content_key(path: str) -> str | None:
    """The content digest of a local data file (None for a hub id): training and its caches key on it, so a
    file changed in place, even with the same size and mtime, is never served from an old cache."""
    local = local_file(path)
    return content_digest(local) if local else None


def load_records(path: str, split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """A hub dataset id, a local .json/.jsonl file or the demo's `oplora:demo-train`; `limit` keeps the first rows."""
    check_limit(limit)
    local = local_file(path)
    if local:
        check_text_file(local)
        try:  # datasets' own cache keys a local file on its mtime: key it on the content instead
            records = datasets.load_dataset("json", data_files={split: str(local)}, split=split,
                                            cache_dir=str(cache_root() / "datasets" / content_key(path)[:16]))
        except Exception as err:  # datasets wraps parser errors in several types
            raise ValueError(f"data file {local} is not valid json/jsonl: {err}") from err
    else:
        records = datasets.load_dataset(path, split=split)
    if len(records) == 0:
        raise ValueError(f"data {path} ({split}) is empty")
    if limit:
        records = records.select(range(min(limit, len(records))))
    return records


def fields_of(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_fields(records: datasets.Dataset, path: str, *templates: str) -> None:
    """Every field the templates use exists, and no record leaves it null or missing (it would train on "None")."""
    used = sorted({f for t in templates for f in fields_of(t)})
    missing = [f for f in used if f not in records.column_names]
    if missing:
        raise ValueError(f"data {path} has no field(s) {missing}; its fields are {records.column_names}")
    for field in used:
        index = next((i for i, value in enumerate(records[field]) if value is None), None)
        if index is not None:
            raise ValueError(f"data {path}: record {index} (0-based) has no value for field {field!r} (null or "
                             "missing); fix or drop that record")


def encode(record: dict, tokenizer, query: str, response: str, max_length: int) -> dict:
    prompt = PROMPT.format(query=query.format(**record))
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response.format(**record), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": len(prompt_ids) + len(response_ids) > max_length}


def tokenized(cfg, tokenizer, cache_dir: Path) -> datasets.Dataset:
    """The training set of a data config, tokenized (cached), with fully masked examples dropped."""
    records = load_records(cfg.path, cfg.split, cfg.limit)
    check_fields(records, cfg.path, cfg.query, cfg.response)
    key = content_hash([cfg.path, cfg.split, cfg.limit, cfg.query, cfg.response, cfg.max_length, PROMPT,
                        tokenizer.name_or_path, len(tokenizer), content_key(cfg.path) or records._fingerprint])
    cache = cache_dir / "data" / f"{cfg.name}-{key[:16]}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):  # concurrent cells (SLURM array tasks) share the cache
        encoded = records.map(encode, fn_kwargs=dict(tokenizer=tokenizer, query=cfg.query, response=cfg.response,
                                                     max_length=cfg.max_length),
                              remove_columns=records.column_names, cache_file_name=str(cache), desc="tokenize")
        kept = encoded.filter(lambda labels: any(t != IGNORE for t in labels), input_columns="labels",
                              cache_file_name=str(cache.with_suffix(".kept.arrow")), desc="drop fully masked")
    truncated, dropped = sum(encoded["truncated"]), len(encoded) - len(kept)
    log.info("data %s: %d examples, %d truncated to %d tokens, %d dropped (prompt fills max_length)",
             cfg.path, len(kept), truncated, cfg.max_length, dropped)
    if len(kept) == 0:
        raise ValueError(f"data {cfg.path}: every example's labels are masked (the prompt fills "
                         f"max_length={cfg.max_length}); raise data.max_length")
    return kept.remove_columns("truncated")
