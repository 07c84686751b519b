// Monitoring panels. Data comes from the page's json_script block (no inline script, no network calls).
// Every chart has a sentence under it saying what it shows (for screen readers and for a glance), no Plotly
// toolbar (its 13 buttons per chart were focus stops), horizontal time labels that never rotate or clip (the
// margins grow to fit them: automargin), and its legend above the plot area, never over the axes.
(function () {
  "use strict";
  const source = document.getElementById("monitoring-data");
  if (!source || !window.portalCharts) return;
  const data = JSON.parse(source.textContent);
  const config = { displayModeBar: false, displaylogo: false, responsive: true, scrollZoom: false };
  const legend = { orientation: "h", x: 0, xanchor: "left", y: 1.02, yanchor: "bottom", font: { size: 12 } };
  const t = data.time;
  const s = data.series;
  const range = [data.from, data.to];

  function timeAxis(el) {
    const width = (el && el.clientWidth) || 600;
    return { type: "date", range: range, tickangle: 0, automargin: true, nticks: Math.max(3, Math.floor(width / 120)),
             showgrid: false, fixedrange: true };
  }

  function summary(id, text) {
    const el = document.getElementById("summary-" + id);
    if (el) el.textContent = text;
  }

  function plot(id, traces, layout) {  // drawn once near the viewport; resolves to the chart's element
    const el = document.getElementById("chart-" + id);
    if (!el) return Promise.resolve(null);
    if (el.classList.contains("chart-empty")) { el.textContent = ""; el.classList.replace("chart-empty", "chart"); }
    const base = { margin: { t: 36, r: 16, b: 16, l: 16, pad: 4 }, height: 300, legend: legend, showlegend: true,
                   font: { family: "system-ui, sans-serif", size: 12, color: "#1d2330" } };
    const full = Object.assign(base, layout || {});
    el.style.height = full.height + "px";  // responsive mode sizes to the box: keep it as tall as the plot
    return window.portalCharts.whenVisible(el, (Plotly) => { Plotly.newPlot(el, traces, full, config); return el; });
  }

  function empty(id, text) {  // words instead of a chart: no axis, no caption computed from nothing
    const el = document.getElementById("chart-" + id);
    if (!el) return;
    if (window.Plotly && el.data) window.Plotly.purge(el);
    el.textContent = text;
    el.style.height = "";
    el.classList.remove("chart");
    el.classList.add("chart-empty");
    summary(id, "");
  }

  const fmtTime = (iso) => iso.slice(0, 16).replace("T", " ");
  const pct = (v, d) => (v === null || v === undefined ? "—" : (v * 100).toFixed(d === undefined ? 1 : d) + " %");
  const sum = (xs) => xs.reduce((a, b) => a + (b || 0), 0);
  function peak(xs) {
    let best = -1;
    xs.forEach((v, i) => { if (v !== null && v !== undefined && (best < 0 || v > xs[best])) best = i; });
    return best;
  }
  const per = data.granularity;
  const of = data.version ? " of v" + data.version : "";
  const window_ = of + " " + fmtTime(data.from) + " to " + fmtTime(data.to) + " UTC";

  // Throughput and errors
  const total = sum(s.predictions);
  if (total || sum(s.batch)) {
    const el = document.getElementById("chart-throughput");
    plot("throughput", [
      { x: t, y: s.predictions, name: "predictions", type: "bar", marker: { color: "#2456c9" } },
      { x: t, y: s.batch, name: "batch", type: "bar", marker: { color: "#8fa6d6" }, visible: s.batch.some((v) => v) ? true : "legendonly" },
      { x: t, y: s.error_rate, name: "error rate", yaxis: "y2", mode: "lines+markers", line: { color: "#b42318" }, marker: { size: 5 }, connectgaps: false },
    ], { barmode: "stack", xaxis: timeAxis(el),
         yaxis: { title: { text: "per " + per }, rangemode: "tozero", automargin: true, fixedrange: true },
         yaxis2: { overlaying: "y", side: "right", tickformat: ".0%", rangemode: "tozero", automargin: true, showgrid: false,
                   title: { text: "error rate" }, fixedrange: true } });
    const i = peak(s.predictions);
    const errors = sum(s.errors);
    summary("throughput", total + " online predictions" + window_ + (i >= 0 && s.predictions[i] ? "; busiest " + per + " " +
      fmtTime(t[i]) + " with " + s.predictions[i] : "") + "; " + errors + " failed (" + pct(total ? errors / total : null, 2) + ")" +
      (sum(s.batch) ? "; " + sum(s.batch) + " batch predictions." : "."));
  } else {
    empty("throughput", "No predictions" + window_ + ".");
  }

  // Latency
  const p99peak = peak(s.p99);
  if (p99peak >= 0) {
    const el = document.getElementById("chart-latency");
    plot("latency", ["p50", "p95", "p99"].map((k, n) => ({
      x: t, y: s[k], name: k, mode: "lines+markers", marker: { size: 4 }, connectgaps: false,
      line: { color: ["#1b7f4b", "#a86200", "#b42318"][n] } })),
    { xaxis: timeAxis(el), yaxis: { title: { text: "ms" }, rangemode: "tozero", automargin: true, fixedrange: true } });
    summary("latency", "Latency per " + per + ", warm-up requests left out: highest p99 " + s.p99[p99peak].toFixed(1) +
      " ms at " + fmtTime(t[p99peak]) + " UTC.");
  } else {
    empty("latency", "No latency to show: no predictions" + window_ + ".");
  }

  // Accuracy
  const accPoints = s.accuracy.filter((v) => v !== null && v !== undefined);
  if (accPoints.length) {
    const el = document.getElementById("chart-accuracy");
    plot("accuracy", [
      { x: t, y: s.accuracy, name: "accuracy", mode: "lines+markers", connectgaps: false, line: { color: "#2456c9" } },
      { x: t, y: s.labelled_share, name: "with ground truth", mode: "lines", line: { dash: "dot", color: "#5b6475" }, connectgaps: false },
    ], { xaxis: timeAxis(el), yaxis: { tickformat: ".0%", range: [0, 1.02], automargin: true, fixedrange: true } });
    const last = s.accuracy.map((v, i) => [v, i]).filter(([v]) => v !== null && v !== undefined).pop();
    summary("accuracy", "Accuracy (or mean absolute error for a regressor) per " + per + " of predictions with ground truth; latest " +
      (last[0] <= 1 ? pct(last[0]) : last[0].toFixed(3)) + " at " + fmtTime(t[last[1]]) + " UTC.");
  } else {
    empty("accuracy", (total ? "No ground truth yet for predictions" + window_ + ": accuracy appears once feedback arrives."
                             : "No accuracy to show: no predictions" + window_ + "."));
  }

  // Predictions: by class for a classifier, on the reference's bins for a regressor
  const dist = data.prediction_distribution;
  if (dist && dist.labels.length) {
    const el = document.getElementById("chart-predictions");
    const traces = [{ x: dist.labels, y: dist.current, name: "predictions", type: "bar", marker: { color: "#2456c9" } }];
    if (dist.reference) traces.push({ x: dist.labels, y: dist.reference, name: "reference " + dist.reference_name, type: "bar", marker: { color: "#a86200" } });
    const xTitle = dist.by === "class" ? "class" : dist.by === "bin" ? "predicted " + dist.reference_name : "value";
    plot("predictions", traces, { barmode: "group", yaxis: { tickformat: ".0%", automargin: true, fixedrange: true, title: { text: "share" } },
      xaxis: { type: "category", automargin: true, title: { text: xTitle }, fixedrange: true, tickfont: { size: Math.min(12, Math.max(9, Math.floor(((el && el.clientWidth) || 600) / (dist.labels.length * 9)))) } } });
    const top = peak(dist.current);
    summary("predictions", (dist.by === "class" ? "Predictions by class: " : "Predictions: ") + dist.labels.map((label, i) =>
      label + " " + pct(dist.current[i]) + (dist.reference ? " (reference " + pct(dist.reference[i]) + ")" : "")).join(", ") +
      (top >= 0 ? ". Most common: " + dist.labels[top] + "." : "."));
  } else {
    empty("predictions", "No predictions" + window_ + ".");
  }

  // Champion and challenger
  const roleEntries = Object.entries(data.roles || {});
  if (roleEntries.length > 1) {
    const el = document.getElementById("chart-roles");
    const labels = [...new Set(roleEntries.flatMap(([, r]) => Object.keys(r.prediction_distribution)))];
    plot("roles", roleEntries.map(([name, r]) => ({
      x: labels, y: labels.map((k) => r.prediction_distribution[k] || 0), name, type: "bar",
    })), { barmode: "group", yaxis: { tickformat: ".0%", title: { text: "share of predictions" }, automargin: true, fixedrange: true },
           xaxis: { type: "category", automargin: true, fixedrange: true } });
    if (el) summary("roles", roleEntries.map(([name, r]) => name + ": " + r.predictions + " predictions").join("; ") + ". The table below compares them.");
  } else {
    empty("roles", roleEntries.length ? "Only " + roleEntries[0][0] + " served in this range: nothing to compare." : "No predictions in this range.");
  }

  // Drift: heatmap, and the drill-down of one feature (chosen on the heatmap or, by keyboard, in the table)
  const heat = data.heatmap;
  const featureName = document.getElementById("feature-name");
  function showFeature(name, focus) {
    const d = data.distributions && data.distributions[name];
    if (!d) return;
    if (featureName) featureName.textContent = name;
    document.querySelectorAll("button[data-feature]").forEach((b) => b.setAttribute("aria-pressed", b.dataset.feature === name ? "true" : "false"));
    const row = (data.drift && data.drift.features || []).find((f) => f.feature === name);
    if (!sum(d.current) || (row && !row.rows)) {  // a feature with no current values: nothing to compare
      empty("feature", "No values of " + name + " in the predictions" + window_ + ": nothing to compare with the reference.");
      return;
    }
    const el = document.getElementById("chart-feature");
    plot("feature", [
      { x: d.labels, y: d.reference, name: "reference", type: "bar", marker: { color: "#a86200" } },
      { x: d.labels, y: d.current, name: "current", type: "bar", marker: { color: "#2456c9" } },
    ], { barmode: "group", yaxis: { tickformat: ".0%", automargin: true, fixedrange: true, title: { text: "share" } },
         xaxis: { type: "category", automargin: true, fixedrange: true, title: { text: name } } });
    let worst = 0;
    d.labels.forEach((_, i) => { if (Math.abs(d.current[i] - d.reference[i]) > Math.abs(d.current[worst] - d.reference[worst])) worst = i; });
    summary("feature", name + (row && row.psi !== null ? ": PSI " + row.psi.toFixed(3) + " (" + row.status + ")" : "") +
      ". Largest difference in " + d.labels[worst] + ": " + pct(d.current[worst]) + " now against " + pct(d.reference[worst]) + " in the reference.");
    if (focus && el) el.closest("section").scrollIntoView({ block: "nearest" });
  }
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-feature]");
    if (button) showFeature(button.dataset.feature, true);
  });
  const ranked = ((data.drift && data.drift.features) || []).filter((f) => f.psi !== null).sort((a, b) => b.psi - a.psi);
  if (heat && heat.features.length) {
    const heatAxis = timeAxis(document.getElementById("chart-heatmap"));
    delete heatAxis.range;
    const el = plot("heatmap", [{
      x: heat.time, y: heat.features, z: heat.psi, type: "heatmap", zmin: 0, zmax: 0.5, hoverongaps: false,
      colorscale: [[0, "#ecf8f1"], [0.2, "#f7e3a1"], [0.5, "#e8864d"], [1, "#b3261e"]],
      colorbar: { title: { text: "PSI" }, thickness: 12 },
    }], { height: Math.max(260, 26 * heat.features.length + 90), showlegend: false,
          margin: { t: 12, r: 16, b: 16, l: 16, pad: 4 }, xaxis: heatAxis,
          yaxis: { automargin: true, type: "category", fixedrange: true, tickfont: { size: 12 } } });
    el.then((chart) => { if (chart) chart.on("plotly_click", (ev) => { if (ev.points && ev.points[0]) showFeature(ev.points[0].y); }); });
    summary("heatmap", ranked.length ? "Worst features: " + ranked.slice(0, 3).map((f) => f.feature + " (PSI " + f.psi.toFixed(3) + ")").join(", ") + "." :
      "Too few predictions in every cell to judge drift yet.");
  } else {
    empty("heatmap", data.drift ? "Too few predictions" + of + " in any stretch of this range to draw drift over time; the table below judges the range as a whole."
                                : "No drift to show: " + (total ? "no reference data for v" + data.version + "." : "no predictions" + window_ + "."));
  }
  const first = ranked.length ? ranked[0].feature : (heat && heat.features.length ? heat.features[0] : null);
  if (first && data.distributions && data.distributions[first]) showFeature(first);
  else empty("feature", "No feature to show: " + (total ? "no reference data for v" + data.version + "." : "no predictions" + window_ + "."));
})();
