// Audit activity: events per day, stacked by domain (auth, model, deployment, promotion...). Data from json_script.
(function () {
  "use strict";
  const source = document.getElementById("activity-data");
  const target = document.getElementById("activity-chart");
  if (!source || !target || !window.Plotly) return;
  const data = JSON.parse(source.textContent);
  const traces = Object.entries(data.series).map(([domain, counts]) => ({
    x: data.days, y: counts, name: domain, type: "bar",
  }));
  window.Plotly.newPlot(target, traces, {
    barmode: "stack", margin: { t: 20, r: 20, b: 40, l: 50 }, height: 280,
    xaxis: { type: "date" }, yaxis: { title: { text: "events" } }, legend: { orientation: "h" },
  }, { displaylogo: false, responsive: true });
})();
