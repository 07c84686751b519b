// Metrics of each version, one line per metric. Data comes from a json_script block (no inline script).
// No Plotly toolbar (focus stops that do nothing for a keyboard), the legend above the plot, and a sentence under
// the chart with the latest value of each metric.
(function () {
  "use strict";
  const source = document.getElementById("metrics-data");
  const target = document.getElementById("metrics-chart");
  if (!source || !target || !window.portalCharts) return;
  const data = JSON.parse(source.textContent);
  const entries = Object.entries(data.metrics);
  const traces = entries.map(([name, values]) => ({
    x: data.versions.map((v) => "v" + v), y: values, name, mode: "lines+markers", type: "scatter", connectgaps: false,
  }));
  target.style.height = "320px";  // responsive mode sizes to the box: keep it as tall as the plot
  window.portalCharts.whenVisible(target, (Plotly) => {
    Plotly.newPlot(target, traces, {
      margin: { t: 36, r: 16, b: 16, l: 16, pad: 4 }, height: 320,
      xaxis: { title: { text: "version" }, type: "category", automargin: true, fixedrange: true },
      yaxis: { automargin: true, fixedrange: true },
      legend: { orientation: "h", x: 0, xanchor: "left", y: 1.02, yanchor: "bottom" },
    }, { displayModeBar: false, displaylogo: false, responsive: true });
  });
  const summary = document.createElement("p");
  summary.className = "chart-summary";
  summary.dataset.testid = "metrics-summary";
  const last = "v" + data.versions[data.versions.length - 1];
  summary.textContent = "Metrics of " + data.versions.length + " version" + (data.versions.length === 1 ? "" : "s") + "; " + last + ": " +
    entries.map(([name, values]) => name + " " + (values[values.length - 1] === null ? "—" : Number(values[values.length - 1]).toPrecision(4))).join(", ") + ".";
  target.after(summary);
})();
