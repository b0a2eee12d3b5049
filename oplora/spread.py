"""The spread over seeds: per method and column the mean, standard deviation, standard error and n; long format.

A long row is one cell × column: {experiment, model, data, method, label, seed, column, role, value}, where
method is the config label (`oplora16`), label the paper's name (`OPLoRA-16`), role `finetune`, `forget`,
`average` (finetune_avg, forget_avg, avg) or `rho` (rho/k<k>), and value None when the result is missing.
"""

from __future__ import annotations

import csv
import io
import math
from statistics import mean, stdev

LONG_COLUMNS = ("experiment", "model", "data", "method", "label", "seed", "column", "role", "value")


def stats(seeds: dict[int, float | None]) -> dict:
    """mean, std (sample, n − 1), stderr = std/√n over the seeds; mean None when a seed is missing, std with n < 2."""
    values = list(seeds.values())
    complete = bool(values) and None not in values
    std = stdev(values) if complete and len(values) > 1 else None
    return {"mean": mean(values) if complete else None, "std": std,
            "stderr": std / math.sqrt(len(values)) if std is not None else None,
            "n": sum(v is not None for v in values), "seeds": seeds}


def summarize(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{label: {column: stats}} of long rows, methods and columns in the order they first appear."""
    grouped: dict[str, dict[str, dict[int, float | None]]] = {}
    for row in rows:
        grouped.setdefault(row["label"], {}).setdefault(row["column"], {})[row["seed"]] = row["value"]
    return {label: {column: stats(seeds) for column, seeds in columns.items()} for label, columns in grouped.items()}


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LONG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
