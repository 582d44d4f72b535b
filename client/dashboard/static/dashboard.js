// The dashboard's live parts: Server-Sent Events into the page, charts with the vendored uPlot.
// Data is written with textContent only (never innerHTML): model names, reasons and messages are user data.
"use strict";
(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  const badge = (kind, value) => el("span", value, "badge " + kind + "-" + String(value).replace(/[^a-z_]/g, ""));
  const fmtTime = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "—");
  const fmtNum = (x) => (x === null || x === undefined ? "—" : Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4));
  function data(id) {
    const node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }
  function streamStatus(text) {
    const s = $("#stream-status");
    if (s) s.textContent = text;
  }
  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "interrupted"]);

  function chartWidth(node) {
    return Math.max(320, (node.parentElement || node).clientWidth - 8);
  }

  // ---- overview: running jobs and health, live ----
  function overview() {
    const es = new EventSource("/events/overview");
    es.onopen = () => document.body.classList.add("live");
    es.addEventListener("status", (e) => {
      const s = JSON.parse(e.data);
      if (s.error) return;
      const tbody = $("#running tbody");
      tbody.replaceChildren(...s.jobs.map(jobRow));
      $("#no-running").hidden = s.jobs.length > 0;
      for (const m of s.models) {
        const row = document.querySelector('tr[data-model="' + CSS.escape(m.name) + '"]');
        if (!row) continue;
        const h = $(".health .badge", row);
        if (h) {
          h.className = "badge health-" + m.health;
          h.textContent = m.health.replace("_", " ");
        }
        const p = $(".production a", row) || $(".production", row);
        p.textContent = m.production ? "v" + m.production : "—";
        $(".staging", row).textContent = m.staging ? "v" + m.staging : "—";
      }
    });
    es.addEventListener("progress", (e) => {
      const p = JSON.parse(e.data);
      const row = document.querySelector('#running tr[data-job="' + CSS.escape(p.job_id) + '"]');
      if (!row) return;
      if (p.epoch !== null && p.epoch !== undefined) {
        const bar = $("progress", row);
        bar.max = p.total_epochs || 1;
        bar.value = p.epoch;
        $(".epochs", row).textContent = p.epoch + "/" + (p.total_epochs || "?");
      }
      $(".state", row).replaceChildren(badge("state", p.state));
    });
  }

  function jobRow(j) {
    const tr = el("tr");
    tr.dataset.job = j.job_id;
    const link = el("a", j.job_id);
    link.href = "/jobs/" + encodeURIComponent(j.job_id);
    const td = el("td");
    td.append(link);
    const state = el("td", null, "state");
    state.append(badge("state", j.state));
    if (j.queue_position) state.append(" #" + j.queue_position + " in queue");
    const prog = el("td");
    const bar = el("progress");
    bar.max = j.total_epochs || 1;
    bar.value = j.epoch;
    prog.append(bar, " ", el("span", j.epoch + "/" + (j.total_epochs || "?"), "epochs"));
    tr.append(td, el("td", j.model_name), state, prog, el("td", j.worker || "—"));
    return tr;
  }

  // ---- model: metric across versions, production periods shaded ----
  function model() {
    const c = data("chart-data");
    const node = $("#chart");
    if (!c || !node || !window.uPlot) return;
    const pts = c.points.filter((p) => p.value !== null && p.time !== null);
    node.dataset.points = String(pts.length);
    if (!pts.length) {
      node.replaceChildren(el("p", "No version has " + c.metric + ".", "empty"));
      return;
    }
    // Production periods: alternating shades, each labelled with its version; the current one runs
    // to the right edge.
    const shade = (u) => {
      const ctx = u.ctx;
      ctx.save();
      ctx.font = Math.round(11 * devicePixelRatio) + "px system-ui, sans-serif";
      ctx.textBaseline = "top";
      c.periods.forEach((p, k) => {
        if (p.start === null) return;
        const right = u.bbox.left + u.bbox.width;
        const x0 = Math.max(u.bbox.left, u.valToPos(p.start / 1000, "x", true));
        const x1 = p.end === null ? right : Math.min(right, u.valToPos(p.end / 1000, "x", true));
        if (x1 <= x0) return;
        ctx.fillStyle = k % 2 ? "rgba(22, 163, 74, 0.10)" : "rgba(22, 163, 74, 0.22)";
        ctx.fillRect(x0, u.bbox.top, x1 - x0, u.bbox.height);
        if (x1 - x0 > 24 * devicePixelRatio) {
          ctx.fillStyle = "rgba(21, 128, 61, 0.9)";
          ctx.fillText("v" + p.version, x0 + 3 * devicePixelRatio, u.bbox.top + 3 * devicePixelRatio);
        }
      });
      ctx.restore();
    };
    // The x range covers the versions and the start of every production period.
    const times = pts.map((p) => p.time / 1000);
    for (const p of c.periods) {
      if (p.start !== null) times.push(p.start / 1000);
      if (p.end !== null) times.push(p.end / 1000);
    }
    const lo = Math.min(...times), hi = Math.max(...times);
    const pad = Math.max(1, (hi - lo) * 0.04);
    const opts = {
      width: chartWidth(node), height: 260,
      scales: { x: { time: true, range: () => [lo - pad, hi + pad] } },
      series: [{}, {
        label: c.metric, stroke: "#2563eb", width: 1.5, points: { show: pts.length <= 200 },
        value: (u, v, si, i) => (i === null || v === null ? "—" : "v" + pts[i].version + ": " + fmtNum(v)),
      }],
      hooks: { drawClear: [shade] },
    };
    new window.uPlot(opts, [pts.map((p) => p.time / 1000), pts.map((p) => p.value)], node);
    node.dataset.ready = "1";
  }

  // ---- job: live curves and event log ----
  function job() {
    const info = data("job-data");
    const xs = [], loss = [], val = [];
    let chart = null;
    window.aqimodelsSeen = [];  // the sequences received, in order (the browser tests read it)
    function draw() {
      const node = $("#curves");
      if (!window.uPlot || !node) return;
      if (!chart) {
        chart = new window.uPlot({
          width: chartWidth(node), height: 240, scales: { x: { time: false } },
          series: [{ label: "epoch" }, { label: "loss", stroke: "#dc2626", scale: "loss", width: 1.5 },
                   { label: "validation rmse", stroke: "#2563eb", scale: "rmse", width: 1.5 }],
          axes: [{}, { scale: "loss" }, { scale: "rmse", side: 1, grid: { show: false } }],
        }, [xs, loss, val], node);
      } else {
        chart.setData([xs, loss, val]);
      }
      node.dataset.points = String(xs.length);
    }
    const log = $("#events tbody");
    const es = new EventSource("/events/jobs/" + encodeURIComponent(info.job_id));
    es.onopen = () => streamStatus("live");
    es.onerror = () => streamStatus(es.readyState === 2 ? "stream closed" : "reconnecting…");
    es.addEventListener("job", (e) => {
      const ev = JSON.parse(e.data);
      window.aqimodelsSeen.push(ev.seq);
      const tr = el("tr");
      const st = el("td");
      st.append(badge("state", ev.state));
      tr.append(el("td", ev.seq), el("td", fmtTime(ev.time)), st, el("td", ev.text));
      log.append(tr);
      $("#job-state").replaceChildren(badge("state", ev.state));
      if (ev.kind === "epoch") {
        xs.push(xs.length + 1);
        loss.push(ev.loss);
        val.push(ev.validation_rmse);
        const bar = $("#job-progress");
        bar.max = ev.total_epochs || 1;
        bar.value = ev.epoch;
        $("#job-epochs").textContent = ev.epoch + "/" + (ev.total_epochs || "?");
        draw();
      } else if (ev.kind === "queued") {
        $("#job-queue").textContent = ev.position || "—";
      } else if (ev.kind === "dispatched") {
        $("#job-worker").textContent = ev.worker;
        $("#job-queue").textContent = "—";
      } else if (ev.kind === "succeeded") {
        const a = el("a", "v" + ev.version);
        a.href = info.model_url;
        $("#job-version").replaceChildren(a);
        const p = ev.promotion;
        $("#job-decision").textContent = !p.considered ? "not considered"
          : (p.promoted ? "promoted" : "not promoted") + (p.reason ? ": " + p.reason : "");
      }
      if (TERMINAL.has(ev.state)) {
        es.close();
        streamStatus("job " + ev.state);
        $("#job-ended").textContent = fmtTime(ev.time);
        const cancel = $("#cancel-form");
        if (cancel) cancel.remove();
      }
    });
    es.addEventListener("problem", (e) => {
      streamStatus(JSON.parse(e.data).message);
      es.close();
    });
  }

  // ---- alerts: live feed ----
  function alerts() {
    const es = new EventSource("/events/alerts");
    es.onopen = () => streamStatus("live");
    es.onerror = () => streamStatus("reconnecting…");
    es.addEventListener("alert", (e) => {
      const a = JSON.parse(e.data);
      const tr = el("tr");
      const h = el("td");
      h.append(badge("health", a.health));
      const m = el("td");
      const link = el("a", a.model_name);
      link.href = "/models/" + encodeURIComponent(a.model_name);
      m.append(link);
      tr.append(el("td", fmtTime(a.time)), m, el("td", "v" + a.version), h, el("td", fmtNum(a.ratio), "num"),
                el("td", a.message));
      $("#live-alerts").prepend(tr);
      $("#no-alerts").hidden = true;
    });
  }

  const pages = { overview, model, job, alerts };
  document.addEventListener("DOMContentLoaded", () => {
    const run = pages[document.body.dataset.page];
    if (run) run();
  });
})();
