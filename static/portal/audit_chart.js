// Audit activity: events per day, stacked by domain (auth, model, deployment, promotion...). Data from json_script.
// Each domain keeps one colour of its own on every page (Plotly's palette has ten and repeated them), no toolbar,
// and a sentence under the chart says what it shows.
(function () {
  "use strict";
  const source = document.getElementById("activity-data");
  const target = document.getElementById("activity-chart");
  if (!source || !target || !window.portalCharts) return;
  const data = JSON.parse(source.textContent);
  const DOMAINS = ["admin", "alert", "audit", "auth", "batch", "batch_schedule", "deployment", "environment", "feedback",
    "gdpr", "model", "monitoring", "payload_keys", "prediction", "promotion", "reference", "retention", "team", "token",
    "traffic", "user", "version", "webhook"];
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
    "#636363", "#d6616b", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8"];
  function colour(domain) {
    const i = DOMAINS.indexOf(domain);
    if (i >= 0) return PALETTE[i];
    let h = 0;
    for (const c of domain) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    return PALETTE[DOMAINS.length + (h % (PALETTE.length - DOMAINS.length))];
  }
  const entries = Object.entries(data.series);
  const traces = entries.map(([domain, counts]) => ({
    x: data.days, y: counts, name: domain, type: "bar", marker: { color: colour(domain) },
  }));
  target.style.height = "300px";  // responsive mode sizes to the box: keep it as tall as the plot
  window.portalCharts.whenVisible(target, (Plotly) => {
    Plotly.newPlot(target, traces, {
      barmode: "stack", margin: { t: 36, r: 16, b: 16, l: 16, pad: 4 }, height: 300,
      xaxis: { type: "date", tickangle: 0, automargin: true, fixedrange: true, nticks: Math.max(3, Math.floor(target.clientWidth / 120)) },
      yaxis: { title: { text: "events" }, automargin: true, fixedrange: true },
      legend: { orientation: "h", x: 0, xanchor: "left", y: 1.02, yanchor: "bottom" },
    }, { displayModeBar: false, displaylogo: false, responsive: true });
  });
  const summary = document.getElementById("activity-summary");
  if (summary) {
    const totals = entries.map(([domain, counts]) => [domain, counts.reduce((a, b) => a + b, 0)]).sort((a, b) => b[1] - a[1]);
    const all = totals.reduce((a, [, n]) => a + n, 0);
    summary.textContent = all + " events from " + data.days[0] + " to " + data.days[data.days.length - 1] + ": " +
      totals.map(([domain, n]) => domain + " " + n).join(", ") + ".";
  }
})();
