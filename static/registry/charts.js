// Metrics of each version, one line per metric. Data comes from a json_script block (no inline script).
(function () {
  "use strict";
  const source = document.getElementById("metrics-data");
  const target = document.getElementById("metrics-chart");
  if (!source || !target || !window.Plotly) return;
  const data = JSON.parse(source.textContent);
  const traces = Object.entries(data.metrics).map(([name, values]) => ({
    x: data.versions.map((v) => "v" + v), y: values, name, mode: "lines+markers", type: "scatter", connectgaps: false,
  }));
  window.Plotly.newPlot(target, traces, {
    margin: { t: 20, r: 20, b: 40, l: 50 }, height: 320, xaxis: { title: { text: "version" }, type: "category" },
    legend: { orientation: "h" },
  }, { displaylogo: false, responsive: true });
})();
