"""report.html: one self-contained page (inline PNGs, inline CSS, no script, no network)."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import Any

from .run import RunFiles

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.ok { color: #1b7f2a; } .fail { color: #b00020; }
p.note { color: #555; font-size: 0.9em; }
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def cell(x: Any, digits: int = 2) -> str:
    """A table cell's text: '-' for nothing, floats to ``digits`` places."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; every cell is escaped (peer names and reasons come from files)."""
    attr = f' class="{esc(cls)}"' if cls else ""
    out = [f"<table{attr}>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def image(plot_id: str, title: str, data: bytes) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f'<h2 id="{esc(plot_id)}">{esc(title)}</h2>\n'
        f'<img data-plot="{esc(plot_id)}" alt="{esc(title)}" src="data:image/png;base64,{b64}">'
    )


def mb(n: Any) -> str:
    return cell(None if n is None else int(n) / 1e6)


def peer_table(run: RunFiles) -> str:
    """One row per peer, every number as summary.json has it (rebuilt from events without)."""
    metric = run.metric
    rows = []
    for r in run.records():
        rows.append(
            [
                r.get("name"),
                r.get("status"),
                r.get("restarts", 0),
                r.get("steps"),
                r.get("exchanges"),
                cell((r.get("metrics") or {}).get(metric), 4),
                mb(r.get("bytes_sent")),
                mb(r.get("bytes_received")),
                cell(r.get("wall_seconds"), 1),
            ]
        )
    head = ["peer", "status", "restarts", "steps", "exchanges", metric, "MB out", "MB in"]
    return table([*head, "seconds"], rows, "peers")


def headline(run: RunFiles) -> str:
    s = run.summary or {}
    net = (s.get("network") or {}).get("mode", "?")
    parts = [f"{len(run.peers)} peers", f"network {net}"]
    if s.get("wall_seconds") is not None:
        parts.append(f"wall time {float(s['wall_seconds']):.1f} s")
    cons = run.consensus or {}
    if cons:
        shown = ", ".join(f"{k} {cell(v, 4)}" for k, v in cons.items())
        parts.append(f"consensus model: {shown}")
    if run.summary is None:
        parts.append("no summary.json: peer records rebuilt from their events")
    return f"<p>{esc('; '.join(parts))}.</p>"


# -- a chaos run's report.json ------------------------------------------------------------


def _target(f: dict[str, Any]) -> str:
    if f.get("groups"):
        return " / ".join(",".join(g) for g in f["groups"])
    return ",".join(f.get("peers") or [])


def faults_table(report: dict[str, Any]) -> str:
    keys = ("detected_s", "declared_dead_s", "split_s", "back_s", "whole_s")
    rows = []
    for f in report.get("faults") or []:
        first = [cell(f.get("t"), 1), f.get("fault"), _target(f)]
        if f.get("failed") or f.get("skipped"):
            rows.append([*first, f.get("failed") or f.get("skipped"), *[""] * 6])
            continue
        s = f.get("stall") or {}
        rows.append(
            [
                *first,
                *(cell(f.get(k)) for k in keys),
                cell(s.get("longest_gap_s")),
                cell(s.get("rate_ratio")),
            ]
        )
    head = ["t", "fault", "target", "detected", "dead", "split", "back", "whole", "stall"]
    return table([*head, "rate"], rows, "faults")


def quality_table(report: dict[str, Any]) -> str:
    q = report.get("quality") or {}
    metric, unit = q.get("metric", "metric"), q.get("unit") or ""
    u = f" ({unit})" if unit else ""
    rows = [
        [
            p.get("name"),
            p.get("status"),
            p.get("restarts", 0),
            cell(p.get("value"), 4),
            cell(p.get("baseline"), 4),
            cell(p.get("delta")),
            cell(p.get("behind_unrestarted")),
        ]
        for p in q.get("peers") or []
    ]
    rows.append(
        [
            "consensus",
            "",
            "",
            cell(q.get("consensus"), 4),
            cell(q.get("baseline_consensus"), 4),
            cell(q.get("consensus_delta")),
            "",
        ]
    )
    head = ["peer", "status", "restarts", metric, "baseline", f"delta{u}"]
    return table([*head, f"behind unrestarted{u}"], rows, "quality")


def invariants_list(report: dict[str, Any]) -> str:
    inv = report.get("invariants") or {}
    items = []
    for name, v in inv.items():
        ok = bool((v or {}).get("ok"))
        mark = '<span class="ok">holds</span>' if ok else '<span class="fail">FAILS</span>'
        items.append(f"<li>{esc(name.replace('_', ' '))}: {mark}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def chaos_section(report: dict[str, Any]) -> str:
    base = report.get("baseline_dir") or "none given"
    return "\n".join(
        [
            '<h2 id="faults">Faults</h2>',
            '<p class="note">Seconds after each fault. detected: first suspect or dead of the '
            "target by another peer; whole: membership whole again; stall: the others' "
            "longest gap without a step in the next 10 s; rate: their step rate after / "
            "before. From report.json (report.md has the same).</p>",
            faults_table(report),
            f'<h2 id="quality">{esc((report.get("quality") or {}).get("metric", "metric"))} '
            "against the baseline</h2>",
            f'<p class="note">baseline (no faults, same seed): {esc(base)}</p>',
            quality_table(report),
            '<h2 id="invariants">Invariants</h2>',
            invariants_list(report),
        ]
    )


def page(run: RunFiles, images: Sequence[tuple[str, str, bytes]]) -> str:
    title = f"gossip-train run {run.run_dir.name}"
    body = [
        f"<h1>{esc(title)}</h1>",
        headline(run),
        '<h2 id="peers">Peers</h2>',
        peer_table(run),
        *(image(pid, t, data) for pid, t, data in images),
    ]
    if run.chaos is not None:
        body.append(chaos_section(run.chaos))
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
