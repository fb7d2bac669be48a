"""The run report (trainer.report) on synthetic run folders: every plot is a real PNG with
something drawn, the tables say what summary.json says, and bad folders are one-line errors."""

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from trainer import cli
from trainer import report as run_report
from trainer.report import page
from trainer.report.run import load

T0 = 1_700_000_000.0
NAMES = ["peer-0", "peer-1", "peer-2"]
PLOTS = {"metric", "loss", "disagreement", "traffic", "screening", "membership"}


def need_matplotlib():
    """The drawing tests need the report extra: skipped without it, a failure under CI."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("matplotlib is missing (the dev extra has it; required under CI=true)")
        pytest.skip("matplotlib not installed")


def ev(t, kind, **fields):
    return {"ts": T0 + t, "kind": kind, **fields}


def write_jsonl(path, events):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def peer_events(i, name):
    """A peer's life: listen, meet the others, train with progress and eval lines; peer-1 is
    killed at t=4 and comes back at t=6; peer-0 refuses an update from peer-2."""
    others = [n for n in NAMES if n != name]
    out = [ev(0.5, "listening", peer=name, name=name)]
    out += [ev(0.6, "joined", peer=name, subject=o) for o in others]
    out.append(ev(0.7, "started", peer=name, steps=100))
    lives = [(0.8, 4.0)] if name == "peer-1" else [(0.8, 10.0)]
    if name == "peer-1":
        lives.append((6.5, 10.0))
    sent = 0
    for start, end in lives:
        if start > 1:
            out.append(ev(start - 0.4, "listening", peer=name, name=name))
            out += [ev(start - 0.3, "joined", peer=name, subject=o) for o in others]
        step = 0
        t = start
        while t < end:
            step += 5
            sent += 100_000
            out.append(
                ev(
                    t,
                    "progress",
                    peer=name,
                    step=step,
                    samples=32 * step,
                    loss=2.0 / step,
                    exchanges=step // 5,
                    bytes_sent=sent,
                    bytes_received=sent // 2,
                    bytes={
                        "weights": {"sent": sent - 500, "received": sent // 2},
                        "membership": {"sent": 500, "received": 400},
                    },
                    disagreement=0.5 / step,
                )  # fmt: skip
            )
            if step % 20 == 0:
                out.append(
                    ev(
                        t,
                        "eval",
                        peer=name,
                        step=step,
                        samples=32 * step,
                        metrics={"accuracy": 0.5 + step / 400, "loss": 1.0 / step},
                    )  # fmt: skip
                )
            t += 0.5
    if name != "peer-1":
        out += [ev(4.5, "suspect", peer=name, subject="peer-1")]
        out += [ev(5.5, "declared_dead", peer=name, subject="peer-1")]
        out += [ev(6.4, "alive", peer=name, subject="peer-1")]
    if name == "peer-0":
        out.append(ev(3.0, "refused", peer=name, subject="peer-2", reason="too far"))
        out.append(ev(3.5, "quarantined", peer=name, subject="peer-2", seconds=5))
    out.append(ev(10.2, "finished", peer=name, status="finished", steps=step, samples=32 * step,
                  metrics={"accuracy": 0.9 + i / 100, "loss": 0.3}, exchanges=step // 5,
                  bytes_sent=sent, bytes_received=sent // 2, rejected_updates=int(i == 0),
                  bytes={"weights": {"sent": sent - 500, "received": sent // 2},
                         "membership": {"sent": 500, "received": 400}},
                  screening={"clipped": 2 * i, "accepted": 10}, wall_seconds=9.7))  # fmt: skip
    return sorted(out, key=lambda e: e["ts"])


LAUNCHER = [
    ev(0.0, "spawned", peer="peer-0", pid=1),
    ev(0.1, "spawned", peer="peer-1", pid=2),
    ev(0.2, "spawned", peer="peer-2", pid=3),
    ev(4.0, "fault", fault="kill", peers=["peer-1"]),
    ev(4.05, "exited", peer="peer-1", returncode=-9, chaos=True),
    ev(6.0, "spawned", peer="peer-1", pid=4),
    ev(6.0, "restarted", peer="peer-1", restarts=1),
    ev(7.0, "fault", fault="partition", groups=[["peer-0"], ["peer-1", "peer-2"]]),
    ev(8.0, "fault", fault="heal"),
]


def make_run(tmp_path: Path, summary: bool = True, run_json: bool = True) -> Path:
    run_dir = tmp_path / "run"
    for i, name in enumerate(NAMES):
        write_jsonl(run_dir / name / "events.jsonl", peer_events(i, name))
    write_jsonl(run_dir / "launcher.jsonl", LAUNCHER)
    if run_json:
        peers = [
            {"name": n, "addr": f"127.0.0.1:{7000 + i}", "dir": n} for i, n in enumerate(NAMES)
        ]
        (run_dir / "run.json").write_text(json.dumps({"ts": T0, "peers": peers}))
    if summary:
        from trainer.launch import summary as run_summary

        built = run_summary.build(run_dir, consensus=False)
        built["consensus_metrics"] = {"accuracy": 0.915, "loss": 0.29}
        run_summary.write_json(run_dir / "summary.json", built)
    return run_dir


class Page(HTMLParser):
    """The images (data-plot -> src) and table rows (class -> rows of cell texts)."""

    def __init__(self):
        super().__init__()
        self.images = {}
        self.tables = {}
        self.scripts = 0
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a["data-plot"]] = a["src"]
        elif tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table is not None:
            self._table[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text())
    return p


def assert_drawn_png(src: str) -> None:
    """A base64 PNG with more than one distinct pixel value: something was drawn."""
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))
    assert img.format == "PNG"
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1


def assert_peer_table_matches(rows, summary):
    head, *body = rows
    assert head[:5] == ["peer", "status", "restarts", "steps", "exchanges"]
    metric = head[5]
    assert [r[0] for r in body] == [p["name"] for p in summary["peers"]]
    for row, p in zip(body, summary["peers"], strict=True):
        assert row[1] == p["status"]
        assert int(row[2]) == p["restarts"] and int(row[3]) == p["steps"]
        assert int(row[4]) == p["exchanges"]
        assert float(row[5]) == pytest.approx(p["metrics"][metric], abs=5e-5)
        assert float(row[6]) == pytest.approx(p["bytes_sent"] / 1e6, abs=5e-3)
        assert float(row[7]) == pytest.approx(p["bytes_received"] / 1e6, abs=5e-3)
        assert float(row[8]) == pytest.approx(p["wall_seconds"], abs=0.05)


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


def test_rates_skip_a_counter_that_started_again():
    need_matplotlib()
    from trainer.report.plots import rates

    points = [(0.0, 0), (1.0, 10), (2.0, 20), (3.0, 2), (4.0, 12), (5.0, 22)]
    got = rates(points, window=1.0)
    assert [r for _, r in got] == [10, 10, 10, 10]  # never the drop at t=3


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
