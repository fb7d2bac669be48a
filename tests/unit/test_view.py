"""The launchers' live view: steps per second, time left, headline metric, width."""

from pathlib import Path

from trainer.launch.local import Child, view_rows
from trainer.launch.view import StepRate, eta_seconds, format_eta, format_rate, headline


def test_format_eta():
    assert format_eta(None) == "-"
    assert format_eta(float("inf")) == "-"
    assert format_eta(-1) == "-"
    assert format_eta(0) == "0s"
    assert format_eta(42.4) == "42s"
    assert format_eta(185) == "3m05s"
    assert format_eta(2 * 3600 + 7 * 60 + 30) == "2h07m"
    assert format_eta(1e7) == ">99h"
    assert all(len(format_eta(s)) <= 6 for s in (0, 59.6, 3599, 3600, 99 * 3600 + 3599, 1e9))


def test_eta_from_total_steps():
    assert eta_seconds(50, 150, 10.0) == 10.0
    assert eta_seconds(150, 150, None) == 0.0  # done: nothing left, rate or not
    assert eta_seconds(10, 150, None) is None
    assert eta_seconds(10, 150, 0.0) is None
    assert eta_seconds(10, None, 5.0) is None


def test_step_rate_over_a_window():
    rate = StepRate(window=10.0)
    assert rate.per_second is None
    rate.add(0.0, 0)
    assert rate.per_second is None
    for t in range(1, 31):  # 10 steps/s, then 2 steps/s from t=20
        rate.add(float(t), rate._samples[-1][1] + (10 if t <= 20 else 2))
    assert rate.per_second == 2.0  # the last 10 s only
    rate.add(31.0, 5)  # restarted from a checkpoint: a new series, no negative rate
    assert rate.per_second is None
    assert format_rate(None) == "-" and format_rate(12.345) == "12.3"


def test_headline_is_the_first_metric():
    assert headline(None) == (None, None)
    assert headline({"metrics": {}}) == (None, None)
    assert headline({"metrics": {"accuracy": 0.9, "loss": 0.3}}) == ("accuracy", 0.9)


def test_rows_show_the_new_columns_and_stay_narrow():
    a = Child(0, "peer-0", "127.0.0.1:1", Path("x"), status="training")
    b = Child(1, "peer-1", "127.0.0.1:2", Path("y"), status="finished")
    for t in range(11):
        a.rate.add(float(t), 20 * t)
    a.last = {"step": 200, "total": 1000, "loss": 0.5, "exchanges": 7, "alive": 1}
    a.last_eval = {"kind": "eval", "step": 200, "metrics": {"accuracy": 0.91234}}
    b.last = {"step": 1000, "total": 1000, "alive": 1}
    head, row_a, row_b = view_rows([a, b])
    assert "accuracy" in head and "st/s" in head and "eta" in head and "alive" in head
    assert "0.9123" in row_a and "20.0" in row_a and "40s" in row_a  # 800 steps at 20/s
    assert row_b.split()[4] == "-"  # no evaluation yet
    assert max(len(r) for r in (head, row_a, row_b)) <= 88
