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


def targets(rpc: Any, streams: Any, process: Any, beijing: Any) -> list[dict[str, Any]]:
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
        ("CLI `status` wall / import of grpc + registry module (same run)", "2.8x before issue 13",
         med(load("cli_start"), "ratio_status_over_import_floor"), "x", "<= 1.5x", lambda v: v <= 1.5),
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


def _fig(f: Any, unit: str = "") -> str:
    if not isinstance(f, dict) or f.get("median") is None:
        return "-"
    u = f.get("unit", unit)
    return f"{f['median']:,} {u} ({f['min']:,}-{f['max']:,}, n={f['runs']})"


def write_markdown(path: Path) -> str:
    rpc, streams, process = load("rpc"), load("streams"), load("process")
    synth, beijing = training_summary("synthetic"), training_summary("beijing")
    rows = targets(rpc, streams, process, beijing)
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`python -m bench.run`) from `bench/results/*.json`; do not edit by hand.",
             "Every figure is the median of repeated runs (min-max and run count in the sections below).",
             "Comparisons were measured side by side in one run and are given as ratios. Anchors are the",
             "figures quoted in issue 5 (measured earlier on this machine kind).", ""]
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
                  f"- ratio status / floor: {_fig(cli.get('ratio_status_over_import_floor'))}", ""]
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
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
