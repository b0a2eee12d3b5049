"""The learning–forgetting frontier (oplora.frontier): envelope, interpolation, target, matched table, figure."""

import json
import math

import numpy as np
import pytest

from oplora.frontier import (
    TARGET_RULE,
    Origin,
    Point,
    Target,
    envelope,
    forgetting_at,
    frontier_figure,
    frontiers,
    matched,
    mean_envelope,
    target_level,
    to_markdown,
)

T_975_2 = 4.302652729911275  # t_{0.975, 2}


def test_envelope_ignores_dominated_points_and_interpolates_linearly():
    pairs = [(1.0, 0.2), (2.0, 0.6), (3.0, 1.0),
             (1.5, 0.9),   # dominated by (2.0, 0.6): more learning, less forgetting
             (0.5, 0.3),   # dominated by (1.0, 0.2)
             (2.0, 0.8),   # the same learning as (2.0, 0.6), more forgetting
             (-0.5, 0.1)]  # learned less than the base model: dominated by the origin
    curve = envelope(pairs)
    assert curve == [(0.0, 0.0), (1.0, 0.2), (2.0, 0.6), (3.0, 1.0)]
    assert forgetting_at(curve, 1.5) == pytest.approx(0.4)  # halfway between 0.2 and 0.6 (not 0.9)
    assert forgetting_at(curve, 2.5) == pytest.approx(0.8)
    assert forgetting_at(curve, 0.5) == pytest.approx(0.1)  # between the origin and (1, 0.2)
    assert forgetting_at(curve, 3.0) == pytest.approx(1.0)
    assert forgetting_at(curve, 3.01) is None  # beyond the frontier: not reached, never extrapolated
    assert forgetting_at(curve, -1.0) == 0.0  # the base model already learns that much
    # an accuracy: the base model's 40 % is the origin; a run that forgot nothing moves the origin right
    assert envelope([(55.0, 0.3), (45.0, 0.0), (38.0, 0.0)], origin=40.0) == [(45.0, 0.0), (55.0, 0.3)]
    assert forgetting_at(envelope([(55.0, 0.3), (45.0, 0.0)], origin=40.0), 50.0) == pytest.approx(0.15)

    points = [Point("A", 1e-4, s, 1, x, y) for s, (x, y) in enumerate(pairs)] + [Point("A", 1e-4, 1, 2, 2.0, 1.0)]
    curves = frontiers(points)
    assert curves[("A", 1)] == curve and curves[("A", 2)] == [(0.0, 0.0), (2.0, 1.0)]
    # the figure's curve: the mean of the two seeds' envelopes, up to 2.0 (seed 2's reach); at 1.0: (0.2 + 0.5) / 2
    mean = mean_envelope([curves[("A", 1)], curves[("A", 2)]])
    assert [x for x, _ in mean] == [0.0, 1.0, 2.0] and [y for _, y in mean] == pytest.approx([0.0, 0.35, 0.8])


def test_target_is_the_reference_learning_at_its_best_lr_final_checkpoint():
    final = {1e-4: (1.0, 1.2), 3e-4: (1.5, 1.9), 1e-3: (1.6, 1.6)}  # per lr, seeds 1 and 2; means 1.1, 1.7, 1.6
    points = [Point("LoRA", lr, 10, seed, v, 0.1)
              for lr, vs in final.items() for seed, v in zip((1, 2), vs, strict=True)]
    points += [Point("LoRA", 1e-3, 5, 1, 9.0, 0.1),  # an earlier checkpoint that learned more: not the final one
               Point("OPLoRA", 1e-3, 10, 1, 9.0, 0.1)]  # another method: the rule reads the reference only
    assert target_level(points, "LoRA") == Target(pytest.approx(1.5), TARGET_RULE, 3e-4)  # seed 1's, the lower
    assert target_level(points, "LoRA", level=2.5) == Target(2.5, "given")
    tie = [Point("LoRA", lr, 1, 1, 1.0, 0.1) for lr in (3e-4, 1e-4)]
    assert target_level(tie, "LoRA").lr == 1e-4  # a tie: the smaller lr
    with pytest.raises(ValueError, match=r"'Lora'.*\['LoRA', 'OPLoRA'\]"):
        target_level(points, "Lora")


def frontier_points(rng):
    """Three seeds, target L = 1: each method's single checkpoint learns 2.0 and forgets 2·f, so its forgetting at
    L is f (linear from the origin). Items: 60 learning questions, 40 forgetting prompts per point."""
    forgets = {"LoRA": [0.5, 0.6, 0.7], "Less": [0.3, 0.35, 0.5], "Mixed": [0.6, 0.55, 0.9], "Same": [0.5, 0.6, 0.7]}
    noise = {s: (rng.normal(0, 1, 60), rng.normal(0, 0.2, 40)) for s in (1, 2, 3)}
    points = []
    for method, fs in forgets.items():
        for seed, f in zip((1, 2, 3), fs, strict=True):
            # "Same" has LoRA's exact per-question values; "Less" and "Mixed" their own noise on the forgetting side
            learn, forget = noise[seed][0], noise[seed][1] if method in ("LoRA", "Same") else rng.normal(0, 0.2, 40)
            points.append(Point.from_items(method, 1e-4, 1, seed, 2.0 + learn - learn.mean(),
                                           2 * f + forget - forget.mean()))
    for seed, learning, forgetting in ((1, 2.0, 2.0), (2, 2.0, 2.0), (3, 0.8, 0.5)):  # "Short": seed 3 stops short
        points.append(Point.from_items("Short", 1e-4, 1, seed, np.full(60, learning), np.full(40, forgetting)))
    return points


def test_matched_table_t_interval_by_hand_and_claims_only_when_both_intervals_exclude_zero():
    table = matched(frontier_points(np.random.default_rng(0)), "LoRA", Target(1.0, "given"), b=400)
    rows = table["methods"]
    assert list(rows) == ["LoRA", "Less", "Mixed", "Same", "Short"]
    assert rows["LoRA"]["forgetting"] == pytest.approx({"1": 0.5, "2": 0.6, "3": 0.7}) and "diff" not in rows["LoRA"]

    less = rows["Less"]  # per seed 0.3 − 0.5, 0.35 − 0.6, 0.5 − 0.7 = −0.2, −0.25, −0.2
    d = [-0.2, -0.25, -0.2]
    mean = sum(d) / 3  # −0.21667
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)  # 0.028868
    half = T_975_2 * sd / math.sqrt(3)  # 0.071717
    assert less["per_seed"] == pytest.approx({"1": -0.2, "2": -0.25, "3": -0.2}) and less["seeds"] == 3
    assert less["diff"] == pytest.approx(mean)
    assert (less["low"], less["high"]) == pytest.approx((mean - half, mean + half))
    assert less["high"] == pytest.approx(-0.14495, abs=1e-5) and less["claim"] == "forgets less"
    assert less["cond_low"] < mean < less["cond_high"] and less["cond_unreached"] == 0

    mixed = rows["Mixed"]  # +0.1, −0.05, +0.2: the interval includes 0, so no claim
    assert mixed["diff"] == pytest.approx(0.25 / 3) and mixed["low"] < 0 < mixed["high"]
    assert mixed["claim"] is None and mixed["why"] == "an interval includes 0"

    same = rows["Same"]  # LoRA's own per-question values: every bootstrap draw is paired, so the difference stays 0
    assert same["diff"] == same["low"] == same["high"] == same["cond_low"] == same["cond_high"] == 0.0
    assert same["claim"] is None

    short = rows["Short"]  # seeds 1 and 2 forget 1.0 at L (2.0 over 2.0, halfway); seed 3 stops at 0.8 < L
    assert short["forgetting"] == pytest.approx({"1": 1.0, "2": 1.0, "3": None}) and short["unreached"] == [3]
    assert short["per_seed"]["3"] is None and short["seeds"] == 2 and short["claim"] is None
    assert short["why"] == "Short does not reach the target on seed(s) 3"

    assert json.loads(json.dumps(table)) == table  # JSON-able as it is
    text = to_markdown(table, "frontier")
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| Less"].endswith("| forgets less |")
    assert f"{mean:+.4g} [{mean - half:+.4g}, {mean + half:+.4g}] (" in lines["| Less"]
    assert "3: n/r" in lines["| Short"] and "does not reach the target on seed(s) 3" in lines["| Short"]
    assert "forgets" not in lines["| Mixed"] and "conditional on the seeds" in text


def test_bootstrap_recomputes_learning_so_a_frontier_can_fall_short():
    rng = np.random.default_rng(3)
    points = []
    for method in ("LoRA", "Edge"):
        for seed in (1, 2):
            noise = rng.normal(0, 1, 100)
            # Edge's only checkpoint learns 1.01 on average: just past L = 1, within the question noise of it
            learning = (1.01 if method == "Edge" else 3.0) + noise - noise.mean()
            points.append(Point.from_items(method, 1e-4, 1, seed, learning, np.full(30, 0.5)))
    edge = matched(points, "LoRA", Target(1.0, "given"), b=300)["methods"]["Edge"]
    assert edge["unreached"] == [] and edge["diff"] is not None  # reached in the data
    assert 0.2 < edge["cond_unreached"] < 0.9  # but not in many question draws: counted, not extrapolated

    without_items = [Point(p.method, p.lr, p.step, p.seed, p.learning, p.forgetting) for p in points]
    table = matched(without_items, "LoRA", Target(1.0, "given"))
    assert table["draws"] is None and table["methods"]["Edge"]["cond_low"] is None


def test_bad_points_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="forgetting -0.1 < 0"):
        Point("A", 1e-4, 1, 1, 1.0, -0.1)
    with pytest.raises(ValueError, match="not the mean of its learning_items"):
        Point("A", 1e-4, 1, 1, 1.0, 0.1, np.array([0.0, 1.0]), np.array([0.1]))
    mismatched = [Point.from_items("A", 1e-4, 1, 1, [1.0, 2.0], [0.1]), Point.from_items("A", 1e-4, 2, 1, [1.0], [0.1])]
    with pytest.raises(ValueError, match="learning_items differ in length"):
        matched(mismatched, "A", Target(1.0, "given"))
    with pytest.raises(ValueError, match="reference method 'B'"):
        matched(mismatched[:1], "B", Target(1.0, "given"))


def test_frontier_figure_is_written(tmp_path):
    points = frontier_points(np.random.default_rng(1))
    points += [Point("LoRA", 3e-4, step, 1, 0.5 * step, 0.05 * step ** 2) for step in range(0, 5)]  # 0 at step 0
    paths = frontier_figure(points, tmp_path / "frontier", colors={"LoRA": "#1f77b4"}, target=1.0,
                            origin=Origin(), title="test", learning_label="NLL gain (nats)",
                            forgetting_label="KL to the base")
    assert [p.name for p in paths] == ["frontier.png", "frontier.pdf"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    with pytest.raises(ValueError, match="no points"):
        frontier_figure([], tmp_path / "empty")
