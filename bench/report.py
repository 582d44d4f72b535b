"""Section 4 (training, read from bench/results/training_*.json) and the BENCHMARKS.md table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common

HORIZONS = (1, 6, 24)


def load(name: str) -> dict[str, Any] | None:
    path = common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def med(d: Any, *path: str) -> float | None:
    v = get(d, *path)
    return v.get("median") if isinstance(v, dict) else v


def training_summary(label: str) -> dict[str, Any] | None:
    d = load(f"training_{label}")
    if d is None:
        return None
    models = {m["model_type"]: m for m in d["models"]}
    out: dict[str, Any] = {"dataset": d["dataset"], "time": d.get("time"), "total_wall_seconds": d["total_wall_seconds"],
                           "models": {}}
    for t, m in models.items():
        mm = m["metrics"]
        out["models"][t] = {"wall_seconds": m["wall_seconds"], "peak_rss_mb": m["peak_rss_mb"],
                            **{f"rmse_h{h}": mm.get(f"rmse_h{h}") for h in HORIZONS},
                            **{f"persistence_rmse_h{h}": mm.get(f"baseline_rmse_h{h}") for h in HORIZONS},
                            **{f"ratio_to_persistence_h{h}": mm[f"rmse_h{h}"] / mm[f"baseline_rmse_h{h}"]
                               for h in HORIZONS if mm.get(f"baseline_rmse_h{h}")}}
    if "ensemble" in models:
        members = [t for t in ("xgboost", "lstm", "gnn") if t in models]
        out["ensemble_vs_best_member"] = {
            f"h{h}": {"ensemble": out["models"]["ensemble"][f"rmse_h{h}"],
                      "best_member": min(out["models"][t][f"rmse_h{h}"] for t in members),
                      "best_member_type": min(members, key=lambda t: out["models"][t][f"rmse_h{h}"])}
            for h in HORIZONS}
    return out


Check = tuple[str, str, str, str, Callable[[], float | None], Callable[[float], bool], str]


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "not measured"
    if unit == "x":
        return f"{v:,.2f}x" if v < 100 else f"{v:,.0f}x"
    if abs(v) >= 100:
        return f"{v:,.0f} {unit}".strip()
    return f"{v:,.2f} {unit}".strip()


def targets(rpc: Any, streams: Any, process: Any, beijing: Any, scale: Any = None, durability: Any = None, dashboard: Any = None) -> list[dict[str, Any]]:
    r = get(rpc, "rpcs") or {}
    sizes = get(rpc, "sizes") or {}
    gs = r.get("GetStatus", {})
    noop8 = med(r, "noop", "aqimodels", "c8", "per_second")
    promo = r.get("PromoteModelVersion", {})

    def ratio_div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows: list[tuple[str, str, float | None, str, str, Callable[[float], bool]]] = [
        ("GetStatus p50, 1 in flight (4 x 1,000)", "REST default ~640 ms; in-process 38 ms",
         med(gs, "aqimodels", "c1", "p50_ms"), "ms", "<= 2 ms", lambda v: v <= 2),
        ("GetStatus p99, 1 in flight", "", med(gs, "aqimodels", "c1", "p99_ms"), "ms", "<= 5 ms", lambda v: v <= 5),
        ("GetStatus throughput, 8 in flight", "no-op ceiling ~4,500/s",
         med(gs, "aqimodels", "c8", "per_second"), "calls/s", ">= 3,000/s", lambda v: v >= 3000),
        ("GetStatus throughput / no-op throughput, 8 in flight (same run)", "",
         ratio_div(med(gs, "aqimodels", "c8", "per_second"), noop8), "x", ">= 0.67", lambda v: v >= 0.667),
        ("GetStatus p99, 8 in flight", "no-op p99 4.2 ms", med(gs, "aqimodels", "c8", "p99_ms"), "ms", "<= 10 ms",
         lambda v: v <= 10),
        ("GetStatus speed-up vs in-process MlflowClient composite", "38 ms in-process",
         med(gs, "ratio_inproc_over_aqimodels_p50"), "x", ">= 15x", lambda v: v >= 15),
        ("GetStatus speed-up vs REST composite, default mlflow server", "~640 ms",
         med(gs, "ratio_rest_over_aqimodels_p50"), "x", ">= 100x", lambda v: v >= 100),
        ("GetStatus speed-up vs REST composite, mlflow server --workers 1", "~136 ms",
         med(gs, "ratio_rest_w1_over_aqimodels_p50"), "x", ">= 40x", lambda v: v >= 40),
        ("ListModelVersions page of 100, first page p99", "REST read 50-70 ms; in-process 3-10 ms",
         med(r, "ListModelVersions_first", "aqimodels", "c1", "p99_ms"), "ms", "<= 10 ms", lambda v: v <= 10),
        ("ListModelVersions page of 100, last page p99", "", med(r, "ListModelVersions_last", "aqimodels", "c1", "p99_ms"),
         "ms", "<= 10 ms", lambda v: v <= 10),
        ("ListModelVersions p50, 4 x 10,000 / 4 x 1,000 (last page)", "",
         ratio_div(med(sizes, "10000", "ListModelVersions_last", "aqimodels", "c1", "p50_ms"),
                   med(sizes, "1000", "ListModelVersions_last", "aqimodels", "c1", "p50_ms")),
         "x", "<= 1.5x", lambda v: v <= 1.5),
        ("CompareModelVersions, all 1,000 versions, p99", "search of 1,000 versions in-process 166 ms",
         med(r, "CompareModelVersions", "aqimodels", "c1", "p99_ms"), "ms", "<= 25 ms", lambda v: v <= 25),
        ("PromoteModelVersion p50 / bare MLflow alias change in-process (same run)", "promotion via REST ~190 ms",
         med(promo, "ratio_aqimodels_over_inproc_alias_only_p50"), "x", "<= 2x", lambda v: v <= 2),
        ("PromoteModelVersion p99 (audit and archive included)", "", med(promo, "aqimodels", "c1", "p99_ms"), "ms",
         "<= 60 ms", lambda v: v <= 60),
        ("GetStatus right after a promotion shows it", "",
         (1.0 if get(promo, "status_after_promotion_shows_it") else 0.0) if promo else None, "",
         "yes (also tests/integration/test_read_model.py)", lambda v: v == 1.0),
        ("Relay: added p99 latency per event (paced)", "", med(streams, "added_p99_ms"), "ms", "<= 5 ms",
         lambda v: v <= 5),
        ("Relay: events/s through the registry", "", med(streams, "relayed_fast", "events_per_second"), "events/s",
         ">= 5,000/s", lambda v: v >= 5000),
        ("Registry idle memory (RSS)", "idle default mlflow server 3.1 GB",
         med(process, "registry", "idle_rss_mb"), "MB", "<= 250 MB", lambda v: v <= 250),
        ("Registry start to SERVING", "mlflow server ready ~6-9 s", med(process, "registry", "ready_seconds"), "s",
         "<= 2.5 s", lambda v: v <= 2.5),
        ("CLI `status` wall / import of grpc + registry module (same run)", "2.8x before the lazy CLI imports",
         med(load("cli_start"), "ratio_status_over_import_floor"), "x", "<= 1.5x", lambda v: v <= 1.5),
    ]
    if scale is not None:
        mm = get(scale, "many_models") or {}
        rows += [
            ("Start to SERVING (read model warm), 4 x 10,000", "first GetStatus 4.0 s before",
             med(scale, "start", "4x10000", "ready_seconds"), "s", "<= 3 s", lambda v: v <= 3),
            ("First GetStatus calls after SERVING, p99 (4 x 10,000, worst run)", "",
             get(scale, "start", "4x10000", "first_calls_p99_all_runs_ms"), "ms", "<= 10 ms", lambda v: v <= 10),
            ("Start to SERVING (read model warm), 4 x 1,000", "", med(scale, "start", "4x1000", "ready_seconds"), "s",
             "<= 2.5 s", lambda v: v <= 2.5),
            ("GetStatus p50, all of 100 models x 100 versions, 1 in flight", "",
             med(mm, "GetStatus_all", "aqimodels", "c1", "p50_ms"), "ms", "<= 5 ms", lambda v: v <= 5),
            ("GetStatus 100 x 100 speed-up vs in-process MlflowClient composite", "",
             med(mm, "GetStatus_all", "ratio_inproc_over_aqimodels_p50"), "x", ">= 100x", lambda v: v >= 100),
            ("GetStatus 100 x 100 speed-up vs REST composite, default mlflow server", "",
             med(mm, "GetStatus_all", "ratio_rest_over_aqimodels_p50"), "x", ">= 1,000x", lambda v: v >= 1000),
            ("GetStatus page of 20 models p50 (100 x 100)", "",
             med(mm, "GetStatus_page_20", "aqimodels", "c1", "p50_ms"), "ms", "<= 1.5 ms", lambda v: v <= 1.5),
            ("Registry idle CPU after warm-up (refresher + health probe), 100 x 100", "",
             get(scale, "idle_cpu", "100x100", "cpu_percent"), "%", "<= 5 % of one core", lambda v: v <= 5),
            ("Registry idle CPU after warm-up (refresher + health probe), 400 x 25", "",
             get(scale, "idle_cpu", "400x25", "cpu_percent"), "%", "<= 5 % of one core", lambda v: v <= 5),
            ("Memory per version above the idle process, 4 x 10,000", "",
             med(scale, "rss", "4x10000", "bytes_per_version_above_idle"), "B", "<= 2,048 B", lambda v: v <= 2048),
            ("Memory per version above the idle process, 100 x 100", "",
             med(scale, "rss", "100x100", "bytes_per_version_above_idle"), "B", "<= 2,048 B", lambda v: v <= 2048),
        ]
    if durability is not None:
        lease = durability.get("lease_seconds", 15.0)
        rows += [
            ("Takeover after a graceful stop (SIGTERM -> job followed again on the other replica)", "",
             med(durability, "takeover_sigterm", "followed_s"), "s", "<= 2 s", lambda v: v <= 2),
            (f"Takeover after kill -9 (lease {lease:g} s; kill -> job followed again)", "",
             med(durability, "takeover_kill", "followed_s"), "s", "<= lease + 5 s",
             lambda v, lease=lease: v <= lease + 5),
            ("Events lost or duplicated in all takeovers", "",
             float(get(durability, "takeover_kill", "lost_total") + get(durability, "takeover_sigterm", "lost_total")),
             "events", "0", lambda v: v == 0),
            ("Lease heartbeat at 50 running jobs: database time per second", "",
             med(durability, "heartbeat_50", "db_ms_per_second"), "ms/s", "<= 10 ms/s (1% of a core)",
             lambda v: v <= 10),
        ]
    if dashboard is not None:
        pages = dashboard.get("pages", {})
        rows += [
            ("Dashboard overview (4 x 1,000): time to first byte, p50", "browser cache warm",
             get(pages, "overview_warm", "ttfb_ms", "p50"), "ms", "<= 300 ms", lambda v: v <= 300),
            ("Dashboard overview: fully rendered (load event), p50, cache warm", "",
             get(pages, "overview_warm", "rendered_ms", "p50"), "ms", "<= 300 ms", lambda v: v <= 300),
            ("Dashboard overview: fully rendered, p50, new browser profile", "",
             get(pages, "overview_cold", "rendered_ms", "p50"), "ms", "<= 300 ms", lambda v: v <= 300),
            ("Dashboard SSE: registry CPU above idle, 50 clients / 1 client on one job", "one registry watch either way",
             med(dashboard, "sse_registry_cpu_50_over_1"), "x", "<= 1.2x", lambda v: v <= 1.2),
            ("Dashboard SSE: registry CPU per delivered event, 50 clients / 1", "",
             med(dashboard, "sse_registry_cpu_per_event_50_over_1"), "x", "<= 1.2x", lambda v: v <= 1.2),
            ("Dashboard SSE: worker -> SSE client p99, 50 clients connected", "direct gRPC watcher p99 in the same runs: "
             + _fmt(med(dashboard, "sse", "50", "direct_p99_ms"), "ms"),
             med(dashboard, "sse", "50", "sse_p99_ms"), "ms", "<= 20 ms", lambda v: v <= 20),
        ]
    if beijing is not None:
        ens = beijing["models"].get("ensemble", {})
        for h, bound in ((1, 0.92), (6, 0.75), (24, 0.72)):
            rows.append((f"Beijing: ensemble rmse / persistence at +{h} h", "persistence on the same test rows",
                         ens.get(f"ratio_to_persistence_h{h}"), "x", f"<= {bound}", lambda v, b=bound: v <= b))
        gnn, lstm = beijing["models"].get("gnn", {}), beijing["models"].get("lstm", {})
        rows.append(("Beijing: GNN rmse / LSTM rmse at +6 h", "", ratio_div(gnn.get("rmse_h6"), lstm.get("rmse_h6")),
                     "x", "< 1 (GNN beats LSTM)", lambda v: v < 1))
        for h in HORIZONS:
            e = beijing.get("ensemble_vs_best_member", {}).get(f"h{h}", {})
            rows.append((f"Beijing: ensemble rmse / best member ({e.get('best_member_type')}) at +{h} h", "",
                         ratio_div(e.get("ensemble"), e.get("best_member")), "x", "<= 1", lambda v: v <= 1.0 + 1e-9))
        rows.append(("Beijing: training all four, wall time", "", beijing["total_wall_seconds"] / 60, "min",
                     "<= 30 min", lambda v: v <= 30))
    out = []
    for label, anchor, value, unit, target, ok in rows:
        out.append({"figure": label, "value": value, "unit": unit, "anchor": anchor, "target": target,
                    "met": None if value is None else bool(ok(value))})
    return out


def resilience_targets(res: Any) -> list[dict[str, Any]]:
    """Issue 11: reconcile of a half-done promotion, health on a frozen database, promotion p50 kept."""
    if not res:
        return []
    rows: list[tuple[str, str, float | None, str, str, Callable[[float], bool]]] = []
    frozen = get(res, "frozen_postgres_health") or {}
    for key in ("interval_0.5", "interval_2.0"):
        interval = key.split("_")[1]
        rows.append((f"Health NOT_SERVING after a PostgreSQL freeze (SIGSTOP), probe interval {interval} s, "
                     "in probe intervals (worst run)", "73 s before the database timeouts",
                     get(frozen, key, "not_serving_in_intervals", "max"), "x", "<= 2", lambda v: v <= 2.0))
    rows.append(("PromoteModelVersion p50, this / base commit (same run)", "",
                 med(res, "promotion", "this_over_base_p50"), "x", "<= 1.15", lambda v: v <= 1.15))
    out = [{"figure": label, "value": value, "unit": unit, "anchor": anchor, "target": target,
            "met": None if value is None else bool(ok(value))} for label, anchor, value, unit, target, ok in rows]
    # reported, no target: how long a half-done promotion stays half-done
    out.append({"figure": "Half-done promotion: one reconciler pass (in-process, SQLite)", "anchor": "never, before",
                "value": med(res, "reconcile_in_process"), "unit": "ms", "target": "reported", "met": None})
    out.append({"figure": "Half-done promotion: registry restarted -> SERVING with the record `recovered`",
                "anchor": "never, before", "value": med(res, "reconcile_after_restart", "restart_to_recovered"),
                "unit": "s", "target": "reported (start included)", "met": None})
    return out


def resilience_section(res: Any) -> list[str]:
    if not res:
        return []
    m = get(res, "machine") or {}
    lines = ["## 6. Failure-safe changes and bounded waits (`python -m bench.resilience`)", "",
             f"Load average when the last part was measured: {m.get('load_average')} (2 CPUs shared by the team: "
             "absolute times are inflated; the promotion comparison alternates the two registries run by run).", "",
             "| figure | value |", "|---|---|",
             f"| one reconciler pass over a half-done promotion, in-process (SQLite) | "
             f"{_fig(get(res, 'reconcile_in_process'))} |",
             f"| registry SIGKILLed after the alias move, restart -> record `recovered` | "
             f"{_fig(get(res, 'reconcile_after_restart', 'restart_to_recovered'))} |",
             f"| ... of which restart -> SERVING | {_fig(get(res, 'reconcile_after_restart', 'restart_to_serving'))} |",
             f"| ... SERVING -> no record pending | {_fig(get(res, 'reconcile_after_restart', 'recovered_after_serving'))} |"]
    for key, f in (get(res, "frozen_postgres_health") or {}).items():
        if isinstance(f, dict) and "not_serving_after" in f:
            lines += [f"| {key.replace('_', ' ')} s: freeze -> NOT_SERVING | {_fig(f['not_serving_after'])} |",
                      f"| {key.replace('_', ' ')} s: SIGCONT -> SERVING | {_fig(f['serving_again_after'])} |"]
    promo = get(res, "promotion") or {}
    for label in ("base", "this"):
        p = promo.get(label) or {}
        lines.append(f"| PromoteModelVersion p50, {label} ({promo.get('base_commit') if label == 'base' else 'this tree'}) "
                     f"| {_fig(p.get('aqimodels_p50_ms'))}; p99 {_fig(p.get('aqimodels_p99_ms'))}; "
                     f"{_fig(p.get('ratio_over_alias_only'))} the bare alias change |")
    lines.append(f"| PromoteModelVersion p50, this / base, per run | {_fig(promo.get('this_over_base_p50'))} |")
    return lines + [""]


def _fig(f: Any, unit: str = "") -> str:
    if not isinstance(f, dict) or f.get("median") is None:
        return "-"
    u = f.get("unit", unit)
    return f"{f['median']:,} {u} ({f['min']:,}-{f['max']:,}, n={f['runs']})"


def physical_sanity_section() -> list[str]:
    """Beijing before and after non-negative forecasts, despiking and raw-frame latency."""
    after, before = load("training_beijing"), load("training_beijing_before_issue12")
    if after is None or before is None or "negative_share" not in after["models"][0]["metrics"]:
        return []
    new = {m["model_type"]: m["metrics"] for m in after["models"]}
    old = {m["model_type"]: m["metrics"] for m in before["models"]}
    lines = ["## 4b. Beijing before and after bounding the forecasts (bounded forecasts, despiked inputs, raw-frame latency)", "",
             (f"Before: `training_beijing_before_issue12.json` ({before.get('time')}); after: "
              f"`training_beijing.json` ({after.get('time')}), both `python -m bench.training --data beijing:... "
              "--label beijing`. \"unbounded\": the same trained model's output before the bound at 0."), "",
             ("| model | rmse +1 h before / after (unbounded) | +6 h | +24 h | negative cells unbounded / output |"
              " latency 1 origin | 100 chosen origins |"), "|---|---|---|---|---|---|---|"]
    for t, m in new.items():
        o = old.get(t, {})
        cells = []
        for h in HORIZONS:
            unb = m.get(f"rmse_unbounded_h{h}")
            cells.append(f"{o.get(f'rmse_h{h}', float('nan')):.2f} / {m[f'rmse_h{h}']:.2f}"
                         + (f" ({unb:.2f})" if unb is not None else ""))
        neg = m.get("negative_share_unbounded")
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {'-' if neg is None else f'{neg:.2%}'} / "
                     f"{m['negative_share']:.2%} | {m['inference_latency_ms']:.1f} ms | "
                     f"{m['inference_batch_latency_ms']:.0f} ms ({m['inference_batch_origins']:.0f}) |")
    lines += ["", ("Latency is now one definition for all four types: a raw long-format frame in, the forecast frame "
                   "out (`model.predict`, input checks and the feature pipeline included); before, three types timed "
                   "pre-built windows (0.5-1.6 ms) and the ensemble a raw frame (26 ms), so the two are not "
                   "comparable. The ensemble never had a separate unbounded output: it combines bounded members "
                   "with non-negative weights."), ""]
    return lines


def target_space_section() -> list[str]:
    """Beijing: the output clipped at 0 (default) against training in log1p space, per model and horizon."""
    clipped, log1p = load("training_beijing"), load("training_beijing_log1p")
    if clipped is None or log1p is None:
        return []
    old = {m["model_type"]: m["metrics"] for m in clipped["models"]}
    new = {m["model_type"]: m["metrics"] for m in log1p["models"]}
    lines = ["## 4c. Beijing: clipped output against training in log1p space", "",
             (f"Clipped: `training_beijing.json` ({clipped.get('time')}, `--label beijing`, the default "
              f"`target_transform=none`); log1p: `training_beijing_log1p.json` ({log1p.get('time')}, `--label "
              "beijing_log1p --target-transform log1p`; the ensemble combines the log1p members). Single runs "
              "each, seed 42. rmse in µg/m³ on the same test rows; ratio = log1p / clipped (below 1: log1p "
              "costs less). Negative cells: the share of test forecast cells below 0 before the final clip."), "",
             "| model | +1 h clipped / log1p (ratio) | +6 h | +24 h | negative cells before the clip: clipped / log1p |",
             "|---|---|---|---|---|"]
    better = total = 0
    for t, m in new.items():
        o = old.get(t)
        if o is None:
            continue
        cells = []
        for h in HORIZONS:
            a, b = o.get(f"rmse_h{h}"), m.get(f"rmse_h{h}")
            if a is None or b is None:
                cells.append("-")
                continue
            total += 1
            better += b < a
            cells.append(f"{a:.2f} / {b:.2f} ({b / a:.3f})")
        neg = [x.get("negative_share_unbounded") for x in (o, m)]
        lines.append(f"| {t} | " + " | ".join(cells) + " | "
                     + " / ".join("-" if v is None else f"{v:.2%}" for v in neg) + " |")
    lines += ["", f"log1p has the lower rmse in {better} of {total} model/horizon cells.", ""]
    return lines


def write_markdown(path: Path) -> str:
    rpc, streams, process, scale = load("rpc"), load("streams"), load("process"), load("scale")
    dashboard = load("dashboard")
    synth, beijing = training_summary("synthetic"), training_summary("beijing")
    resilience, durability = load("resilience"), load("durability")
    rows = targets(rpc, streams, process, beijing, scale, durability, dashboard=dashboard) + resilience_targets(resilience)
    rows += webhooks_targets(load("webhooks"))
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`python -m bench.run`) from `bench/results/*.json`; do not edit by hand.",
             "Every figure is the median of repeated runs (min-max and run count in the sections below).",
             "Comparisons were measured side by side in one run and are given as ratios. Anchors are the",
             "figures quoted when the benchmarks were specified (measured earlier on this machine kind).", ""]
    m = get(rpc, "machine") or get(process, "machine") or common.machine()
    lines += [f"Machine: {m.get('cpus')} CPUs, Python {m.get('python')}, grpcio {m.get('grpcio')}, "
              f"mlflow {m.get('mlflow')}, load average at the start of the RPC section {m.get('load_average')}, "
              f"{m.get('time')}.", "", "## Targets", "",
              "| figure | measured | anchor | target | |", "|---|---|---|---|---|"]
    for r in rows:
        mark = "n/a" if r["met"] is None else ("met" if r["met"] else "**missed**")
        lines.append(f"| {r['figure']} | {_fmt(r['value'], r['unit'])} | {r['anchor']} | {r['target']} | {mark} |")
    met = sum(1 for r in rows if r["met"])
    lines += ["", f"{met} of {len(rows)} targets met.", ""]
    if rpc:
        lines += [f"## 1. Registry RPCs (4 models x {rpc.get('main_size')} versions)", "",
                  "aqimodels = the registry over gRPC; inproc = the same answer assembled with MlflowClient in the "
                  "client process; rest / rest_w1 = the same MlflowClient code against `mlflow server` (default "
                  "workers / `--workers 1`, job execution off) on the same database; noop = gRPC health Check on "
                  "the registry (ceiling). cN = N calls in flight from one separate client process.", "",
                  "| RPC | system | in flight | p50 | p99 | calls/s |", "|---|---|---|---|---|---|"]
        for op, systems in rpc["rpcs"].items():
            for system, by_c in systems.items():
                if system.startswith("ratio_") or not isinstance(by_c, dict):
                    continue
                for c, v in by_c.items():
                    if isinstance(v, dict) and "p50_ms" in v:
                        lines.append(f"| {op} | {system} | {c[1:]} | {_fig(v['p50_ms'])} | {_fig(v['p99_ms'])} | "
                                     f"{_fig(v['per_second'])} |")
        lines += ["", "Ratios (baseline p50 / aqimodels p50 at 1 in flight, paired run by run):", ""]
        for op, systems in rpc["rpcs"].items():
            for k, v in systems.items():
                if k.startswith("ratio_"):
                    lines.append(f"- {op} {k}: {_fig(v)}")
        lines += ["", "Registry sizes (4 models x N versions, aqimodels vs in-process MlflowClient):", "",
                  "| N | RPC | system | in flight | p50 | p99 | calls/s |", "|---|---|---|---|---|---|---|"]
        for n, ops in rpc.get("sizes", {}).items():
            for op, systems in ops.items():
                if not isinstance(systems, dict):
                    continue
                for system, by_c in systems.items():
                    if system.startswith("ratio_"):
                        continue
                    for c, v in by_c.items():
                        lines.append(f"| {n} | {op} | {system} | {c[1:]} | {_fig(v['p50_ms'])} | {_fig(v['p99_ms'])} "
                                     f"| {_fig(v['per_second'])} |")
        lines += ["", "Registry build (SQL inserts into a migrated MLflow schema vs the MlflowClient path):", ""]
        for n, b in rpc.get("builds", {}).items():
            lines.append(f"- {n}: {b['versions']} versions in {b['seconds']:.1f} s = "
                         f"{b['versions_per_second']:,.0f} versions/s")
        lines.append("")
    if streams:
        lines += ["## 2. Streams (fake worker -> registry -> client vs fake worker -> client)", "",
                  f"Paced: one event every {streams.get('paced_interval_ms')} ms ({streams.get('events_paced')} "
                  f"events); fast: {streams.get('events_fast')} events back to back.", "",
                  "| path | p50 latency | p99 latency | events/s |", "|---|---|---|---|"]
        for k in ("direct_paced", "relayed_paced", "direct_fast", "relayed_fast"):
            v = streams.get(k, {})
            lines.append(f"| {k} | {_fig(v.get('p50_ms'))} | {_fig(v.get('p99_ms'))} | "
                         f"{_fig(v.get('events_per_second'))} |")
        lines += ["", f"- added p50: {_fig(streams.get('added_p50_ms'))}; added p99: {_fig(streams.get('added_p99_ms'))}",
                  f"- relayed / direct events/s: {_fig(streams.get('relay_over_direct_events_per_second'))}", "",
                  "Watchers of one job (300 events, 10 ms apart):", "",
                  "| watchers | p50 | p99 | registry CPU | CPU per delivered event |", "|---|---|---|---|---|"]
        for c, v in streams.get("watchers", {}).items():
            lines.append(f"| {c} | {_fig(v['p50_ms'])} | {_fig(v['p99_ms'])} | {_fig(v['registry_cpu_percent'])} | "
                         f"{_fig(v['registry_cpu_us_per_delivered_event'])} |")
        lines.append("")
    if process:
        lines += ["## 3. Process costs", "", "| process | start to SERVING | idle RSS | loaded RSS | processes |",
                  "|---|---|---|---|---|"]
        for k, v in process.items():
            if isinstance(v, dict) and "ready_seconds" in v:
                lines.append(f"| {k} | {_fig(v['ready_seconds'])} | {_fig(v['idle_rss_mb'])} | "
                             f"{_fig(v.get('loaded_rss_mb'))} | {_fig(v.get('processes'))} |")
        lines += ["", f"- idle RSS, default mlflow server / registry: "
                      f"{_fig(process.get('ratio_mlflow_default_idle_over_registry'))}",
                  f"- start to ready, default mlflow server / registry: "
                  f"{_fig(process.get('ratio_mlflow_default_ready_over_registry'))}",
                  "- the worker's loaded memory is its training peak (section 4).", ""]
    cli = load("cli_start")
    if cli:
        lines += ["## 3b. CLI start-up (`python -m bench.run --sections cli`)", "",
                  "`aqimodels --target T status`, piped, against a live registry (4 models x 20 versions), and",
                  "a process that only imports grpc and the generated registry module, in interleaved pairs.", "",
                  f"- `aqimodels status`: {_fig(cli.get('status_seconds'))}",
                  f"- import floor: {_fig(cli.get('import_floor_seconds'))}",
                  f"- ratio status / floor: {_fig(cli.get('ratio_status_over_import_floor'))}", "",
                  "Beyond the floor, a piped `status` loads typer (about 20 ms) and the CLI's own modules;",
                  "not rich (its output off a terminal is render.plain_status) nor pydantic (the CLI's options",
                  "are coerced without it), and it ends with os._exit once its output is flushed (grpc's",
                  "teardown after a call was 20-40 ms). The bytecode is written first (`make bytecode`).", ""]
    lines += ["## 4. Training (from bench/results/training_*.json, `python -m bench.training`)", ""]
    for label, t in (("synthetic", synth), ("beijing", beijing)):
        if t is None:
            lines += [f"{label}: not run (no bench/results/training_{label}.json).", ""]
            continue
        lines += [f"**{label}** (`{t['dataset']}`, {t.get('time')}), all four in {t['total_wall_seconds'] / 60:.1f} min:",
                  "", "| model | wall | peak RSS | rmse +1 h (x persistence) | rmse +6 h | rmse +24 h |",
                  "|---|---|---|---|---|---|"]
        for name, mm in t["models"].items():
            cells = [f"{mm[f'rmse_h{h}']:.2f} ({mm.get(f'ratio_to_persistence_h{h}', float('nan')):.3f}x)"
                     for h in HORIZONS]
            lines.append(f"| {name} | {mm['wall_seconds']:.0f} s | {mm['peak_rss_mb']:.0f} MB | " + " | ".join(cells)
                         + " |")
        any_m = next(iter(t["models"].values()))
        lines.append("| persistence | | | " + " | ".join(f"{any_m[f'persistence_rmse_h{h}']:.2f}" for h in HORIZONS)
                     + " |")
        lines.append("")
    if scale:
        lines += scale_section(scale)
    lines += resilience_section(resilience)
    if durability:
        lines += ["## 7. Durable jobs (two replicas and a worker, separate processes)", "",
                  f"Backend {durability.get('backend')}, lease {durability.get('lease_seconds')} s. An LSTM retrain "
                  "through replica A, watched on replica B; A stopped at epoch 3. claimed = until B holds the "
                  "lease; followed = until B's watcher gets the first event recorded after A stopped. Lost/duplicated: "
                  "the worker's own event numbers against the progress events the store replays.", "",
                  "| stop | claimed | followed | lost | duplicated | jobs with a sequence gap |",
                  "|---|---|---|---|---|---|"]
        for how in ("sigterm", "kill"):
            v = durability.get(f"takeover_{how}", {})
            lines.append(f"| {how} | {_fig(v.get('claimed_s'))} | {_fig(v.get('followed_s'))} | {_fig(v.get('lost'))} "
                         f"| {_fig(v.get('duplicated'))} | {_fig(v.get('registry_sequence_gaps'))} |")
        lines += ["", "Lease thread (one scan of the active jobs per second, renewal every third of the lease):", "",
                  "| running jobs | scan | scan p99 | renewal | database time per second |", "|---|---|---|---|---|"]
        for n in ("1", "50"):
            v = durability.get(f"heartbeat_{n}", {})
            lines.append(f"| {n} | {_fig(v.get('scan_ms'))} | {_fig(v.get('scan_p99_ms'))} | {_fig(v.get('renew_ms'))} "
                         f"| {_fig(v.get('db_ms_per_second'))} |")
        lines.append("")
    if dashboard:
        lines += [f"## 8. Dashboard ({dashboard.get('models')} models x {dashboard.get('versions_per_model')} versions, "
                  "Debian's Chromium; `bench/dashboard.py`)", "",
                  "Navigation Timing from the browser (ms from navigation start); warm = one profile reloading, "
                  "cold = a new profile per load.", "",
                  "| page | time to first byte p50 / p90 | DOMContentLoaded p50 | rendered (load) p50 / p90 | HTML |",
                  "|---|---|---|---|---|"]
        for k, v in dashboard.get("pages", {}).items():
            lines.append(f"| {k} | {v['ttfb_ms']['p50']} / {v['ttfb_ms']['p90']} | {v['dom_content_loaded_ms']['p50']} "
                         f"| {v['rendered_ms']['p50']} / {v['rendered_ms']['p90']} | {v['html_bytes']:,} B |")
        lines += ["", "SSE clients on one running job (300 events 10 ms apart from the fake worker), with one direct "
                  "gRPC WatchRetrainJob watcher on the same job:", "",
                  "| SSE clients | registry CPU (above idle) | registry CPU per delivered event | dashboard CPU per delivered event "
                  "| worker -> SSE p50 | worker -> SSE p99 | direct gRPC p99 | added p99 | all connected after "
                  "| p99 with the connection storm |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c, v in dashboard.get("sse", {}).items():
            lines.append(f"| {c} | {_fig(v['registry_cpu_seconds'])} ({_fig(v.get('registry_busy_cpu_seconds'))}) | "
                         f"{_fig(v['registry_cpu_us_per_delivered_event'])} "
                         f"| {_fig(v['dashboard_cpu_us_per_delivered_event'])} | {_fig(v['sse_p50_ms'])} | "
                         f"{_fig(v['sse_p99_ms'])} | {_fig(v['direct_p99_ms'])} | {_fig(v['added_p99_ms'])} | "
                         f"{_fig(v.get('connect_all_ms'))} | {_fig(v.get('sse_p99_ms_including_connect'))} |")
        lines += ["", "Latency figures count the events the worker sent once every client was connected (steady "
                  "state); the last column includes the first events, sent while 50 requests arrived at once.", ""]
        lines += ["", f"- registry CPU above idle, 50 / 1 clients: {_fig(dashboard.get('sse_registry_cpu_50_over_1'))} "
                      f"(with idle: {_fig(dashboard.get('sse_registry_cpu_50_over_1_with_idle'))}; idle "
                      f"{dashboard.get('registry_idle_cpu_percent')}% CPU); per delivered event: "
                      f"{_fig(dashboard.get('sse_registry_cpu_per_event_50_over_1'))}",
                  f"- load average at the start of the section: {get(dashboard, 'machine', 'load_average')}"]
        fifty = dashboard.get("sse", {}).get("50", {})
        if "hop_p99_ms" in fifty:
            lines.append(f"- where the 50 clients' latency goes, per event in the same runs: the first SSE client "
                         f"after the direct watcher p50 {_fig(fifty['hop_p50_ms'])}, p99 {_fig(fifty['hop_p99_ms'])}; "
                         f"the last client after the first (the fan-out, and the benchmark's one process reading "
                         f"50 sockets in turn) p50 {_fig(fifty['fanout_spread_p50_ms'])}, p99 "
                         f"{_fig(fifty['fanout_spread_p99_ms'])}; direct watcher p50 {_fig(fifty['direct_p50_ms'])}")
        lines += [""]
    lines += events_section(load("events"))
    lines += webhooks_section(load("webhooks"))
    lines += physical_sanity_section()
    lines += target_space_section()
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def events_section(ev: dict[str, Any] | None) -> list[str]:
    if not ev:
        return []
    same, other, replay = ev.get("same_replica_ms", {}), ev.get("other_replica_ms", {}), ev.get("replay", {})
    return [f"## 9. Registry events (two registry processes on {ev.get('backend')}; `bench/events.py`)", "",
            (f"{ev.get('promotions_per_run')} promotions through replica A, {ev.get('pace_ms'):g} ms apart, per "
             "run; a WatchRegistryEvents watcher on A and one on B. Latency: the watcher's receive time minus the "
             "event's commit time (stamped in the appending transaction)."), "",
            "| watcher | p50 | p99 | events |", "|---|---|---|---|",
            f"| same replica | {same.get('p50')} ms | {same.get('p99')} ms | {same.get('count')} |",
            f"| other replica | {other.get('p50')} ms | {other.get('p99')} ms | {other.get('count')} |",
            "", (f"- PromoteModelVersion with both watchers: p50 {get(ev, 'promote_ms', 'p50')} ms, "
                 f"p99 {get(ev, 'promote_ms', 'p99')} ms"),
            (f"- replay of {replay.get('events'):,} stored events by `watch_events(0, follow=False)`: "
             f"{_fig(get(replay, 'events_per_second'))}"),
            f"- load average at the start of the section: {get(ev, 'machine', 'load_average')}", ""]


def scale_section(scale: dict[str, Any]) -> list[str]:
    """Section 5 of BENCHMARKS.md: start, many models, idle CPU, memory (bench/scale.py)."""
    m = scale.get("machine", {})
    lines = ["## 5. Scale (`python -m bench.run --sections scale`)", "",
             (f"Run {m.get('time')}, load average at its start {m.get('load_average')}. Start to SERVING asks "
              "the registry's own service name (readiness: every model loaded); the first calls are the "
              "GetStatus calls right after it, back to back."), "",
             "| registry | start to SERVING | first GetStatus | p50 / p99 of the first calls | p99, worst run |",
             "|---|---|---|---|---|"]
    for label, v in scale.get("start", {}).items():
        lines.append(f"| {label} | {_fig(v.get('ready_seconds'))} | {_fig(v.get('first_status_ms'))} | "
                     f"{_fig(v.get('first_calls_p50_ms'))} / {_fig(v.get('first_calls_p99_ms'))} | "
                     f"{_fmt(v.get('first_calls_p99_all_runs_ms'), 'ms')} |")
    lines += ["", ("GetStatus at 100 models x 100 versions (1 in flight; inproc / rest = the same answer from "
                   "MlflowClient in-process / over REST on the default `mlflow server`, same database, same run):"),
              "",
              "| RPC | system | p50 | p99 | calls/s |", "|---|---|---|---|---|"]
    mm = scale.get("many_models", {})
    for op, systems in mm.items():
        for system, by_c in systems.items():
            if system.startswith("ratio_"):
                continue
            for v in by_c.values():
                lines.append(f"| {op} | {system} | {_fig(v['p50_ms'])} | {_fig(v['p99_ms'])} | {_fig(v['per_second'])} |")
    for op, systems in mm.items():
        for k, v in systems.items():
            if k.startswith("ratio_"):
                lines.append(f"- {op} {k}: {_fig(v)}")
    lines += ["", "| registry | resident memory | bytes per version above the idle process |", "|---|---|---|"]
    for label, v in scale.get("rss", {}).items():
        lines.append(f"| {label} | {_fig(v.get('rss_mb'))} | {_fig(v.get('bytes_per_version_above_idle'))} |")
    lines += ["", ("| registry | idle CPU after warm-up (share of one core) | window | probes of all models | "
                   "model reloads | health pings |"), "|---|---|---|---|---|---|"]
    for label, v in scale.get("idle_cpu", {}).items():
        lines.append(f"| {label} | {v['cpu_percent']:.2f} % ({v['cpu_seconds']:.2f} s of CPU) | "
                     f"{v['window_seconds']:.0f} s | {v.get('probes_of_all_models', 0):.0f} | "
                     f"{v.get('model_reloads', 0):.0f} | {v.get('health_pings', 0):.0f} |")
    lines.append("")
    return lines


def webhooks_targets(w: Any) -> list[dict[str, Any]]:
    """A hanging webhook receiver adds nothing to promotion p99 (ratio to no webhook, same run)."""
    if not w:
        return []
    rows = []
    for label in ("hanging", "healthy"):
        value = med(w, f"{label}_over_none_p99")
        rows.append({"figure": f"PromoteModelVersion p99 with a {label} webhook receiver / without (same run)",
                     "value": value, "unit": "x", "anchor": "", "target": "<= 1.2 (no added p99)",
                     "met": None if value is None else value <= 1.2})
    return rows


def webhooks_section(w: Any) -> list[str]:
    if not w:
        return []
    intro = ("Three registry processes side by side, runs alternating: no webhook, a webhook to a healthy receiver, "
             f"a webhook to a receiver that holds every request (send timeout {w.get('send_timeout_s')} s); "
             f"{w.get('calls_per_run')} promotions to production per run. Load average: "
             f"{get(w, 'machine', 'load_average')}.")
    lines = [f"## 10. Webhooks (`python -m bench.run --sections webhooks`; {w.get('versions')} versions, SQLite)", "",
             intro, "", "| receiver | promotion p50 | promotion p99 | p50 / none | p99 / none |", "|---|---|---|---|---|"]
    for label in ("none", "healthy", "hanging"):
        v = w.get(label) or {}
        p50 = _fig(w.get(f"{label}_over_none_p50")) if label != "none" else "1"
        p99 = _fig(w.get(f"{label}_over_none_p99")) if label != "none" else "1"
        lines.append(f"| {label} | {_fig(v.get('promote_p50_ms'))} | {_fig(v.get('promote_p99_ms'))} | {p50} | {p99} |")
    delivery = (f"Delivery, commit (the event's time) -> healthy receiver: p50 {w.get('delivery_p50_ms')} ms, "
                f"p99 {w.get('delivery_p99_ms')} ms over {w.get('delivery_events')} events; the hanging receiver "
                f"got {w.get('hanging_receiver_requests')} requests (each given up after the timeout, then "
                "retried with backoff).")
    return [*lines, "", delivery, ""]
