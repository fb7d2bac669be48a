"""The report's plots: one function per figure, each a matplotlib ``Figure`` of a run.

Figures are built with ``matplotlib.figure.Figure`` and never through pyplot: no global
state, no GUI backend, nothing to close, and the same code works in a launcher and in tests.
Every function draws something, a line of text at least, for a run that lacks its data:
the page keeps the same sections whatever the run did.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: PNGs only, whatever MPLBACKEND says

from matplotlib.axes import Axes  # noqa: E402 - after the backend is chosen
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .run import MEMBER_STATES, RunFiles  # noqa: E402

Point = tuple[float, float]
GAP: Point = (math.nan, math.nan)
STATE_COLOURS = {
    "alive": "#2ca02c",
    "suspect": "#ff7f0e",
    "dead": "#d62728",
    "left": "#9e9e9e",
}
# Rates are differences of counters over at least this many seconds: progress lines come
# every half second, and a rate over one interval is mostly noise.
RATE_WINDOW = 2.0
DPI = 96


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def colour(i: int) -> str:
    """The peer's colour, the same in every plot."""
    return f"C{i % 10}"


def _figure(ncols: int, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(5.2 * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.ticklabel_format(useOffset=False)  # seconds read as seconds, not "+1.229e1"
    return fig, axes


def _note(ax: Axes, text: str) -> None:
    """Say why an axes is empty, in its middle."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555")


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def series(
    run: RunFiles, kinds: Sequence[str], value: Callable[[dict[str, Any]], Any]
) -> list[tuple[list[Point], list[Point]]]:
    """Per peer: (time, value) and (samples, value) of its events of ``kinds`` that have
    a finite value (a peer that never reported has two empty lists). Lives are separated
    by a (nan, nan) point: a line breaks there instead of bridging the peer's downtime."""
    out = []
    for p in run.peers:
        by_t: list[Point] = []
        by_samples: list[Point] = []
        per_step: float | None = None  # samples per step, from this life's progress lines
        for e in p.of("listening", "progress", *kinds):
            kind = e.get("kind")
            if kind == "listening":
                per_step = None
                for pts in (by_t, by_samples):
                    if pts and not math.isnan(pts[-1][0]):
                        pts.append(GAP)
                continue
            if kind == "progress":
                per_step = _per_step(e) or per_step
            if kind not in kinds:
                continue
            v = _number(value(e))
            if v is None:
                continue
            by_t.append((run.t(e), v))
            s = _samples(e, per_step)
            if s is not None:
                by_samples.append((s, v))
        out.append((by_t, by_samples))
    return out


def _per_step(e: dict[str, Any]) -> float | None:
    samples, step = _number(e.get("samples")), _number(e.get("step"))
    return samples / step if samples is not None and step else None


def _samples(e: dict[str, Any], per_step: float | None) -> float | None:
    """Samples seen at ``e``: its own count, else (``eval`` events say only their step)
    the step times the samples per step its progress lines showed."""
    found = _number(e.get("samples"))
    step = _number(e.get("step"))
    if found is None and step is not None and per_step is not None:
        found = step * per_step
    return found


def _plot_peers(
    ax: Axes, run: RunFiles, points: Sequence[list[Point]], marker: str = "", **kw: Any
) -> bool:
    """One line per peer that has points; False if none had any."""
    drawn = False
    for i, (p, pts) in enumerate(zip(run.peers, points, strict=True)):
        if any(not math.isnan(y) for _, y in pts):
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=marker, color=colour(i), label=p.name, **kw)
            drawn = True
    return drawn


def _consensus_line(ax: Axes, value: float | None, label: str) -> None:
    if value is not None:
        ax.axhline(value, color="black", linestyle="--", linewidth=1.2, label=label)


def time_span(run: RunFiles) -> tuple[float, float]:
    """Seconds from just before the first peer event to the run's last event: the
    launcher's set-up (loading torch, say) before that is nobody's training."""
    first = min((run.t(p.events[0]) for p in run.peers if p.events), default=0.0)
    return max(0.0, first - 0.5), max(run.end - run.t0, first + 1.0)


def _metric_of(metric: str) -> Callable[[dict[str, Any]], Any]:
    return lambda e: (e.get("metrics") or {}).get(metric)


def metric_figure(run: RunFiles) -> Figure:
    """The headline metric of every peer (its ``eval`` events, and its final one) against
    time and against samples seen, and the consensus model's as a horizontal line."""
    metric = run.metric
    data = series(run, ("eval", "finished"), _metric_of(metric))
    cons = _number((run.consensus or {}).get(metric))
    fig, axes = _figure(2)
    for ax, k, xlabel in zip(axes, (0, 1), ("seconds", "samples seen"), strict=True):
        drawn = _plot_peers(ax, run, [d[k] for d in data], marker="o", markersize=3)
        _consensus_line(ax, cons, f"consensus {cons:.4f}" if cons is not None else "")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        if drawn or cons is not None:
            ax.legend(fontsize="small")
        else:
            _note(ax, f"no peer reported {metric}")
        if not any(p.of("eval") for p in run.peers):
            ax.set_title("final values only: --eval-every STEPS draws curves", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} (evaluation set)")
    return fig


def loss_figure(run: RunFiles) -> Figure:
    """Every peer's training loss (its ``progress`` events) against time and samples seen;
    the consensus model's evaluation loss, when measured, as a horizontal line."""
    data = series(run, ("progress",), lambda e: e.get("loss"))
    cons = _number((run.consensus or {}).get("loss"))
    fig, axes = _figure(2)
    for ax, k, xlabel in zip(axes, (0, 1), ("seconds", "samples seen"), strict=True):
        drawn = _plot_peers(ax, run, [d[k] for d in data], linewidth=1)
        _consensus_line(ax, cons, "consensus (eval loss)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        if drawn:
            ax.legend(fontsize="small")
        else:
            _note(ax, "no progress lines with a loss")
        ax.grid(alpha=0.3)
    fig.suptitle("training loss")
    return fig


def disagreement_figure(run: RunFiles) -> Figure:
    """How far apart the peers are: each progress line's mean ||theirs - ours|| / ||ours||
    over the exchanges since the previous line, per peer, on a log scale."""
    data = series(run, ("progress",), lambda e: e.get("disagreement"))
    fig, (ax,) = _figure(1, height=3.2)
    fig.set_figwidth(10.4)
    positive = [[(t, d) for t, d in by_t if math.isnan(d) or d > 0] for by_t, _ in data]
    if _plot_peers(ax, run, positive, marker=".", linewidth=1):
        ax.set_yscale("log")
        ax.legend(fontsize="small")
    else:
        _note(ax, "no exchange reported a distance (a run from before 'disagreement')")
    ax.set_xlabel("seconds")
    ax.set_ylabel("relative distance to partner")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle("disagreement between peers")
    return fig


def rates(points: Sequence[Point], window: float = RATE_WINDOW) -> list[Point]:
    """(time, per second) of a counter sampled at ``points``, over spans of at least
    ``window`` seconds (less in a run too short for a few of those). A counter that goes
    down started again (a new life), as does a gap: no span crosses one, and the line
    breaks there."""
    out: list[Point] = []
    times = [t for t, _ in points if not math.isnan(t)]
    if not times:
        return out
    window = min(window, max((times[-1] - times[0]) / 8, 0.4))
    t_a, v_a = points[0]
    for t, v in points[1:]:
        if math.isnan(t) or math.isnan(t_a) or v < v_a:
            if math.isnan(t) and out and not math.isnan(out[-1][0]):
                out.append(GAP)
            t_a, v_a = t, v
            continue
        if t - t_a >= window:
            out.append(((t + t_a) / 2, (v - v_a) / (t - t_a)))
            t_a, v_a = t, v
    return out


def _bytes_by_kind(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Kind -> MB sent by each peer (kinds in the order the peers report them)."""
    kinds: dict[str, list[float]] = {}
    for i, r in enumerate(records):
        for kind, ways in (r.get("bytes") or {}).items():
            row = kinds.setdefault(str(kind), [0.0] * len(records))
            row[i] = float((ways or {}).get("sent") or 0) / 1e6
    return kinds


def traffic_figure(run: RunFiles) -> Figure:
    """Exchanges per second and bytes per second, out and in, per peer (from progress
    counters), and each peer's bytes sent by kind (weights, membership, control)."""
    fig, axes = _figure(3)
    ex = series(run, ("progress",), lambda e: e.get("exchanges"))
    out = series(run, ("progress",), lambda e: e.get("bytes_sent"))
    into = series(run, ("progress",), lambda e: e.get("bytes_received"))
    drawn = _plot_peers(axes[0], run, [rates(d[0]) for d in ex], linewidth=1)
    axes[0].set_ylabel("exchanges / s")
    mb = [[(t, r / 1e6) for t, r in rates(d[0])] for d in out]
    drawn = _plot_peers(axes[1], run, mb, linewidth=1) or drawn
    mb_in = [[(t, r / 1e6) for t, r in rates(d[0])] for d in into]
    for i, pts in enumerate(mb_in):
        if any(not math.isnan(y) for _, y in pts):
            xs, ys = zip(*pts, strict=True)
            axes[1].plot(xs, ys, color=colour(i), linestyle=":", linewidth=1)
    axes[1].set_ylabel("MB / s (solid out, dotted in)")
    for ax in axes[:2]:
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            _note(ax, "no progress lines")
    records = run.records()
    kinds = _bytes_by_kind(records)
    ax = axes[2]
    if kinds:
        bottom = [0.0] * len(records)
        for kind, sent in kinds.items():
            ax.bar([r["name"] for r in records], sent, bottom=bottom, label=kind)
            bottom = [a + b for a, b in zip(bottom, sent, strict=True)]
        ax.set_ylabel("MB sent")
        ax.legend(fontsize="small")
    else:
        _note(ax, "no bytes by kind reported")
    ax.set_title("bytes sent by kind", fontsize="medium")
    fig.suptitle("traffic")
    return fig


def screening_figure(run: RunFiles) -> Figure:
    """Updates a peer refused or clipped: refusals (``refused`` events, cumulative, per
    peer that refused) over time with quarantines marked, and each peer's totals."""
    fig, axes = _figure(2)
    ax = axes[0]
    drawn = False
    start, end = time_span(run)
    for i, p in enumerate(run.peers):
        refused = p.of("refused")
        if refused:
            # From nought at the start to the total at the end: one refusal is a step too.
            ts = [start, *(run.t(e) for e in refused), end]
            counts = [0, *range(1, len(refused) + 1), len(refused)]
            ax.step(ts, counts, where="post", color=colour(i), label=p.name)
            drawn = True
        for e in p.of("quarantined"):
            ax.axvline(run.t(e), color=colour(i), linestyle=":", linewidth=1)
    if drawn:
        ax.legend(fontsize="small", title="refused by")
    else:
        _note(ax, "no update was refused")
    ax.set_xlim(start, end)
    ax.set_xlabel("seconds (dotted: a quarantine began)")
    ax.set_ylabel("refused updates")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    records = run.records()
    names = [r["name"] for r in records]
    rejected = [int(r.get("rejected_updates") or 0) for r in records]
    clipped = [int((r.get("screening") or {}).get("clipped") or 0) for r in records]
    ax = axes[1]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], rejected, width=0.4, label="rejected", color="#d62728")
    ax.bar([x + 0.2 for x in xs], clipped, width=0.4, label="clipped", color="#ff7f0e")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("updates (whole run)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    if not any(rejected) and not any(clipped):
        _note(ax, "none rejected or clipped")
    fig.suptitle("rejected and clipped updates")
    return fig


Span = tuple[float, float, str]


def membership_spans(run: RunFiles) -> dict[tuple[str, str], list[Span]]:
    """(observer, subject) -> the spans (start, end, state) in which the observer saw the
    subject in that state. An observer knows nothing while it is down: its view ends when
    it exits and starts empty when it listens again."""
    exits = [e for e in run.launcher if e.get("kind") == "exited"]
    spans: dict[tuple[str, str], list[Span]] = {}
    for p in run.peers:
        mine = sorted(
            [*p.events, *(e for e in exits if e.get("peer") == p.name)],
            key=lambda e: e.get("ts", 0),
        )
        for subject, found in _observer_spans(run, mine).items():
            spans[(p.name, subject)] = found
    return spans


def _observer_spans(run: RunFiles, events: Sequence[dict[str, Any]]) -> dict[str, list[Span]]:
    """Subject -> spans, replaying one observer's events (and its exits) in order."""
    out: dict[str, list[Span]] = {}
    current: dict[str, tuple[float, str]] = {}

    def close(subject: str, t: float) -> None:
        start, state = current.pop(subject)
        out.setdefault(subject, []).append((start, t, state))

    for e in events:
        t, kind = run.t(e), e.get("kind")
        if kind in ("listening", "exited", "finished", "error"):
            for subject in list(current):
                close(subject, t)
        elif kind in MEMBER_STATES and isinstance(e.get("subject"), str):
            subject = str(e["subject"])
            if subject in current:
                close(subject, t)
            current[subject] = (t, MEMBER_STATES[str(kind)])
    # Still open at the end (a peer killed for good): until the run's last event.
    end = max(run.t(events[-1]) if events else 0.0, run.end - run.t0)
    for subject in list(current):
        close(subject, end)
    return out


def _fault_label(e: dict[str, Any]) -> str:
    what = str(e.get("fault") or "?")
    if e.get("groups"):
        target = "|".join(",".join(str(p).removeprefix("peer-") for p in g) for g in e["groups"])
    else:
        target = ",".join(str(p) for p in e.get("peers") or [])
    return f"{what} {target}".strip()


def membership_figure(run: RunFiles) -> Figure:
    """Each peer's state as every other peer saw it (one row per subject and observer),
    with injected faults (red lines), exits (x) and restarts (triangles) marked."""
    names = run.names
    rows = [(s, o) for s in names for o in names if o != s]
    fig = Figure(figsize=(10.4, 1.2 + 0.28 * max(len(rows), 2)), layout="constrained")
    ax = fig.add_subplot()
    spans = membership_spans(run)
    for y, (subject, observer) in enumerate(rows):
        for state in STATE_COLOURS:
            bars = [(a, b - a) for a, b, s in spans.get((observer, subject), []) if s == state]
            if bars:
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=STATE_COLOURS[state])
    row_of: dict[str, list[int]] = {}
    for y, (subject, _) in enumerate(rows):
        row_of.setdefault(subject, []).append(y)
    for e in run.launcher:
        kind, peer = e.get("kind"), e.get("peer")
        if kind in ("exited", "restarted") and peer in row_of:
            ys = row_of[str(peer)]
            marker = "x" if kind == "exited" else "^"
            ax.scatter([run.t(e)] * len(ys), ys, marker=marker, color="black", s=22, zorder=3)
    for e in run.faults():
        t = run.t(e)
        ax.axvline(t, color="#b00020", linewidth=1, linestyle="--", zorder=2)
        # Above the rows, slanted: faults close together stay readable.
        ax.text(
            t,
            1.01,
            _fault_label(e),
            transform=ax.get_xaxis_transform(),
            rotation=30,
            va="bottom",
            ha="left",
            fontsize="x-small",
            color="#b00020",
        )
    ax.set_yticks(range(len(rows)), [f"{s} seen by {o}" for s, o in rows], fontsize="x-small")
    ax.set_ylim(-0.6, max(len(rows), 1) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(*time_span(run))
    ax.set_xlabel("seconds (x: exited; triangle: restarted; dashed: a fault)")
    ax.grid(alpha=0.3, axis="x")
    legend = [Patch(color=c, label=s) for s, c in STATE_COLOURS.items()]
    ax.legend(handles=legend, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if not rows:
        _note(ax, "one peer: nobody to see")
    fig.suptitle("membership as each peer saw the others")
    return fig


# The report's plots in page order: (id, title, function).
FIGURES: list[tuple[str, str, Callable[[RunFiles], Figure]]] = [
    ("metric", "Headline metric", metric_figure),
    ("loss", "Training loss", loss_figure),
    ("disagreement", "Disagreement between peers", disagreement_figure),
    ("traffic", "Exchanges and bytes", traffic_figure),
    ("screening", "Rejected and clipped updates", screening_figure),
    ("membership", "Membership timeline", membership_figure),
]
