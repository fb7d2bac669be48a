"""The run report (trainer.report) on synthetic run folders: every plot is a real PNG with
something drawn, the tables say what summary.json says, and bad folders are one-line errors."""

import json
import re

import pytest
from conftest import assert_one_line_error
from report_page import (
    NAMES,
    PLOTS,
    assert_drawn_png,
    assert_peer_table_matches,
    make_run,
    need_matplotlib,
    parse,
)

from trainer import cli
from trainer import report as run_report
from trainer.report import page
from trainer.report.run import load


def test_the_page_has_every_plot_drawn_and_the_summary_s_numbers(tmp_path, capsys):
    need_matplotlib()
    run_dir = make_run(tmp_path)
    out = run_report.write_html(run_dir)
    assert out == run_dir / "report.html"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report: drawing 6 plots of 3 peers")
    text = out.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from anywhere
    doc = parse(out)
    assert doc.scripts == 0
    assert set(doc.images) == PLOTS
    for src in doc.images.values():
        assert_drawn_png(src)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert_peer_table_matches(doc.tables["peers"], summary)
    assert [p["restarts"] for p in summary["peers"]] == [0, 1, 0]
    assert "consensus model: accuracy 0.9150" in text
    assert "faults" not in doc.tables  # no report.json: not a chaos run


def test_a_folder_of_event_files_alone_still_reports(tmp_path, capsys):
    need_matplotlib()
    run_dir = make_run(tmp_path, summary=False, run_json=False)
    cli.main(["report", str(run_dir), "-o", str(tmp_path / "page.html")])
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'page.html'}"
    doc = parse(tmp_path / "page.html")
    assert set(doc.images) == PLOTS
    rows = doc.tables["peers"]
    assert [r[0] for r in rows[1:]] == NAMES  # the names its events give, in folder order
    assert [r[1] for r in rows[1:]] == ["finished"] * 3


def test_a_chaos_run_s_tables_come_from_report_json(tmp_path):
    run_dir = make_run(tmp_path)
    chaos = {
        "baseline_dir": None,
        "faults": [
            {
                "t": 4.0,
                "fault": "kill",
                "peers": ["peer-1"],
                "groups": [],
                "detected_s": 0.5,
                "declared_dead_s": 1.5,
                "back_s": 2.5,
                "whole_s": 3.0,
                "stall": {"longest_gap_s": 0.7, "rate_ratio": 0.95},
            },
            {
                "t": 7.0,
                "fault": "partition",
                "peers": [],
                "groups": [["peer-0"], ["peer-1"]],
                "detected_s": None,
                "split_s": None,
                "stall": {},
            },
            {
                "t": 9.0,
                "fault": "pause",
                "peers": ["peer-9"],
                "groups": [],
                "failed": "no such peer",
            },
        ],  # fmt: skip
        "quality": {
            "metric": "accuracy",
            "unit": "pp",
            "peers": [
                {
                    "name": "peer-0",
                    "status": "finished",
                    "restarts": 0,
                    "value": 0.9,
                    "baseline": None,
                    "delta": None,
                    "behind_unrestarted": None,
                }
            ],
            "consensus": 0.915,
            "baseline_consensus": None,
            "consensus_delta": None,
        },  # fmt: skip
        "invariants": {"converged": {"ok": True}, "finite": {"ok": False}},
    }
    (run_dir / "report.json").write_text(json.dumps(chaos))
    out = tmp_path / "tables.html"
    out.write_text(page.page(load(run_dir), []))  # the tables alone: no plots to draw
    doc = parse(out)
    faults = doc.tables["faults"]
    assert faults[1] == ["4.0", "kill", "peer-1", "0.50", "1.50", "-", "2.50", "3.00", "0.70",
                         "0.95"]  # fmt: skip
    assert faults[2][:4] == ["7.0", "partition", "peer-0 / peer-1", "-"]
    assert faults[3][:4] == ["9.0", "pause", "peer-9", "no such peer"]
    quality = doc.tables["quality"]
    assert quality[0][3:6] == ["accuracy", "baseline", "delta (pp)"]
    assert quality[1][:4] == ["peer-0", "finished", "0", "0.9000"]
    assert quality[2][0] == "consensus" and quality[2][3] == "0.9150"
    text = out.read_text()
    assert re.search(r"converged: <span class=\"ok\">holds", text)
    assert re.search(r"finite: <span class=\"fail\">FAILS", text)


def test_membership_spans_follow_each_observer_s_view(tmp_path):
    need_matplotlib()
    from trainer.report.plots import membership_spans

    run = load(make_run(tmp_path, summary=False))
    spans = membership_spans(run)
    # peer-0 saw peer-1 alive, suspect, dead, then alive again after its restart.
    assert [s for _, _, s in spans[("peer-0", "peer-1")]] == ["alive", "suspect", "dead", "alive"]
    assert spans[("peer-0", "peer-1")][1][:2] == pytest.approx((4.5, 5.5))
    # peer-1's own view ends when it is killed (4.05) and starts empty when it listens again.
    first, second = spans[("peer-1", "peer-0")]
    assert first[1] == pytest.approx(4.05) and second[0] == pytest.approx(6.2)


def test_a_restarted_peer_s_lines_break_over_its_downtime(tmp_path):
    need_matplotlib()
    from trainer.report.plots import series

    run = load(make_run(tmp_path, summary=False))
    by_t, _ = series(run, ("progress",), lambda e: e.get("loss"))[1]
    gaps = [i for i, (t, _) in enumerate(by_t) if t != t]
    assert len(gaps) == 1  # peer-1 has two lives
    assert by_t[gaps[0] - 1][0] < 4.0 < 6.5 <= by_t[gaps[0] + 1][0]


def test_eval_events_are_placed_by_the_samples_their_step_stands_for(tmp_path):
    need_matplotlib()
    from trainer.report.plots import series

    run = load(make_run(tmp_path, summary=False))
    _, by_samples = series(run, ("eval",), lambda e: (e.get("metrics") or {}).get("accuracy"))[0]
    # eval events carry a step, not samples: 32 samples per step, as the progress lines say
    assert by_samples[0] == (32 * 20, pytest.approx(0.55))


def test_rates_skip_a_counter_that_started_again():
    need_matplotlib()
    from trainer.report.plots import rates

    points = [(0.0, 0), (1.0, 10), (2.0, 20), (3.0, 2), (4.0, 12), (5.0, 22)]
    got = rates(points, window=1.0)
    assert [r for _, r in got] == [10, 10, 10, 10]  # never the drop at t=3
    gap = float("nan")
    got = rates([(0.0, 0), (1.0, 10), (gap, gap), (5.0, 10), (6.0, 30)], window=1.0)
    assert got[0] == (0.5, 10) and got[2] == (5.5, 20)  # nothing across the downtime
    assert all(x != x for x in got[1])  # but a break in the line


def test_cells_escape_what_comes_from_files():
    assert page.table(["a"], [["<b>&"]]) == (
        "<table>\n<tr><th>a</th></tr>\n<tr><td>&lt;b&gt;&amp;</td></tr>\n</table>"
    )
    assert page.cell(None) == "-" and page.cell(0.12345, 3) == "0.123" and page.cell(3) == "3"


def test_a_folder_without_peer_events_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "peer-0").mkdir()
    rc = cli.main(["report", str(tmp_path)])
    assert_one_line_error(rc, capsys.readouterr().err, f"{tmp_path}: no peer events found")
    rc = cli.main(["report", str(tmp_path / "nope")])
    assert_one_line_error(rc, capsys.readouterr().err, "no such folder")


def test_without_matplotlib_report_says_how_to_install_and_a_run_only_warns(
    tmp_path, capsys, monkeypatch
):
    run_dir = make_run(tmp_path, summary=False)
    real = run_report.importlib.util.find_spec
    monkeypatch.setattr(
        run_report.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    rc = cli.main(["report", str(run_dir)])
    assert_one_line_error(rc, capsys.readouterr().err, "pip install 'gossip-train[report]'")
    assert run_report.write_after_run(run_dir) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gossip-train: warning: no report.html: the report needs matplotlib: "
        "pip install 'gossip-train[report]'"
    ]
    assert not (run_dir / "report.html").exists()
