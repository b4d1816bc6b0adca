"""benchmarks/throughput.py's table: the ratio to pythae is taken round by round."""

from __future__ import annotations

import statistics

from benchmarks.throughput import _table, round_ratios


def _run(ips: float) -> dict:
    return {"ips": ips, "cpu_ips": ips / 2, "train_loop_ips": ips * 1.1, "peak_rss_mb": 1000.0, "wall_s": 10.0}


def test_a_machine_that_slows_between_rounds_does_not_inflate_the_ratio():
    # the trainer is 1.4x pythae throughout, but the machine halves its speed in round 3, between
    # the trainer's run and pythae's
    trainer = [2100, 2100, 2100, 1050, 1050]
    pythae = [1500, 1500, 750, 750, 750]
    results = {"trainer": [_run(v) for v in trainer], "pythae": [_run(v) for v in pythae]}
    ratios = round_ratios(results, "trainer")
    assert ratios == [a / b for a, b in zip(trainer, pythae)]
    assert statistics.median(ratios) == 1.4
    of_medians = statistics.median(trainer) / statistics.median(pythae)
    assert of_medians == 2.8  # what the ratio of the medians says
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in _table(results).splitlines()[2:]}
    assert rows["trainer"][2] == "**1.40**"
    assert rows["trainer"][4] == f"{of_medians:.2f}"
    assert rows["pythae"][2] == "**1.00**"
    assert rows["trainer"][3] == ", ".join(f"{r:.2f}" for r in ratios)


def test_without_the_baseline_the_ratios_are_left_blank():
    table = _table({"trainer": [_run(2000), _run(2100)], "bare": [_run(1000), _run(1100)]})
    trainer = next(line for line in table.splitlines() if line.startswith("| trainer "))
    assert trainer.split(" | ")[1] == "2050" and trainer.split(" | ")[2] == "–"
