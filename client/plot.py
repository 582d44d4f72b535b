"""The ``aqimodels history --plot`` chart: a metric per version over time, production periods shaded.

matplotlib is optional (``pip install 'aqimodels[plot]'``) and imported only here, with the Agg
backend, so the CLI needs no display.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client.errors import FailedPreconditionError
from aqimodels.client.render import production_spans, to_datetime

_COLORS = ("#4c9be8", "#f0a04b", "#6cc070", "#c77dd6", "#e86a6a", "#5bc8c8")


def plot_history(name: str, resp: pb.GetModelHistoryResponse, path: str | Path,
                 now: datetime | None = None) -> Path:
    """Writes a PNG of ``resp.metric`` per version (at its registration time) with production periods shaded.

    Raises:
        FailedPreconditionError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        raise FailedPreconditionError("--plot needs matplotlib: pip install 'aqimodels[plot]'") from None
    metric = resp.metric or "rmse"
    now = now or datetime.now(tz=UTC)
    points = [(to_datetime(p.create_time), p.version, p.metrics[metric]) for p in resp.points
              if metric in p.metrics and not math.isnan(p.metrics[metric])]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    try:
        spans = production_spans(resp)
        for i, (version, periods) in enumerate(sorted(spans.items(), key=lambda kv: kv[1][0][0])):
            color = _COLORS[i % len(_COLORS)]
            for j, (start, end) in enumerate(periods):
                ax.axvspan(mdates.date2num(start), mdates.date2num(end or now),  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
                           color=color, alpha=0.22, lw=0,
                           label=f"v{version} in production" if j == 0 else None)
        value_of = {v: y for _, v, y in points}
        first = True
        for version, periods in spans.items():
            if version not in value_of:
                continue
            for start, end in periods:  # the metric of the version serving at each moment
                ax.hlines(value_of[version], mdates.date2num(start),  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
                          mdates.date2num(end or now), colors="#1a5fb4", lw=3,  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
                          label=f"{metric} in production" if first else "_nolegend_", zorder=2)
                first = False
        if points:
            xs, _, ys = zip(*points, strict=True)
            ax.plot(xs, ys, color="#333333", lw=1.2, marker="o", ms=6, zorder=3, label=f"{metric} per version")
            for x, v, y in points:
                ax.annotate(f"v{v}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no version has the metric {metric!r}", transform=ax.transAxes, ha="center")
        ax.set_title(f"{name}: {metric} per version, production periods shaded")
        ax.set_xlabel("time (UTC)")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
