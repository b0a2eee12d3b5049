"""The learning–forgetting frontier: each method's forgetting at a matched level of learning, paired per seed.

A point is one run (method, lr, seed) at one checkpoint (step or epoch fraction): how much it learned (higher is
better, e.g. the base model's gold-answer NLL minus the tuned model's, in nats, or an accuracy) and how much it
forgot (≥ 0, e.g. the mean KL to the base model), optionally with the per-question values both are the means of.

Per (method, seed) the frontier is the lower envelope of its points with the base model as the origin (learning
`Origin.learning`, forgetting 0): the Pareto-optimal points (no other point learns as much or more while forgetting
less), sorted by learning. The forgetting at a learning level L is the linear interpolation between the two envelope
points around L; at or below the first envelope point it is that point's forgetting, 0; above the last it is None:
that run never learned that much on that seed, and it is reported as such, never extrapolated.

The statistic, fixed before looking at the other methods (issue 25):
- the target level L: `target_level` (TARGET_RULE, from the reference method's points only), or a given number;
- per method and seed the forgetting at L, and per seed its difference to the reference's on the same seed;
- the mean difference over seeds and its t-interval over seeds (oplora.paired.t_interval); "forgets less" or
  "forgets more" only when that interval excludes 0 and both methods reached L on every seed they share;
- beside it, a bootstrap over questions conditional on the seeds: each draw resamples the learning questions and,
  independently, the forgetting prompts, one draw of indices for every point of every method and seed (and the
  origin), and recomputes every point, envelope and interpolation at the same L.
The figure (`frontier_figure`) draws per method the mean over seeds of its per-seed envelopes, the curve the table
reads at L (not the envelope of the seeds pooled, which sinks as seeds are added).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from oplora.figures import method_colors, save
from oplora.paired import LEVEL, SEED, B, excludes_zero, percentile_interval, resample_means, t_interval

Curve = list[tuple[float, float]]  # (learning, forgetting), learning strictly ascending
TARGET_RULE = ("the reference method's learning at its best lr: per lr, the mean over seeds of its final "
               "checkpoint's learning; the best lr is the one where that mean is highest (a tie: the smaller lr); "
               "the target is the lowest of that lr's final learnings over seeds, so that every seed of the reference "
               "reaches it")
INTERVALS = {
    "low, high": f"{LEVEL:.0%} t-interval over seeds of the per-seed differences in forgetting at the target, "
                 "mean ± t(S−1)·sd/√S, over the seeds where both methods reach it; null with one such seed",
    "cond_low, cond_high": f"{LEVEL:.0%} percentile interval of a bootstrap over questions (learning questions and "
                           "forgetting prompts resampled, every envelope recomputed), conditional on the seeds; "
                           "cond_unreached: the fraction of draws in which a frontier fell short of the target",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per lr in the figure


@dataclass(frozen=True, eq=False)
class Point:
    """One run × checkpoint; `learning`/`forgetting` are the means of `*_items` where those are given."""

    method: str
    lr: float
    step: float
    seed: int
    learning: float
    forgetting: float
    learning_items: np.ndarray | None = None
    forgetting_items: np.ndarray | None = None

    @classmethod
    def from_items(cls, method: str, lr: float, step: float, seed: int, learning_items: Sequence[float],
                   forgetting_items: Sequence[float]) -> Point:
        learning, forgetting = np.asarray(learning_items, dtype=float), np.asarray(forgetting_items, dtype=float)
        return cls(method, lr, step, seed, float(learning.mean()), float(forgetting.mean()), learning, forgetting)

    def __post_init__(self):
        where = f"frontier point {self.method} lr={self.lr} step={self.step} seed={self.seed}"
        if not (math.isfinite(self.learning) and math.isfinite(self.forgetting)):
            raise ValueError(f"{where}: learning {self.learning} and forgetting {self.forgetting} must be finite")
        if self.forgetting < 0:
            raise ValueError(f"{where}: forgetting {self.forgetting} < 0 (a divergence to the base model is ≥ 0)")
        for name in ("learning", "forgetting"):
            items = getattr(self, f"{name}_items")
            if items is not None and not math.isclose(float(np.mean(items)), getattr(self, name), rel_tol=1e-9,
                                                      abs_tol=1e-12):
                raise ValueError(f"{where}: {name} {getattr(self, name)} is not the mean of its {name}_items "
                                 f"({float(np.mean(items))}); build it with Point.from_items")


@dataclass(frozen=True, eq=False)
class Origin:
    """The base model, every frontier's first point: its learning (0 for an NLL gain, its accuracy for an accuracy;
    `learning_items`: per question, resampled with the points' in the bootstrap; None: held fixed) and forgetting 0."""

    learning: float = 0.0
    learning_items: np.ndarray | None = None


NLL_GAIN = Origin()  # learning as the NLL the model gained over the base: the base sits at 0


@dataclass(frozen=True)
class Target:
    level: float
    rule: str
    lr: float | None = None  # the reference's best lr under TARGET_RULE


def envelope(pairs: Iterable[tuple[float, float]], origin: float = 0.0) -> Curve:
    """The Pareto-optimal (learning, forgetting) pairs, with (origin, 0), sorted by learning: walking down from the
    most learning, a pair is kept when it forgets less than every pair already kept (which learned as much or more)."""
    kept, lowest = [], math.inf
    for learning, forgetting in sorted([(origin, 0.0), *pairs], key=lambda p: (-p[0], p[1])):
        if forgetting < lowest:
            kept.append((float(learning), float(forgetting)))
            lowest = forgetting
    return kept[::-1]


def forgetting_at(curve: Curve, level: float) -> float | None:
    """The curve's forgetting at learning `level`: linear between its points, its first point's below them, None
    beyond its last (never extrapolated)."""
    xs, ys = zip(*curve, strict=True)
    return None if level > xs[-1] else float(np.interp(level, xs, ys))


def group(points: Iterable[Point], *fields: str) -> dict[tuple, list[Point]]:
    """{the points' values of `fields`: those points by step}, keys in the order they first appear."""
    out: dict[tuple, list[Point]] = {}
    for p in points:
        out.setdefault(tuple(getattr(p, f) for f in fields), []).append(p)
    return {key: sorted(members, key=lambda p: p.step) for key, members in out.items()}


def frontiers(points: Sequence[Point], origin: Origin = NLL_GAIN) -> dict[tuple[str, int], Curve]:
    return {key: envelope([(p.learning, p.forgetting) for p in members], origin.learning)
            for key, members in group(points, "method", "seed").items()}


def target_level(points: Sequence[Point], reference: str, level: float | None = None) -> Target:
    """The target learning level: `level` when given, else TARGET_RULE on the reference method's points alone (so it
    is fixed before the other methods are looked at)."""
    if level is not None:
        return Target(float(level), "given")
    final: dict[tuple[float, int], Point] = {}
    for p in points:
        if p.method == reference and ((p.lr, p.seed) not in final or p.step > final[(p.lr, p.seed)].step):
            final[(p.lr, p.seed)] = p
    if not final:
        raise ValueError(f"frontier target: no points of the reference method {reference!r}; the points' methods are "
                         f"{sorted({p.method for p in points})} (pass the reference's display label, or a level)")
    by_lr: dict[float, list[float]] = {}
    for (lr, _), p in final.items():
        by_lr.setdefault(lr, []).append(p.learning)
    best = max(sorted(by_lr), key=lambda lr: np.mean(by_lr[lr]))  # the first maximum: the smaller lr on a tie
    return Target(float(min(by_lr[best])), TARGET_RULE, best)


def resampled_at(points: Sequence[Point], origin: Origin, level: float, b: int, seed: int
                 ) -> dict[tuple[str, int], np.ndarray] | None:
    """{(method, seed): [b] forgetting at `level` (NaN: not reached)} under b bootstrap draws over questions; None
    when a point has no per-question values."""
    if any(p.learning_items is None or p.forgetting_items is None for p in points):
        return None
    rows = [p.learning_items for p in points] + ([origin.learning_items] if origin.learning_items is not None else [])
    stacked = {}
    for name, values in (("learning", rows), ("forgetting", [p.forgetting_items for p in points])):
        sizes = {len(v) for v in values}
        if len(sizes) > 1:
            raise ValueError(f"frontier bootstrap: the points' {name}_items differ in length ({sorted(sizes)}); every "
                             "point must be scored on the same questions, in the same order")
        stacked[name] = np.stack(values)
    rng = np.random.default_rng(seed)
    learning = resample_means(stacked["learning"], rng, b)  # [b, point (+ origin)]
    forgetting = resample_means(stacked["forgetting"], rng, b)
    base = learning[:, -1] if origin.learning_items is not None else np.full(b, origin.learning)
    index = {id(p): i for i, p in enumerate(points)}
    out = {}
    for key, members in group(points, "method", "seed").items():
        rows_of = [index[id(p)] for p in members]
        found = [forgetting_at(envelope(zip(learning[j, rows_of], forgetting[j, rows_of], strict=True), base[j]),
                               level) for j in range(b)]
        out[key] = np.array([np.nan if f is None else f for f in found])
    return out


def difference(method: str, reference: str, at: dict[tuple[str, int], float | None],
               draws: dict[tuple[str, int], np.ndarray] | None) -> dict:
    """The method's per-seed forgetting minus the reference's at the target, its t-interval over seeds, the
    conditional bootstrap interval, and the claim (or why none is made)."""
    shared = sorted(s for m, s in at if m == method and (reference, s) in at)
    per_seed = {s: None if at[(method, s)] is None or at[(reference, s)] is None
                else at[(method, s)] - at[(reference, s)] for s in shared}
    reached = [s for s, d in per_seed.items() if d is not None]
    t = t_interval([per_seed[s] for s in reached])
    out = {"diff": float(np.mean([per_seed[s] for s in reached])) if reached else None,
           "low": t[0] if t else None, "high": t[1] if t else None, "excludes_zero": excludes_zero(t),
           "seeds": len(reached), "per_seed": {str(s): d for s, d in per_seed.items()},
           "cond_low": None, "cond_high": None, "cond_unreached": None}
    if draws is not None and reached:
        replicates = np.mean([draws[(method, s)] - draws[(reference, s)] for s in reached], axis=0)
        finite = replicates[np.isfinite(replicates)]
        out["cond_unreached"] = 1 - finite.size / replicates.size
        if finite.size:
            out["cond_low"], out["cond_high"] = percentile_interval(finite)
    short = {m: [s for s in shared if at[(m, s)] is None] for m in (method, reference)}
    if any(short.values()):
        out["claim"] = None
        out["why"] = "; ".join(f"{m} does not reach the target on seed(s) {', '.join(map(str, seeds))}"
                               for m, seeds in short.items() if seeds)
    elif t is None:
        out["claim"], out["why"] = None, f"{len(reached)} seed(s): no interval over seeds"
    elif excludes_zero(t) and (out["cond_low"] is None or excludes_zero((out["cond_low"], out["cond_high"]))):
        out["claim"], out["why"] = "forgets less" if t[1] < 0 else "forgets more", "both intervals exclude 0"
    else:
        out["claim"], out["why"] = None, "an interval includes 0"
    return out


def matched(points: Sequence[Point], reference: str, target: Target, origin: Origin = NLL_GAIN, b: int = B,
            seed: int = SEED) -> dict:
    """The matched-learning table (JSON-able): per method the forgetting at the target per seed and the seeds where
    it does not reach it; per method other than the reference, `difference` to the reference."""
    curves = frontiers(points, origin)
    if not any(m == reference for m, _ in curves):
        raise ValueError(f"frontier table: no points of the reference method {reference!r}; the points' methods are "
                         f"{sorted({m for m, _ in curves})}")
    at = {key: forgetting_at(curve, target.level) for key, curve in curves.items()}
    draws = resampled_at(points, origin, target.level, b, seed)
    methods = [reference, *dict.fromkeys(m for m, _ in curves if m != reference)]
    rows = {}
    for method in methods:
        seeds = sorted(s for m, s in at if m == method)
        rows[method] = {"forgetting": {str(s): at[(method, s)] for s in seeds},
                        "unreached": [s for s in seeds if at[(method, s)] is None]}
        if method != reference:
            rows[method].update(difference(method, reference, at, draws))
    return {"reference": reference, "target": asdict(target), "level": LEVEL, "draws": b if draws else None,
            "intervals": INTERVALS, "methods": rows}


def number(x: float | None, sign: str = "") -> str:
    return "n/r" if x is None else f"{x:{sign}.4g}"


def to_markdown(table: dict, title: str) -> str:
    """The matched-learning table: per method its forgetting at the target per seed, and its difference to the
    reference with the t-interval over seeds [..] and the bootstrap over questions conditional on the seeds (..)."""
    target, reference = table["target"], table["reference"]
    chosen = f" (lr {target['lr']:g})" if target["lr"] is not None else ""
    lines = [f"**{title}**", "",
             f"Target learning L = {target['level']:.4g}: {target['rule']}{chosen}. Forgetting at L per seed (n/r: "
             f"the run never reached L); the difference to {reference}: mean over seeds, its {table['level']:.0%} "
             "t-interval over seeds [low, high], and in parentheses the bootstrap interval over questions, "
             "conditional on the seeds. A claim is printed only when the interval over seeds excludes 0.", "",
             f"| Method | Forgetting at L per seed | − {reference} | Claim |", "|:--|:--|--:|:--|"]
    for method, row in table["methods"].items():
        per_seed = ", ".join(f"{s}: {number(f)}" for s, f in row["forgetting"].items())
        if method == reference:
            lines.append(f"| {method} | {per_seed} | — | reference |")
            continue
        cell = number(row["diff"], "+")
        if row["low"] is not None:
            cell += f" [{number(row['low'], '+')}, {number(row['high'], '+')}]"
        if row["cond_low"] is not None:
            cell += f" ({number(row['cond_low'], '+')}, {number(row['cond_high'], '+')})"
        lines.append(f"| {method} | {per_seed} | {cell} | {row['claim'] or '— (' + row['why'] + ')'} |")
    return "\n".join(lines) + "\n"


def mean_envelope(curves: list[Curve]) -> Curve:
    """The mean over seeds of the seeds' envelopes, exact (piecewise linear between their joint breakpoints), up to
    the least learning every seed reached."""
    reach = min(c[-1][0] for c in curves)
    xs = sorted({x for c in curves for x, _ in c if x <= reach} | {reach})
    return [(x, float(np.mean([forgetting_at(c, x) for c in curves]))) for x in xs]


def frontier_figure(points: Sequence[Point], out_stem: str | Path, colors: dict[str, str | None] | None = None,
                    target: float | None = None, origin: Origin = NLL_GAIN, title: str | None = None,
                    learning_label: str = "learning (higher is better)",
                    forgetting_label: str = "forgetting") -> list[Path]:
    """Forgetting (log scale) against learning: every point (run × checkpoint; colour: method, marker: lr), each
    run's checkpoints joined by a faint line, per method the mean over seeds of its per-seed envelopes (the curve
    the matched-learning table reads at the target), and the target as a vertical line. Writes `<out_stem>.png` and
    `.pdf` (atomically); returns both paths. Points that forgot nothing are drawn at the axis' floor."""
    if not points:
        raise ValueError("frontier_figure: no points to draw")
    curves = frontiers(points, origin)
    methods = list(dict.fromkeys(p.method for p in points))
    colors = method_colors(methods, colors)
    lrs = sorted({p.lr for p in points})
    marker = {lr: MARKERS[i % len(MARKERS)] for i, lr in enumerate(lrs)}
    positive = [p.forgetting for p in points if p.forgetting > 0]
    floor = min(positive) / 2 if positive else 1e-6

    fig = Figure(figsize=(7.5, 5), dpi=150)
    ax = fig.subplots()
    for (method, _, _), run in group(points, "method", "lr", "seed").items():
        ax.plot([p.learning for p in run], [max(p.forgetting, floor) for p in run], color=colors[method], lw=0.6,
                alpha=0.3)
    for (method, lr), members in group(points, "method", "lr").items():
        ax.scatter([p.learning for p in members], [max(p.forgetting, floor) for p in members], color=colors[method],
                   marker=marker[lr], s=16, alpha=0.75, linewidths=0)
    for method in methods:
        own = [c for (m, _), c in curves.items() if m == method]
        xs, ys = zip(*mean_envelope(own), strict=True)
        dense = np.union1d(np.linspace(xs[0], xs[-1], 200), xs)  # straight segments bend on the log axis
        shown = np.interp(dense, xs, ys) > 0
        ax.plot(dense[shown], np.interp(dense, xs, ys)[shown], color=colors[method], lw=2,
                label=f"{method} (mean envelope, {len(own)} seed{'s' * (len(own) > 1)})")
    if target is not None:
        ax.axvline(target, color="black", ls="--", lw=1, label=f"target L = {target:.4g}")
    handles, labels = ax.get_legend_handles_labels()
    for lr in lrs:
        handles.append(Line2D([], [], color="0.4", marker=marker[lr], ls="none"))
        labels.append(f"lr {lr:g}")
    ax.legend(handles, labels, fontsize=7, loc="best", framealpha=0.9)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)  # the envelopes' plunge towards the origin's 0 is cut where the points end
    ax.set_xlabel(learning_label)
    ax.set_ylabel(f"{forgetting_label} (log scale{'; 0 drawn at the floor' if len(positive) < len(points) else ''})")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out_stem)
