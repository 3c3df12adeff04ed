// The experiment page's Metrics card: one small uPlot chart per series, with its latest and
// best value, from /api/v1/experiments/<id>/metrics (already downsampled by the server).
// While the experiment runs it polls with `since`, so only the series that changed come back.
const METRIC_COLOURS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#4b5563", "#ea580c"];

(function () {
  "use strict";
  const card = document.getElementById("metrics");
  if (!card || typeof uPlot === "undefined") return;
  const grid = document.getElementById("metrics-grid");
  const empty = document.getElementById("metrics-empty");
  const state = document.getElementById("metrics-state");
  const charts = new Map(); // name -> {chart, latest, best, count}
  const POLL_MS = 3000;
  let cursor = null;

  function fmt(value) {
    if (value === null || value === undefined) return "—";
    const abs = Math.abs(value);
    return abs !== 0 && (abs < 1e-3 || abs >= 1e5) ? value.toExponential(3) : String(+value.toPrecision(5));
  }

  function width() {
    return Math.max(240, (grid.firstElementChild || grid).clientWidth - 16);
  }
  // Measured once per answer, not per chart: reading clientWidth after each new chart forced a
  // layout of the page 50 times on a run with 50 series.
  let chartWidth = null;

  function create(series) {
    const box = document.createElement("article");
    box.className = "metric-card";
    box.dataset.series = series.name;
    const title = document.createElement("h3");
    title.textContent = series.name;
    const facts = document.createElement("dl");
    const latest = document.createElement("dd");
    const best = document.createElement("dd");
    const count = document.createElement("dd");
    for (const [label, dd] of [["latest", latest], ["best", best], ["points", count]]) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      facts.append(dt, dd);
    }
    best.title = series.lower_is_better ? "smallest value" : "largest value";
    box.append(title, facts);
    grid.append(box);
    const chart = new uPlot(
      {
        width: chartWidth || width(),
        height: 160,
        legend: { show: false },
        cursor: { drag: { x: true, y: false } },
        scales: { x: { time: false } },
        axes: [{ size: 30 }, { size: 50 }],
        series: [{ label: "step" }, { label: series.name, stroke: METRIC_COLOURS[0], width: 1.5 }],
      },
      [series.steps, series.values], // drawn once, with its data
      box,
    );
    const entry = { chart, latest, best, count };
    charts.set(series.name, entry);
    return entry;
  }

  function draw(series) {
    let entry = charts.get(series.name);
    if (entry) entry.chart.setData([series.steps, series.values]);
    else entry = create(series);
    entry.latest.textContent = fmt(series.last_value);
    entry.best.textContent = fmt(series.best_value);
    entry.count.textContent = series.count.toLocaleString();
  }

  async function load() {
    const url = new URL(card.dataset.url, window.location.href);
    if (cursor) url.searchParams.set("since", cursor);
    let live = card.dataset.live === "true";
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (!response.ok) throw new Error(response.status);
      const body = await response.json();
      if (body.series.length && !charts.size) {
        // The first chart sets the cards' width; the others take it without a layout each.
        draw(body.series[0]);
        chartWidth = width();
        body.series.slice(1).forEach(draw);
      } else {
        chartWidth = width();
        body.series.forEach(draw);
      }
      cursor = body.cursor;
      live = !body.is_terminal;
      empty.hidden = charts.size > 0;
      state.textContent = live ? "updating live" : "";
    } catch (error) {
      state.textContent = "metrics unavailable, retrying";
    }
    card.dataset.live = String(live);
    if (live) setTimeout(load, POLL_MS);
  }

  window.addEventListener("resize", () => {
    for (const { chart } of charts.values()) chart.setSize({ width: width(), height: 160 });
  });
  load();
})();

// The comparison page: one chart per metric with every run's curve, on the union of their steps.
(function () {
  "use strict";
  const data = document.getElementById("compare-data");
  const grid = document.getElementById("compare-grid");
  if (!data || !grid || typeof uPlot === "undefined") return;
  const { runs, metrics } = JSON.parse(data.textContent);
  for (const [name, perRun] of Object.entries(metrics)) {
    const steps = [...new Set(perRun.flatMap((r) => (r ? r.steps : [])))].sort((a, b) => a - b);
    const index = new Map(steps.map((step, i) => [step, i]));
    const columns = perRun.map((r) => {
      const column = new Array(steps.length).fill(null);
      if (r) r.steps.forEach((step, i) => { column[index.get(step)] = r.values[i]; });
      return column;
    });
    const box = document.createElement("article");
    box.className = "metric-card";
    box.dataset.series = name;
    const title = document.createElement("h3");
    title.textContent = name;
    box.append(title);
    grid.append(box);
    new uPlot(
      {
        width: Math.max(240, box.clientWidth - 16),
        height: 200,
        scales: { x: { time: false } },
        axes: [{ size: 30 }, { size: 50 }],
        series: [{ label: "step" }, ...runs.map((run, i) => ({ label: run, stroke: METRIC_COLOURS[i % 10], width: 1.5, spanGaps: true }))],
      },
      [steps, ...columns],
      box,
    );
  }
})();
