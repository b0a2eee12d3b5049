"""Result tables in the paper's layout: averages, best/second marks, Markdown/LaTeX/CSV, paper numbers.

Values are percentages. A missing cell is None: it is never filled in, its row's averages are None,
it is left out of the marks, and `Table.missing()` lists it so the caller can warn. Row names, column
labels and roles come from the configs (a method's `display`, the eval group's `columns`).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Literal

from oplora.config import PAPER_DIR

Mark = Literal["best", "second"]

AVG = "Avg"
FORGET_AVG = "Forget avg"
ROLES = {"finetune": "Fine-tuning", "forget": "Forgetting", "drift": "Drift (lower is better)"}
LOWER_IS_BETTER = {"drift"}  # a drift column (the KL stage) ranks its smallest value best; no average includes it

AVERAGES = {"finetune_avg": ("finetune",), "forget_avg": ("forget",), "avg": ("finetune", "forget")}
"""The averages of a row: over its fine-tuning columns, its forgetting columns, all columns (the paper's Avg)."""


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when a value is missing (never an average of part of a row) or there is none."""
    return sum(values) / len(values) if values and None not in values else None


def averages(values: list[float | None], roles: list[str]) -> dict[str, float | None]:
    """{finetune_avg, forget_avg, avg} of one row's values (in column order, each column's role given)."""
    return {key: _mean([v for v, role in zip(values, roles, strict=True) if role in wanted])
            for key, wanted in AVERAGES.items()}


@dataclass
class Table:
    """Rows of percentages over labelled columns, each column a fine-tuning or a forgetting task."""

    columns: list[str]
    roles: list[str]
    rows: dict[str, list[float | None]]
    reference: frozenset[str] = field(default_factory=frozenset)  # rows shown but not ranked (the base model)
    spread: dict[str, list[float | None]] = field(default_factory=dict)  # row -> a ± value per column (std over seeds)

    def avg(self, row: str) -> float | None:
        """Mean of all columns (the paper's Avg); None if any cell is missing."""
        return averages(self.rows[row], self.roles)["avg"]

    def forget_avg(self, row: str) -> float | None:
        """Mean of the forgetting columns; None if any of them is missing."""
        return averages(self.rows[row], self.roles)["forget_avg"]

    def column(self, label: str) -> dict[str, float | None]:
        """Row -> value of one column; `AVG` and `FORGET_AVG` give the derived averages."""
        if label == AVG:
            return {row: self.avg(row) for row in self.rows}
        if label == FORGET_AVG:
            return {row: self.forget_avg(row) for row in self.rows}
        i = self.columns.index(label)
        return {row: values[i] for row, values in self.rows.items()}

    def missing(self) -> list[tuple[str, str]]:
        """(row, column) of every missing cell, in table order."""
        return [(row, label) for row in self.rows for label, v in self.cells(row).items() if v is None]

    def cells(self, row: str) -> dict[str, float | None]:
        """Column label -> value for one row."""
        return dict(zip(self.columns, self.rows[row], strict=True))


def build(columns: list[dict], rows: dict[str, dict[str, float | None]], reference=(),
          spread: dict[str, dict[str, float | None]] | None = None) -> Table:
    """Table from columns [{label, role}, …] and rows {name: {label: value}}; absent labels become None.

    `reference` names rows that are shown but take no part in the best/second marks (the base model);
    `spread` ({name: {label: std}}) is shown as "mean ± std" in Markdown.
    """
    labels = [c["label"] for c in columns]
    roles = [c["role"] for c in columns]
    if bad := sorted(set(roles) - set(ROLES)):
        raise ValueError(f"unknown column role(s) {bad}; expected one of {list(ROLES)}")
    for name, values in rows.items():
        if unknown := sorted(set(values) - set(labels)):
            raise ValueError(f"row {name!r} has values for unknown column(s) {unknown}; columns are {labels}")
    return Table(labels, roles, {name: [values.get(label) for label in labels] for name, values in rows.items()},
                 frozenset(reference), {name: [values.get(label) for label in labels]
                                        for name, values in (spread or {}).items()})


def marks(table: Table) -> dict[tuple[str, str], Mark]:
    """(row, column) -> "best" / "second" over the columns and `AVG`, as shown (rounded to 2 decimals).

    Best: every row equal to the column's maximum; second: every row equal to the largest value below it.
    Missing cells and the reference rows take no part; a column where every row shows the same value
    has no best (all methods at 0.00 on a too-hard task are not "best"). In a drift column the smallest is best.
    """
    out: dict[tuple[str, str], Mark] = {}
    for label in [*table.columns, AVG]:
        shown = {row: round(v, 2) for row, v in table.column(label).items()
                 if v is not None and row not in table.reference}
        lower = label in table.columns and table.roles[table.columns.index(label)] in LOWER_IS_BETTER
        ranked = sorted(set(shown.values()), reverse=not lower)
        if len(ranked) < 2:
            continue
        for mark, level in zip(("best", "second"), ranked[:2], strict=False):
            out.update({(row, label): mark for row, v in shown.items() if v == level})
    return out


def paper_table(name: str, columns: list[dict], root: Path = PAPER_DIR
                ) -> tuple[Table, dict[tuple[str, str], Mark], dict[str, float]]:
    """One of the paper's tables 2–7: (the table, the paper's own marks, the paper's printed Avg per row).

    `columns` ([{label, role}, …], the experiment's eval columns) must match the CSV's header. The CSV
    keeps the paper's marks in the cells: **x** bold (best), __x__ underlined (second best).
    """
    with open(Path(root) / f"{name}.csv", newline="", encoding="utf-8") as f:
        header, *records = list(csv.reader(f))
    expected = ["method", *(c["label"] for c in columns), AVG]
    if header != expected:
        raise ValueError(f"{name}.csv header {header} != {expected}")
    rows, paper_marks, printed = {}, {}, {}
    for method, *cells in records:
        values = {}
        for label, cell in zip(expected[1:], cells, strict=True):
            for wrap, mark in (("**", "best"), ("__", "second")):
                if len(cell) > 4 and cell.startswith(wrap) and cell.endswith(wrap):
                    paper_marks[(method, label)] = mark
                    cell = cell[2:-2]
            values[label] = float(cell)
        printed[method] = values.pop(AVG)
        rows[method] = values
    return build(columns, rows), paper_marks, printed


def _cells(table: Table, bold: str, under: str, missing: str, mark: bool, pm: bool = False) -> dict[str, list[str]]:
    """Row -> its cells (columns, then Avg) with 2 decimals (and "± spread" when `pm`); best/second put into the
    `bold`/`under` format strings."""
    found = marks(table) if mark else {}
    wrap = {"best": bold, "second": under}
    columns = {label: table.column(label) for label in [*table.columns, AVG]}
    out = {}
    for row in table.rows:
        cells = []
        spread = dict(zip(table.columns, table.spread.get(row, []), strict=False)) if pm else {}
        for label, column in columns.items():
            v = column[row]
            text = missing if v is None else f"{v:.2f}"
            text += f" ± {spread[label]:.2f}" if v is not None and spread.get(label) is not None else ""
            cells.append(wrap[found[(row, label)]].format(text) if (row, label) in found else text)
        out[row] = cells
    return out


def _groups(table: Table) -> list[tuple[str, int]]:
    """Consecutive runs of column roles: [(role, number of columns), …]."""
    return [(role, len(list(run))) for role, run in groupby(table.roles)]


def to_markdown(table: Table, title: str | None = None, mark: bool = True) -> str:
    """GitHub Markdown: a role-group header line, then labels; best **bold**, second <u>underlined</u>, missing —.

    `mark=False` leaves every cell plain (e.g. for a `difference` table); a table with a `spread` shows mean ± std.
    """
    group_line = [""]
    for role, n in _groups(table):
        group_line += [ROLES[role]] + [""] * (n - 1)
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join([*group_line, ""]) + " |",
              "|" + "|".join([":--", *["--:"] * (len(table.columns) + 1)]) + "|",
              "| " + " | ".join(["Method", *table.columns, AVG]) + " |"]
    for row, cells in _cells(table, "**{}**", "<u>{}</u>", "—", mark, pm=True).items():
        lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return re.sub(r"([&%_#$])", r"\\\1", text)


def to_latex(table: Table, caption: str | None = None, mark: bool = True) -> str:
    """booktabs tabular with Fine-tuning/Forgetting column groups; \\textbf best, \\underline second, --- missing.

    A caption wraps it in a table environment; `mark=False` leaves every cell plain.
    """
    n = len(table.columns)
    head, rules, start = [""], [], 2
    for role, width in _groups(table):
        head.append(rf"\multicolumn{{{width}}}{{c}}{{{ROLES[role]}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    lines = [r"\begin{tabular}{l" + "r" * (n + 1) + "}", r"\toprule",
             " & ".join([*head, ""]) + r" \\", "".join(rules),
             " & ".join(["Method", *map(_tex, table.columns), AVG]) + r" \\", r"\midrule"]
    for row, cells in _cells(table, r"\textbf{{{}}}", r"\underline{{{}}}", "---", mark).items():
        lines.append(" & ".join([_tex(row), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}[t]", r"\centering", *lines, rf"\caption{{{_tex(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Plain numbers (no marks, no rounding beyond 6 decimals), empty cells for missing, plus Avg and Forget avg."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", *table.columns, AVG, FORGET_AVG])
    for row, values in table.rows.items():
        cells = [*values, table.avg(row), table.forget_avg(row)]
        writer.writerow([row, *("" if v is None else repr(round(v, 6)) for v in cells)])
    return out.getvalue()


def difference(ours: Table, paper: Table) -> Table:
    """ours − paper over the rows and columns both have (in `ours`' order); None where either is missing."""
    shared = [label for label in ours.columns if label in paper.columns]
    roles = [ours.roles[ours.columns.index(label)] for label in shared]
    rows = {}
    for row in (r for r in ours.rows if r in paper.rows):
        mine, theirs = ours.cells(row), paper.cells(row)
        rows[row] = [None if mine[c] is None or theirs[c] is None else mine[c] - theirs[c] for c in shared]
    return Table(shared, roles, rows, ours.reference)
