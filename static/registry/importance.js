// SHAP global importance as horizontal bars: one series (a version) or two (champion and candidate), from a
// json_script block "importance-data". The table beside it carries the same numbers for screen readers.
(function () {
  "use strict";
  const source = document.getElementById("importance-data");
  const target = document.getElementById("importance-chart");
  if (!source || !target || !window.portalCharts) return;
  const data = JSON.parse(source.textContent);
  const features = data.features.slice().reverse();  // the largest at the top
  const traces = data.series.map((s) => ({
    type: "bar", orientation: "h", name: s.name, y: features, x: s.values.slice().reverse(),
    hovertemplate: "%{y}: %{x:.1%}<extra>" + s.name + "</extra>",
  }));
  const height = Math.max(220, 28 * features.length * (data.series.length > 1 ? 1.6 : 1) + 80);
  target.style.height = height + "px";
  window.portalCharts.whenVisible(target, (Plotly) => {
    Plotly.newPlot(target, traces, {
      margin: { t: 36, r: 16, b: 40, l: 16, pad: 4 }, height: height, barmode: "group",
      xaxis: { title: { text: "share of mean |SHAP attribution|" }, tickformat: ".0%", automargin: true, fixedrange: true },
      yaxis: { automargin: true, fixedrange: true, type: "category" },
      legend: { orientation: "h", x: 0, xanchor: "left", y: 1.02, yanchor: "bottom" },
      showlegend: data.series.length > 1,
    }, { displayModeBar: false, displaylogo: false, responsive: true });
    target.dataset.drawn = "true";
  });
})();
