// Monitoring panels. Data comes from the page's json_script block (no inline script, no network calls).
(function () {
  "use strict";
  const source = document.getElementById("monitoring-data");
  if (!source || !window.Plotly) return;
  const data = JSON.parse(source.textContent);
  const Plotly = window.Plotly;
  const config = { displaylogo: false, responsive: true };
  const base = { margin: { t: 20, r: 50, b: 40, l: 55 }, height: 300, legend: { orientation: "h" } };
  const t = data.time;
  const s = data.series;

  function plot(id, traces, layout) {
    const el = document.getElementById(id);
    if (!el) return null;
    Plotly.newPlot(el, traces, Object.assign({}, base, layout || {}), config);
    return el;
  }

  plot("chart-throughput", [
    { x: t, y: s.predictions, name: "predictions", type: "bar", marker: { color: "#5b8def" } },
    { x: t, y: s.batch, name: "batch", type: "bar", marker: { color: "#c3cfe2" }, visible: s.batch.some((v) => v) ? true : "legendonly" },
    { x: t, y: s.error_rate, name: "error rate", yaxis: "y2", mode: "lines+markers", line: { color: "#d64545" }, connectgaps: false },
  ], { barmode: "stack", yaxis: { title: { text: "predictions per " + data.granularity } },
       yaxis2: { overlaying: "y", side: "right", tickformat: ".1%", rangemode: "tozero", title: { text: "error rate" } } });

  plot("chart-latency", ["p50", "p95", "p99"].map((k) => ({ x: t, y: s[k], name: k, mode: "lines+markers", marker: { size: 4 }, connectgaps: false })),
       { yaxis: { title: { text: "ms" }, rangemode: "tozero" } });

  plot("chart-accuracy", [
    { x: t, y: s.accuracy, name: "accuracy", mode: "lines+markers", connectgaps: false },
    { x: t, y: s.labelled_share, name: "with ground truth", mode: "lines", line: { dash: "dot" }, connectgaps: false },
  ], { yaxis: { tickformat: ".0%", range: [0, 1.02] } });

  const dist = data.prediction_distribution;
  const roleEntries = Object.entries(data.roles || {});
  if (dist && dist.labels.length) {
    const traces = [{ x: dist.labels, y: dist.current, name: "all predictions", type: "bar" }];
    if (data.drift && data.drift.prediction && data.drift.prediction.distribution) {
      const ref = data.drift.prediction.distribution;
      traces.push({ x: ref.labels, y: ref.reference, name: "reference " + data.drift.prediction.feature, type: "bar" });
      traces[0] = { x: ref.labels, y: ref.current, name: "predictions", type: "bar" };
    }
    plot("chart-predictions", traces, { barmode: "group", yaxis: { tickformat: ".0%" }, xaxis: { type: "category" } });
  } else {
    const el = document.getElementById("chart-predictions");
    if (el) el.textContent = "No predictions in this range.";
  }

  const rolesEl = document.getElementById("chart-roles");
  if (rolesEl) {
    if (roleEntries.length > 1) {
      plot("chart-roles", roleEntries.map(([name, r]) => ({
        x: Object.keys(r.prediction_distribution), y: Object.values(r.prediction_distribution), name, type: "bar",
      })), { barmode: "group", yaxis: { tickformat: ".0%", title: { text: "share of predictions" } }, xaxis: { type: "category" } });
    } else {
      rolesEl.textContent = roleEntries.length ? "Only " + roleEntries[0][0] + " served in this range: nothing to compare." : "No predictions in this range.";
      rolesEl.classList.remove("chart");
    }
  }

  const heat = data.heatmap;
  const featureName = document.getElementById("feature-name");
  function showFeature(name) {
    const d = data.distributions && data.distributions[name];
    if (!d) return;
    if (featureName) featureName.textContent = name;
    plot("chart-feature", [
      { x: d.labels, y: d.reference, name: "reference", type: "bar" },
      { x: d.labels, y: d.current, name: "current", type: "bar" },
    ], { barmode: "group", yaxis: { tickformat: ".0%" }, xaxis: { type: "category" } });
  }
  if (heat && heat.features.length) {
    const el = plot("chart-heatmap", [{
      x: heat.time, y: heat.features, z: heat.psi, type: "heatmap", zmin: 0, zmax: 0.5, hoverongaps: false,
      colorscale: [[0, "#ecf8f1"], [0.2, "#f7e3a1"], [0.5, "#e8864d"], [1, "#b3261e"]], colorbar: { title: { text: "PSI" } },
    }], { height: Math.max(260, 28 * heat.features.length + 80), margin: { t: 10, r: 20, b: 40, l: 120 } });
    if (el) el.on("plotly_click", (ev) => { if (ev.points && ev.points[0]) showFeature(ev.points[0].y); });
    const worst = data.drift && data.drift.features.filter((f) => f.psi !== null).sort((a, b) => b.psi - a.psi)[0];
    showFeature(worst ? worst.feature : heat.features[0]);
  } else {
    for (const id of ["chart-heatmap", "chart-feature"]) {
      const el = document.getElementById(id);
      if (el) { el.textContent = "No drift to show: no reference data for the serving version, or no predictions in this range."; el.classList.remove("chart"); }
    }
  }
})();
