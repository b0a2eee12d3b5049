"""PROTOCOL.md: every setting of the paper's tables, its value and its source, generated from the configs.

A setting's source is a trailing comment on its line in the config file that sets it, `# paper: …` (the paper's
text), `# reference: …` (a reference repository's file) or `# ours: …` (our choice, and why); on a `- override
/group: choice` line of an experiment it is the source of that choice, and on a `- {label: X, …}` column line, of
that column. Values come from the composed config of each experiment, so the file cannot drift from what runs:
`python -m oplora.protocol` rewrites it and the tests check it is current.

    python -m oplora.protocol [--out PROTOCOL.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from oplora.config import CONFIG_DIR
from oplora.io import atomic_write_text
from oplora.methods.base import IDENTITY, shared_config

EXPERIMENTS = ("table2", "table3", "table4", "table5", "table6", "table7")
SOURCE = re.compile(r"\s#\s*(?P<kind>paper|reference|ours):\s*(?P<text>.+)$")
KEY = re.compile(r"^(?P<indent> *)(?:- override /(?P<group>[\w-]+)|(?P<key>[\w-]+)):")
COLUMN = re.compile(r"^ *- \{label: (?P<label>[^,]+),")
# names, and how a run is organised rather than what it computes
NOT_SETTINGS = {*IDENTITY, "sandbox", "eval.lm_eval.include_path",
                "model.trust_remote_code", "calibration.field", "data.split", "eval.lm_eval.allow_code_execution",
                "eval.lm_eval.batch_size", "eval.lm_eval.cpu_batch_size", "eval.math.batch_size", "train.save_steps",
                "train.save_total_limit", "train.logging_steps"}
SHARED_TOP_LEVEL = ("svd_mode", *shared_config())  # listed once, not under each method that reads them


def sources(path: Path, prefix: str = "") -> dict[str, str]:
    """{dotted setting: "kind: text"} of the source comments in one YAML file (block mappings, as our configs are)."""
    found, parents = {}, []  # parents: [(indent, key)]
    for line in path.read_text(encoding="utf-8").splitlines():
        match = KEY.match(line)
        if match is None:
            column, source = COLUMN.match(line), SOURCE.search(line)
            if column and source and parents and parents[-1][1] == "columns":
                found[f"{prefix}columns.{column['label'].strip()}"] = f"{source['kind']}: {source['text']}"
            continue
        indent = len(match["indent"])
        parents = [(i, k) for i, k in parents if i < indent]
        key = match["group"] or match["key"]
        parents.append((indent, key))
        source = SOURCE.search(line)
        if source:
            dotted = key if match["group"] else prefix + ".".join(k for _, k in parents)
            found[dotted] = f"{source['kind']}: {source['text']}"
    return found


def compose(experiment: str, method: str | None = None) -> tuple[DictConfig, dict[str, str]]:
    """The experiment's config and its group choices."""
    overrides = [f"experiment={experiment}"] + ([f"method={method}"] if method else [])
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def config_sources(choices: dict[str, str], experiment: str) -> dict[str, str]:
    """The source comments of every file the experiment's config is composed from."""
    root = Path(CONFIG_DIR)
    found = sources(root / "train.yaml")
    for group in ("model", "data", "train", "deepspeed"):
        found |= sources(root / group / f"{choices[group]}.yaml", f"{group}.")
    found |= sources(root / "eval" / "_stages.yaml", "eval.") | sources(root / "eval" / f"{choices['eval']}.yaml",
                                                                       "eval.")
    return found | sources(root / "experiment" / f"{experiment}.yaml")


def source_of(found: dict[str, str], key: str) -> str:
    """The source comment of a setting, or of the nearest enclosing setting below a group (a flow mapping's line,
    e.g. `filter: {lang: python}`); "—" if none."""
    parts = key.split(".")
    candidates = [key, *(".".join(parts[:i]) for i in range(len(parts) - 1, 1, -1))]
    return next((found[p] for p in candidates if p in found), "—")


def leaves(node, path: str) -> dict[str, object]:
    """{dotted path: value} of a config subtree's settings."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() if not {key, f"{path}.{key}"} & NOT_SETTINGS
                for k, v in leaves(child, f"{path}.{key}").items()}
    return {path: node}


def show(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|")


def table_rows(experiment: str) -> list[tuple[str, str, str]]:
    """(setting, value, source) of one experiment: group choices, model, data, training, evaluation, SVD."""
    cfg, choices = compose(experiment)
    found = config_sources(choices, experiment)
    plain = OmegaConf.to_container(cfg, resolve=True)
    stages = {c["stage"] for c in plain["eval"]["columns"]}
    values = {group: choices[group] for group in ("model", "data", "train", "eval")}
    for part in ("model", "data", "train"):
        values |= leaves(plain[part], part)
    values |= {f"eval.columns.{c['label']}": f"{c['stage']} {c['task']}{'/' + c['metric'] if c.get('metric') else ''}"
                                               f" ({c['role']})" for c in plain["eval"]["columns"]}
    values |= {f"eval.{key}": plain["eval"][key] for key in ("limit", "merge")}
    for stage in sorted(stages):
        values |= leaves(plain["eval"][stage], f"eval.{stage}")
    values["deepspeed"] = choices["deepspeed"]
    for key in SHARED_TOP_LEVEL:
        values |= leaves(plain[key], key)
    return [(key, show(value), show(source_of(found, key))) for key, value in values.items()]


def method_rows() -> list[tuple[str, str, str]]:
    """(setting, value, source) of every method's own options (the same in every table)."""
    cfg, choices = compose(EXPERIMENTS[0])
    rows = []
    for method in cfg.pipeline.methods:
        found = sources(Path(CONFIG_DIR) / "method" / f"{method}.yaml", f"{method}.")
        options = leaves(OmegaConf.to_container(compose(EXPERIMENTS[0], method)[0].method, resolve=False), method)
        rows += [(key, show(value), show(source_of(found, key))) for key, value in options.items()
                 if key.split(".", 1)[1] not in shared_config()]
    return rows


def markdown() -> str:
    lines = ["# Protocol: every setting of the paper's tables, its value and its source", "",
             "Generated by `python -m oplora.protocol` from the composed configs and their source comments "
             "(`# paper: …`, `# reference: …`, `# ours: …` beside a setting); `tests/test_protocol.py` checks that "
             "it is current. \"—\": the setting's line carries no source comment. The README's section \"Protocol: "
             "the paper's settings and our deviations\" explains the deviations.", ""]

    def section(title: str, rows: list[tuple[str, str, str]]) -> None:
        lines.extend([f"## {title}", "", "| setting | value | source |", "|---|---|---|",
                      *(f"| `{k}` | `{v}` | {s} |" for k, v, s in rows), ""])

    for experiment in EXPERIMENTS:
        cfg, _ = compose(experiment)
        section(f"{experiment}: {cfg.model.name} on {cfg.data.name}", table_rows(experiment))
    section("Methods (every table)", method_rows())
    GlobalHydra.instance().clear()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m oplora.protocol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="PROTOCOL.md")
    args = parser.parse_args(argv)
    atomic_write_text(args.out, markdown())
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
