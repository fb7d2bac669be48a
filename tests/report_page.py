"""Shared by the report's tests (tests/unit, tests/real): a synthetic run folder, a parser
of report.html's images and tables, and the checks that every plot is drawn and that the
peer table says what summary.json says."""

import base64
import io
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

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
