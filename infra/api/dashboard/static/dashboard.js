/* The fleet dashboard's rendering: one document (infra/api/dashboard/shape.py) -> the stat
 * cards, the tables and the ECharts charts. Shared by the live page (/dashboard, refreshed
 * every few seconds) and the demo's self-contained report. No network access of its own. */
"use strict";

const FleetDashboard = (() => {
  const charts = {};
  const fmt = new Intl.NumberFormat("en-US");
  const SEVERITY_COLOURS = { info: "#5b8ff9", warning: "#f6bd16", critical: "#e8684a" };
  const PROGRESS_COLOURS = {
    planned: "#c9cdd4", skipped: "#9aa1ab", sent: "#5b8ff9", downloading: "#61ddaa",
    verifying: "#65789b", installing: "#7262fd", succeeded: "#2ca02c", failed: "#e8684a",
    rollback_sent: "#f6bd16", rolled_back: "#ff9d4d", rollback_failed: "#8b0000",
  };

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setStat(id, value, label) {
    const node = document.getElementById(id);
    if (!node) return;
    node.dataset.value = String(value);
    node.textContent = label === undefined ? fmt.format(value) : label;
  }

  function chart(id, option) {
    const node = document.getElementById(id);
    if (!node) return;
    if (!charts[id]) charts[id] = echarts.init(node, null, { renderer: "canvas" });
    charts[id].setOption(Object.assign({ animation: false }, option), true);
    node.dataset.rendered = "1";
  }

  const timeAxis = { type: "time", axisLabel: { hideOverlap: true } };
  const grid = { left: 48, right: 16, top: 32, bottom: 28 };

  function renderStats(doc) {
    const d = doc.devices, t = doc.totals, w = doc.twins;
    setStat("stat-online", d.online);
    setStat("stat-registered", d.registered);
    setStat("stat-accepted", t.accepted);
    setStat("stat-stored", t.stored);
    setStat("stat-dead", t.dead_lettered);
    setStat("stat-twins", w.converged, `${fmt.format(w.converged)} / ${fmt.format(w.total)}`);
    const raised = Object.values(doc.alerts.by_severity || {})
      .reduce((sum, s) => sum + s.reduce((a, b) => a + b, 0), 0);
    setStat("stat-alerts", raised);
  }

  function renderThroughput(doc) {
    const s = doc.throughput;
    const pairs = (ys) => s.t.map((t, i) => [t, ys[i]]);
    chart("chart-throughput", {
      tooltip: { trigger: "axis" }, legend: { top: 0 }, grid, xAxis: timeAxis,
      yAxis: { type: "value", name: "msgs/s", nameGap: 8 },
      series: [
        { name: "in (bridge)", type: "line", showSymbol: false, data: pairs(s.in) },
        { name: "stored", type: "line", showSymbol: false, data: pairs(s.stored) },
      ],
    });
  }

  function renderAlerts(doc) {
    const a = doc.alerts;
    chart("chart-alerts", {
      tooltip: { trigger: "axis" }, legend: { top: 0 }, grid, xAxis: timeAxis,
      yAxis: { type: "value", name: "raised/min", minInterval: 1, nameGap: 8 },
      series: Object.entries(a.by_severity || {}).map(([severity, counts]) => ({
        name: severity, type: "bar", stack: "alerts",
        itemStyle: { color: SEVERITY_COLOURS[severity] },
        data: a.t.map((t, i) => [t, counts[i]]),
      })),
    });
  }

  function renderLag(doc) {
    const rows = doc.lag.slice().reverse();
    chart("chart-lag", {
      tooltip: {}, grid: { left: 150, right: 24, top: 8, bottom: 24 },
      xAxis: { type: "value", minInterval: 1 },
      yAxis: { type: "category", data: rows.map((r) => r.group), axisLabel: { width: 140, overflow: "truncate" } },
      series: [{ type: "bar", data: rows.map((r) => r.lag), label: { show: true, position: "right" } }],
    });
  }

  function renderDeadLetters(doc) {
    chart("chart-dead", {
      tooltip: {}, grid: { left: 48, right: 16, top: 16, bottom: 28 },
      xAxis: { type: "category", data: doc.dead_letters.map((d) => d.topic) },
      yAxis: { type: "value", minInterval: 1 },
      series: [{ type: "bar", itemStyle: { color: "#e8684a" }, label: { show: true, position: "top" },
                 data: doc.dead_letters.map((d) => d.count) }],
    });
  }

  function renderTwins(doc) {
    const w = doc.twins;
    chart("chart-twins", {
      tooltip: { trigger: "item" },
      series: [{
        type: "pie", radius: ["45%", "70%"], label: { formatter: "{b}: {c}" },
        data: [
          { name: "converged", value: w.converged, itemStyle: { color: "#2ca02c" } },
          { name: "pending", value: w.total - w.converged, itemStyle: { color: "#f6bd16" } },
        ],
      }],
    });
  }

  function renderRollouts(doc) {
    const table = document.getElementById("rollouts");
    if (!table) return;
    const body = table.querySelector("tbody");
    body.replaceChildren();
    for (const r of doc.rollouts) {
      const row = el("tr", { "data-rollout": r.rollout_id });
      for (const v of [r.rollout_id, r.state, r.version, r.target,
                       r.cohorts.length ? `${r.cohort + 1} / ${r.cohorts.length}` : "-",
                       r.updated, r.failed, r.rolled_back]) row.append(el("td", {}, v));
      body.append(row);
    }
    if (!doc.rollouts.length) {
      const row = el("tr");
      row.append(el("td", { colspan: 8 }, "no rollouts"));
      body.append(row);
    }
    const newest = doc.rollouts[0];
    const statuses = Object.keys(PROGRESS_COLOURS);
    const of = document.getElementById("cohorts-of");
    if (of) of.textContent = newest ? `: ${newest.rollout_id}` : ": no rollout";
    chart("chart-cohorts", {
      tooltip: { trigger: "axis" }, legend: { top: 0, type: "scroll" },
      grid: { left: 48, right: 16, top: 40, bottom: 28 },
      xAxis: { type: "category", data: newest ? newest.cohorts.map((c) => `#${c.index + 1} (${c.size})`) : [] },
      yAxis: { type: "value", name: "devices", minInterval: 1 },
      series: statuses.map((s) => ({
        name: s, type: "bar", stack: "cohort", itemStyle: { color: PROGRESS_COLOURS[s] },
        data: newest ? newest.cohorts.map((c) => c.progress[s] || 0) : [],
      })).filter((s) => s.data.some((v) => v > 0)),
    });
  }

  function renderErrors(doc) {
    const node = document.getElementById("errors");
    if (!node) return;
    const parts = Object.entries(doc.errors || {}).map(([k, v]) => `${k}: ${v}`);
    node.textContent = parts.join(" · ");
    node.hidden = parts.length === 0;
  }

  function render(doc) {
    renderStats(doc);
    renderThroughput(doc);
    renderAlerts(doc);
    renderLag(doc);
    renderDeadLetters(doc);
    renderTwins(doc);
    renderRollouts(doc);
    renderErrors(doc);
    const updated = document.getElementById("updated");
    if (updated) updated.textContent = new Date(doc.generated_ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
    document.body.dataset.state = "ready";
  }

  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.resize()));

  /* The live page: the token comes from the sign-in form or the URL's fragment (#token=...,
   * never sent to the server, removed from the address at once), kept in this tab's
   * sessionStorage and sent as a bearer header. */
  function live(dataUrl, everyMs) {
    const KEY = "fleetstream-token";
    const fragment = new URLSearchParams(location.hash.slice(1));
    if (fragment.get("token")) {
      sessionStorage.setItem(KEY, fragment.get("token"));
      history.replaceState(null, "", location.pathname + location.search);
    }
    const form = document.getElementById("signin");
    const status = document.getElementById("status");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, form.elements.token.value.trim());
      form.elements.token.value = "";
      refresh();
    });
    document.getElementById("signout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      form.hidden = false;
    });
    let timer = null;
    async function refresh() {
      clearTimeout(timer);
      const token = sessionStorage.getItem(KEY);
      if (!token) { form.hidden = false; status.textContent = "sign in with a platform token"; return; }
      try {
        const response = await fetch(dataUrl, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
        if (response.status === 401 || response.status === 403) {
          const body = await response.json();
          sessionStorage.removeItem(KEY);
          form.hidden = false;
          status.textContent = `${response.status}: ${body.reason}`;
          return;
        }
        if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
        form.hidden = true;
        status.textContent = "live";
        render(await response.json());
      } catch (error) {
        status.textContent = `not updated: ${error.message}`;
      }
      timer = setTimeout(refresh, everyMs);
    }
    refresh();
  }

  return { render, live };
})();
