"""PER as DESIGN.md defines it, checked against numbers worked by hand."""

from __future__ import annotations

import math

import pytest

from slmtui.errors import UserError
from slmtui.per import PerInput, automatic_rank_by, compute_per, lead, summarise_models


def row(model: str, acc: float, thr: float, lat: float, mem: float, **kw) -> PerInput:
    return PerInput(
        model=model,
        task=kw.pop("task", "gsm8k"),
        accuracy=acc,
        throughput=thr,
        latency_ms=lat,
        memory_mb=mem,
        **kw,
    )


# Worked on paper:
#   A: acc 0.80, thr 150, lat  8, mem 1200
#   B: acc 0.60, thr 250, lat  4, mem  800
#   C: acc 0.50, thr  50, lat 12, mem 2000
# acc  range 0.5..0.8  -> A 1,   B 1/3, C 0
# thr  range 50..250   -> A 0.5, B 1,   C 0
# lat  range 4..12 (lower better)    -> A 1 - 4/8 = 0.5,        B 1, C 0
# mem  range 800..2000 (lower better) -> A 1 - 400/1200 = 2/3,  B 1, C 0
# PER A = (1 * 0.5 * 0.5 * 2/3)^(1/4) = (1/6)^(1/4) = 0.638943
# PER B = (1/3 * 1 * 1 * 1)^(1/4)     = (1/3)^(1/4) = 0.759836
# PER C = 0 (worst on every factor)
THREE = [
    row("A", 0.80, 150, 8, 1200),
    row("B", 0.60, 250, 4, 800),
    row("C", 0.50, 50, 12, 2000),
]


def by_model(rows):
    return {r.model: r for r in rows}


def test_three_models_match_hand_computed_per():
    result = by_model(compute_per(THREE))
    a, b, c = result["A"], result["B"], result["C"]
    assert (a.acc_n, a.thr_n, a.lat_n) == pytest.approx((1.0, 0.5, 0.5))
    assert a.mem_n == pytest.approx(2 / 3)
    assert (b.acc_n, b.thr_n, b.lat_n, b.mem_n) == pytest.approx((1 / 3, 1.0, 1.0, 1.0))
    assert a.per == pytest.approx(0.638943, abs=1e-6)
    assert b.per == pytest.approx(0.759836, abs=1e-6)
    assert c.per == 0.0


def test_rows_come_back_best_first_with_ranks():
    result = compute_per(THREE)
    assert [(r.model, r.rank) for r in result] == [("B", 1), ("A", 2), ("C", 3)]


def test_pareto_front_excludes_only_the_dominated_model():
    result = by_model(compute_per(THREE))
    assert result["A"].pareto and result["B"].pareto
    assert not result["C"].pareto


def test_one_model_gets_per_one():
    (only,) = compute_per([row("solo", 0.3, 10, 50, 900)])
    assert (only.acc_n, only.thr_n, only.lat_n, only.mem_n) == (1.0, 1.0, 1.0, 1.0)
    assert only.per == 1.0 and only.rank == 1 and only.pareto


def test_metric_equal_for_all_models_does_not_penalise():
    # Same throughput, latency and memory: those factors are 1.0 for both; accuracy decides.
    rows = [row("X", 0.9, 200, 10, 500), row("Y", 0.5, 200, 10, 500)]
    x, y = (by_model(compute_per(rows))[m] for m in "XY")
    assert x.thr_n == y.thr_n == x.lat_n == y.lat_n == x.mem_n == y.mem_n == 1.0
    assert x.per == 1.0 and y.per == 0.0


def test_zero_factor_makes_per_zero_even_when_best_elsewhere():
    # D has the best throughput, latency and memory but the worst accuracy.
    rows = [row("D", 0.1, 1000, 1, 100), row("E", 0.9, 10, 100, 10_000)]
    d = by_model(compute_per(rows))["D"]
    assert (d.thr_n, d.lat_n, d.mem_n, d.acc_n) == (1.0, 1.0, 1.0, 0.0)
    assert d.per == 0.0
    assert d.pareto  # not dominated: the Pareto flag sees what PER hides


def test_weights_give_a_weighted_geometric_mean():
    # Model A of THREE with accuracy weighted 2:
    # (1^2 * 0.5 * 0.5 * (2/3))^(1/5) = (1/6)^(1/5) = 0.698827
    a = by_model(compute_per(THREE, weights={"accuracy": 2}))["A"]
    assert a.per == pytest.approx(0.698827, abs=1e-6)
    # Weight 0 drops a factor: A without throughput = (1 * 0.5 * 2/3)^(1/3) = (1/3)^(1/3)
    a = by_model(compute_per(THREE, weights={"throughput": 0}))["A"]
    assert a.per == pytest.approx(3 ** (-1 / 3))


def test_zero_weight_factor_no_longer_zeroes_per():
    rows = [row("D", 0.1, 1000, 1, 100), row("E", 0.9, 10, 100, 10_000)]
    d = by_model(compute_per(rows, weights={"accuracy": 0}))["D"]
    assert d.per == 1.0


def test_bad_weights_are_user_errors():
    with pytest.raises(UserError, match=r"unknown factor 'acuracy'.*did you mean 'accuracy'"):
        compute_per(THREE, weights={"acuracy": 2})
    with pytest.raises(UserError, match="'latency' must be a number >= 0"):
        compute_per(THREE, weights={"latency": -1})
    with pytest.raises(UserError, match="all 0"):
        compute_per(
            THREE, weights=dict.fromkeys(("accuracy", "throughput", "latency", "memory"), 0)
        )
    with pytest.raises(UserError, match="energy is not a factor"):
        compute_per(THREE, weights={"energy": 1})


def test_log_scale_normalises_log10_of_costs():
    # thr 10, 100, 1000 -> log10 1, 2, 3 -> 0, 0.5, 1 (linear would give 0, 0.0909, 1)
    rows = [
        row("s", 0.9, 10, 1, 1000),
        row("m", 0.9, 100, 1, 1000),
        row("l", 0.9, 1000, 1, 1000),
    ]
    linear = by_model(compute_per(rows))
    logged = by_model(compute_per(rows, log_scale=True))
    assert linear["m"].thr_n == pytest.approx(90 / 990)
    assert logged["m"].thr_n == pytest.approx(0.5)
    assert logged["m"].per == pytest.approx(0.5**0.25)
    # accuracy stays linear, so a zero accuracy is fine under log scale
    compute_per([row("z", 0.0, 10, 1, 10), row("y", 0.5, 20, 2, 20)], log_scale=True)


def test_log_scale_rejects_non_positive_costs():
    rows = [row("z", 0.5, 0, 1, 10), row("y", 0.5, 20, 2, 20)]
    with pytest.raises(UserError, match=r"model 'z'.*throughput must be > 0 for log-scale"):
        compute_per(rows, log_scale=True)


def test_energy_as_fifth_factor():
    # energy 2 J vs 4 J: P gets 1, Q gets 0 on energy; other factors equal -> P 1.0, Q 0.0
    rows = [row("P", 0.5, 10, 1, 10, energy_j=2.0), row("Q", 0.5, 10, 1, 10, energy_j=4.0)]
    result = by_model(compute_per(rows, energy=True))
    assert (result["P"].energy_n, result["Q"].energy_n) == (1.0, 0.0)
    assert (result["P"].per, result["Q"].per) == (1.0, 0.0)
    assert result["P"].pareto and not result["Q"].pareto
    # without energy the rows are tied, both on the front, energy_n unset
    plain = by_model(compute_per(rows))
    assert plain["Q"].energy_n is None
    assert plain["P"].per == plain["Q"].per == 1.0
    assert plain["P"].rank == plain["Q"].rank == 1
    assert plain["P"].pareto and plain["Q"].pareto


def test_missing_energy_names_the_model():
    rows = [row("P", 0.5, 10, 1, 10, energy_j=2.0), row("cpu-model", 0.5, 10, 1, 10)]
    with pytest.raises(UserError, match="model 'cpu-model' on task 'gsm8k' has no energy_j"):
        compute_per(rows, energy=True)


def test_negative_or_nan_metrics_are_rejected():
    with pytest.raises(UserError, match=r"model 'n'.*memory_mb must be a finite number >= 0"):
        compute_per([row("n", 0.5, 10, 1, -5)])
    with pytest.raises(UserError, match="latency_ms must be a finite number"):
        compute_per([row("n", 0.5, 10, math.nan, 5)])


def test_several_tasks_are_normalised_apart():
    rows = [
        *THREE,
        row("A", 0.2, 10, 100, 1000, task="imdb"),
        row("B", 0.9, 20, 50, 500, task="imdb"),
    ]
    result = compute_per(rows)
    assert [r.task for r in result] == ["gsm8k"] * 3 + ["imdb"] * 2
    imdb = by_model(r for r in result if r.task == "imdb")
    assert imdb["B"].per == 1.0 and imdb["A"].per == 0.0
    assert imdb["B"].rank == 1 and imdb["B"].pareto and not imdb["A"].pareto
    gsm = by_model(r for r in result if r.task == "gsm8k")
    assert gsm["B"].per == pytest.approx(0.759836, abs=1e-6)  # unchanged by the imdb rows


def test_pareto_compares_raw_metrics_with_direction():
    # F is faster than G but uses more memory: neither dominates.
    # H equals G everywhere except a worse latency: G dominates H.
    rows = [
        row("F", 0.7, 200, 5, 900),
        row("G", 0.7, 100, 5, 500),
        row("H", 0.7, 100, 6, 500),
    ]
    result = by_model(compute_per(rows))
    assert result["F"].pareto and result["G"].pareto and not result["H"].pareto


def test_identical_rows_are_both_on_the_front():
    rows = [row("twin1", 0.7, 100, 5, 500), row("twin2", 0.7, 100, 5, 500)]
    assert all(r.pareto and r.per == 1.0 for r in compute_per(rows))


def test_key_and_unit_pass_through():
    (r,) = compute_per([row("k", 0.5, 1, 1, 1, key="run-1", throughput_unit="tokens/s")])
    assert r.input.key == "run-1" and r.input.throughput_unit == "tokens/s"


def test_model_summary_averages_per_over_tasks():
    rows = compute_per(
        [
            *THREE,
            row("A", 0.2, 10, 100, 1000, task="imdb"),
            row("B", 0.9, 20, 50, 500, task="imdb"),
        ]
    )
    summary = {s.model: s for s in summarise_models(rows)}
    # B: (0.759836 + 1.0) / 2; A: (0.638943 + 0) / 2; C only on gsm8k: 0
    assert summary["B"].mean_per == pytest.approx((0.759836 + 1.0) / 2, abs=1e-6)
    assert summary["A"].mean_per == pytest.approx(0.638943 / 2, abs=1e-6)
    assert (summary["B"].tasks, summary["C"].tasks) == (2, 1)
    assert (summary["A"].pareto_tasks, summary["B"].pareto_tasks) == (1, 2)
    assert [s.model for s in summarise_models(rows)] == ["B", "A", "C"]


# -- PER-rel: each factor as a ratio to the task's best ----------------------------------------
# THREE again; best: acc 0.80 (A), thr 250 (B), lat 4 (B), mem 800 (B).
#   A: acc 0.8/0.8 = 1,     thr 150/250 = 0.6, lat 4/8 = 0.5,    mem 800/1200 = 2/3
#      PER-rel = (1 * 0.6 * 0.5 * 2/3)^(1/4) = 0.2^(1/4) = 0.668740
#   B: acc 0.6/0.8 = 0.75,  thr 1, lat 1, mem 1  -> 0.75^(1/4) = 0.930605
#   C: acc 0.5/0.8 = 0.625, thr 50/250 = 0.2, lat 4/12 = 1/3, mem 800/2000 = 0.4
#      product 0.625 * 0.2 * (1/3) * 0.4 = 1/60 -> (1/60)^(1/4) = 0.359304


def test_per_rel_matches_hand_computed_ratios():
    result = by_model(compute_per(THREE))
    a, b, c = result["A"], result["B"], result["C"]
    assert a.ratios == pytest.approx(
        {"accuracy": 1.0, "throughput": 0.6, "latency": 0.5, "memory": 2 / 3}
    )
    assert a.per_rel == pytest.approx(0.668740, abs=1e-6)
    assert b.per_rel == pytest.approx(0.930605, abs=1e-6)
    assert c.per_rel == pytest.approx(0.359304, abs=1e-6)
    assert c.per == 0.0 and c.per_rel > 0  # the study's is 0, the companion is not
    assert (a.rank_rel, b.rank_rel, c.rank_rel) == (2, 1, 3)


def test_per_rel_is_one_for_a_model_best_on_everything():
    rows = [row("best", 0.9, 300, 2, 500), row("worse", 0.5, 100, 4, 1000)]
    result = by_model(compute_per(rows))
    assert result["best"].per_rel == 1.0 and result["best"].limiting is None


# Two models, each worst on something (the case): the study's PER is 0 for both.
#   X: acc 0.5, thr 100, lat 10, mem 1000    Y: acc 0.4, thr 200, lat 4, mem 600
#   X ratios: acc 1, thr 0.5, lat 4/10 = 0.4, mem 600/1000 = 0.6 -> 0.12^(1/4) = 0.588566
#   Y ratios: acc 0.4/0.5 = 0.8, thr 1, lat 1, mem 1            -> 0.8^(1/4)  = 0.945742
#   log(Y/X) per factor (weight 1/4 each): acc log 0.8 < 0, thr log 2, lat log 2.5, mem log 1/0.6
#   -> latency adds most: it decides, Y's latency 2.5x better; PER-rel ratio 0.945742/0.588566
TWO = [row("X", 0.5, 100, 10, 1000), row("Y", 0.4, 200, 4, 600)]


def test_two_models_get_zero_per_but_a_nonzero_per_rel():
    result = by_model(compute_per(TWO))
    assert result["X"].per == result["Y"].per == 0.0
    assert result["X"].rank == result["Y"].rank == 1
    assert result["X"].per_rel == pytest.approx(0.588566, abs=1e-6)
    assert result["Y"].per_rel == pytest.approx(0.945742, abs=1e-6)
    assert [r.model for r in compute_per(TWO, rank_by="per_rel")] == ["Y", "X"]
    assert [r.rank_rel for r in compute_per(TWO, rank_by="per_rel")] == [1, 2]


def test_lead_names_the_factor_that_decides():
    found = lead(compute_per(TWO))  # rows in PER order (a tie at 0): lead still compares PER-rel
    assert found is not None
    assert (found.leader.model, found.runner_up.model) == ("Y", "X")
    assert found.factor == "latency"
    assert found.factor_ratio == pytest.approx(2.5)
    assert found.score_ratio == pytest.approx(0.945742 / 0.588566, abs=1e-5)
    assert found.sentence().startswith("By PER-rel, Y leads X: latency decides (2.50× better")
    assert result_limiting(TWO) == {"X": "latency", "Y": "accuracy"}
    assert lead(compute_per(TWO[:1])) is None


def result_limiting(rows):
    return {r.model: r.limiting for r in compute_per(rows)}


def test_a_dominated_model_joining_leaves_other_per_rel_unchanged():
    # Z is worse than X and Y on every metric: the best values stay, so do X's and Y's ratios.
    # The study's PER moves (X and Y are no longer the worst on anything).
    before = by_model(compute_per(TWO))
    after = by_model(compute_per([*TWO, row("Z", 0.3, 50, 20, 2000)]))
    for m in "XY":
        assert after[m].per_rel == pytest.approx(before[m].per_rel)
    assert after["X"].per > 0 and after["Y"].per > 0


def test_per_rel_uses_the_same_weights():
    # X with latency weighted 0: (1 * 0.5 * 0.6)^(1/3) = 0.3^(1/3)
    x = by_model(compute_per(TWO, weights={"latency": 0}))["X"]
    assert x.per_rel == pytest.approx(0.3 ** (1 / 3))
    # with energy (J/unit; X 2, Y 4): X's energy ratio 1, Y's 0.5 -> Y = (0.8 * 0.5)^(1/5)
    rows = [
        row("X", 0.5, 100, 10, 1000, energy_j=2.0),
        row("Y", 0.4, 200, 4, 600, energy_j=4.0),
    ]
    y = by_model(compute_per(rows, energy=True))["Y"]
    assert y.ratios["energy"] == 0.5
    assert y.per_rel == pytest.approx(0.4 ** (1 / 5))


def test_zero_accuracy_beside_a_positive_one_is_the_one_zero_per_rel():
    rows = [row("none", 0.0, 900, 1, 100), row("some", 0.1, 10, 9, 900)]
    assert by_model(compute_per(rows))["none"].per_rel == 0.0
    both_zero = [row("a", 0.0, 900, 1, 100), row("b", 0.0, 10, 9, 900)]
    assert by_model(compute_per(both_zero))["a"].per_rel == 1.0


def test_co2_is_a_factor_like_energy():
    rows = [
        row("P", 0.5, 10, 1, 10, energy_j=2.0, co2_g=0.001),
        row("Q", 0.5, 10, 1, 10, energy_j=4.0, co2_g=0.002),
    ]
    result = by_model(compute_per(rows, co2=True))
    assert (result["P"].co2_n, result["Q"].co2_n) == (1.0, 0.0)
    assert result["Q"].ratios["co2"] == 0.5
    with pytest.raises(UserError, match="model 'cpu' on task 'gsm8k' has no CO2 figure"):
        compute_per([*rows, row("cpu", 0.5, 10, 1, 10)], co2=True)


def test_unknown_rank_by_is_a_user_error():
    with pytest.raises(UserError, match=r"rank by 'rel'.*allowed: 'per' or 'per_rel'"):
        compute_per(THREE, rank_by="rel")


def test_summary_means_per_rel_too():
    rows = compute_per(TWO)
    summary = {s.model: s for s in summarise_models(rows, by="per_rel")}
    assert summary["Y"].mean_per_rel == pytest.approx(0.945742, abs=1e-6)
    assert [s.model for s in summarise_models(rows, by="per_rel")] == ["Y", "X"]


def test_a_small_set_ranks_by_per_rel_unless_some_task_has_four_models() -> None:
    three = [row(m, 0.5, 10.0, 5.0, 100.0) for m in ("a", "b", "c")]
    assert automatic_rank_by(three) == "per_rel"
    assert automatic_rank_by([]) == "per"  # nothing to rank: the study's score, as ever
    four_on_one_task = [*three, row("d", 0.5, 10.0, 5.0, 100.0)]
    assert automatic_rank_by(four_on_one_task) == "per"
    # the same model twice on a task (two settings, one label) counts once
    assert automatic_rank_by([*three, row("c", 0.6, 10.0, 5.0, 100.0)]) == "per_rel"
    # a fourth model on another task: every task is still a small set
    assert automatic_rank_by([*three, row("d", 0.5, 10.0, 5.0, 100.0, task="imdb")]) == "per_rel"
