"""RUN_DIR/report.html: a run's plots and tables on one self-contained page.

``gossip-train local`` and ``gossip-train run`` write it at the end; ``gossip-train report
RUN_DIR`` writes it for any run folder, one rebuilt from event files included. The plots
need matplotlib, an optional extra (``pip install 'gossip-train[report]'``); everything
else here is the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..runtime import UserError
from .run import ReportError, load

__all__ = ["MissingMatplotlib", "ReportError", "need_matplotlib", "write_after_run", "write_html"]

REPORT_FILE = "report.html"
INSTALL_HINT = "pip install 'gossip-train[report]'"


class MissingMatplotlib(UserError):
    """matplotlib is not installed: the report cannot be drawn."""


def need_matplotlib() -> None:
    """Raise ``MissingMatplotlib`` (one line: how to install it) unless it can be imported."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingMatplotlib(f"the report needs matplotlib: {INSTALL_HINT}")


def write_html(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw every plot of ``run_dir`` and write the page (atomically) to ``output``
    (default RUN_DIR/report.html); returns where it went."""
    run = load(run_dir)
    need_matplotlib()
    from . import page, plots

    figures = plots.FIGURES
    out = Path(output) if output is not None else run.run_dir / REPORT_FILE
    # One line: drawing takes a few seconds, and the launcher's table is already printed.
    print(
        f"report: drawing {len(figures)} plots of {len(run.peers)} peers -> {out}",
        file=sys.stderr,
        flush=True,
    )
    images = [(pid, title, plots.png(draw(run))) for pid, title, draw in figures]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page.page(run, images), encoding="utf-8")
    os.replace(tmp, out)
    return out


def write_after_run(run_dir: Path) -> Path | None:
    """The end of `local` / `run`: the report, or one warning line saying why not. A run
    that trained must not fail over its plots."""
    try:
        return write_html(run_dir)
    except MissingMatplotlib as exc:
        print(f"gossip-train: warning: no report.html: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the run's results are already on disk
        text = str(exc).strip().splitlines()
        why = text[0] if text else type(exc).__name__
        print(f"gossip-train: warning: no report.html: {why}", file=sys.stderr)
    return None
