// An experiment's chart: the cumulative difference (challenger minus champion) over time inside its always-valid
// confidence band, with zero dashed. Data from the page's json_script block "experiment-series"; plotly.js is
// fetched only when the chart nears the viewport (portal/lazy_charts.js). No toolbar, legend above the plot.
(function () {
  "use strict";
  const source = document.getElementById("experiment-series");
  const el = document.getElementById("chart-experiment");
  if (!source || !el || !window.portalCharts) return;
  const s = JSON.parse(source.textContent);
  const few = s.t.length < 10;
  const config = { displayModeBar: false, displaylogo: false, responsive: true, scrollZoom: false };
  function span() {  // at least an hour wide, so one minute's point is not stretched over milliseconds
    const first = Date.parse(s.t[0]), last = Date.parse(s.t[s.t.length - 1]);
    const pad = Math.max(0, 3600e3 - (last - first)) / 2 + 60e3;
    return [new Date(first - pad).toISOString(), new Date(last + pad).toISOString()];
  }
  const traces = [
    { x: s.t, y: s.high, type: "scatter", mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false },
    { x: s.t, y: s.low, type: "scatter", mode: "lines", line: { width: 0 }, fill: "tonexty",
      fillcolor: "rgba(31, 119, 180, 0.2)", name: "always-valid interval" },
    { x: s.t, y: s.difference, type: "scatter", mode: few ? "lines+markers" : "lines",
      line: { color: "#1f77b4", width: 2 }, name: "difference, challenger − champion",
      // A band needs two points to be seen: with few, each point carries its interval as an error bar too.
      error_y: few ? { type: "data", symmetric: false, color: "rgba(31, 119, 180, 0.6)",
                       array: s.high.map((h, i) => h - s.difference[i]),
                       arrayminus: s.low.map((l, i) => s.difference[i] - l) } : undefined },
  ];
  const layout = {
    height: 320, margin: { t: 36, r: 16, b: 16, l: 16, pad: 4 }, showlegend: true,
    legend: { orientation: "h", x: 0, xanchor: "left", y: 1.02, yanchor: "bottom", font: { size: 12 } },
    font: { family: "system-ui, sans-serif", size: 12, color: "#1d2330" },
    xaxis: { type: "date", tickangle: 0, automargin: true, showgrid: false, fixedrange: true, range: span(),
             nticks: Math.max(3, Math.floor((el.clientWidth || 600) / 120)) },
    yaxis: { automargin: true, zeroline: false, fixedrange: true },
    shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: 0, y1: 0, line: { dash: "dash", color: "#5b6475" } }],
  };
  el.style.height = layout.height + "px";
  window.portalCharts.whenVisible(el, (Plotly) => { Plotly.newPlot(el, traces, layout, config); return el; });
})();
