"""Instruction data: hub ids or local json/jsonl, the Alpaca prompt, prompt tokens masked from the loss.

A record becomes `PROMPT.format(query=…)` followed by the response, a newline and EOS, tokenized as one text;
labels are -100 on as many leading tokens as the prompt alone tokenizes to, so that only the response is learned
(PiSSA's train.py: `preprocess` and `train_tokenize_function`, which MiLoRA and LoRA-Null reuse). Tokenizing the
response apart would start it with a word-start token (SentencePiece's "▁") that the joint text does not have.
Which record fields fill the query and the response is a format string in the data config; `filter` keeps the
records whose fields equal the given values (CodeFeedback's Python subset: `{lang: python}`). Tokenized datasets
are cached on disk by a hash of everything that shapes the tokens: data, settings, the prompt, the tokenizer's
content and this module's encoding code; a cache file that is unreadable or short of examples is named and rebuilt.
"""

from __future__ import annotations

import codecs
import inspect
import logging
import string
from pathlib import Path

import datasets
import pyarrow
from filelock import FileLock

from oplora.cache import Cache
from oplora.io import content_digest, content_hash
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


def load_records(path: str, cache: Cache, split: str = "train", limit: int | None = None,
                 wanted: dict | None = None) -> datasets.Dataset:
    """A hub dataset id, a local .json/.jsonl file or the demo's `oplora:demo-train`; the records matching `wanted`
    (`select`), of which `limit` keeps the first. `cache` holds datasets' cache of a local file."""
    check_limit(limit)
    local = local_file(path)
    if local:
        check_text_file(local)
        try:  # datasets' own cache keys a local file on its mtime: key it on the content instead
            records = datasets.load_dataset("json", data_files={split: str(local)}, split=split,
                                            cache_dir=str(cache.datasets / content_key(path)[:16]))
        except Exception as err:  # datasets wraps parser errors in several types
            raise ValueError(f"data file {local} is not valid json/jsonl: {err}") from err
    else:
        records = datasets.load_dataset(path, split=split)
    if len(records) == 0:
        raise ValueError(f"data {path} ({split}) is empty")
    records = select(records, path, wanted)
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


def select(records: datasets.Dataset, path: str, wanted: dict | None) -> datasets.Dataset:
    """The records whose fields equal `wanted` ({field: value}; None keeps all); an empty selection is an error."""
    if not wanted:
        return records
    check_fields(records, path, *(f"{{{field}}}" for field in wanted))
    kept = records.filter(lambda record: all(record[f] == v for f, v in wanted.items()), desc="data.filter")
    if len(kept) == 0:
        found = {f: sorted(set(records[f]))[:20] for f in wanted}
        raise ValueError(f"data {path}: no record matches data.filter={wanted}; the values found are {found}")
    log.info("data %s: %d of %d records match data.filter=%s", path, len(kept), len(records), wanted)
    return kept


def encode(record: dict, tokenizer, query: str, response: str, max_length: int) -> dict:
    """Prompt + response + "\\n" + EOS tokenized together, the prompt's own token count masked (PiSSA's train.py)."""
    prompt = PROMPT.format(query=query.format(**record))
    ids = tokenizer(prompt + response.format(**record) + "\n" + tokenizer.eos_token).input_ids
    n_prompt = len(tokenizer(prompt).input_ids)
    labels = ([IGNORE] * n_prompt + ids[n_prompt:])[:max_length]
    return {"input_ids": ids[:max_length], "labels": labels, "truncated": len(ids) > max_length,
            "learns": any(t != IGNORE for t in labels)}


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's content (vocabulary, merges, normalisation, special tokens and what it adds to a text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return content_hash([type(tokenizer).__name__, tokenizer.special_tokens_map,
                         backend.to_str() if backend else sorted(tokenizer.get_vocab().items())])


def read_cache(cache: Path, records: int) -> datasets.Dataset | None:
    """The tokenized examples cached in `cache`, or None when there is none; a damaged file (unreadable, or not one
    example per record) is named in a warning and removed, to be rebuilt."""
    if not cache.exists():
        return None
    try:
        encoded = datasets.Dataset.from_file(str(cache))
        if len(encoded) == records:
            return encoded
        problem = f"{len(encoded)} examples for {records} records"
    except (OSError, pyarrow.ArrowException) as err:
        problem = f"{type(err).__name__}: {err}"
    log.warning("tokenized data cache %s is damaged (%s): rebuilding it", cache, problem)
    cache.unlink()
    return None


def tokenized(cfg, tokenizer, cache: Cache) -> datasets.Dataset:
    """The training set of a data config, tokenized (cached), with fully masked examples dropped."""
    wanted = dict(cfg.get("filter") or {})
    records = load_records(cfg.path, cache, cfg.split, cfg.limit, wanted)
    check_fields(records, cfg.path, cfg.query, cfg.response)
    key = content_hash([cfg.path, cfg.split, wanted, cfg.limit, cfg.query, cfg.response, cfg.max_length, PROMPT,
                        tokenizer_digest(tokenizer), inspect.getsource(encode),
                        content_key(cfg.path) or records._fingerprint])
    path = cache.data / f"{cfg.name}-{key[:16]}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # concurrent cells (SLURM array tasks) share the cache
        encoded = read_cache(path, len(records))
        if encoded is None:
            encoded = records.map(encode, fn_kwargs=dict(tokenizer=tokenizer, query=cfg.query, response=cfg.response,
                                                         max_length=cfg.max_length),
                                  remove_columns=records.column_names, cache_file_name=str(path), desc="tokenize")
    kept = encoded.filter(lambda learns: learns, input_columns="learns", batched=True, keep_in_memory=True)
    truncated, dropped = sum(encoded["truncated"]), len(encoded) - len(kept)
    log.info("data %s: %d examples, %d truncated to %d tokens, %d dropped (prompt fills max_length)",
             cfg.path, len(kept), truncated, cfg.max_length, dropped)
    if len(kept) == 0:
        raise ValueError(f"data {cfg.path}: every example's labels are masked (the prompt fills "
                         f"max_length={cfg.max_length}); raise data.max_length")
    return kept.remove_columns(["truncated", "learns"])
