// Charts draw when they come near the viewport, and plotly.js (1.4 MB, 470 kB gzipped) is fetched and run only
// then: a page opens as fast as one without charts, and a phone that never scrolls to a chart never pays for it.
// The page names plotly.js's URL in a json_script block "plotly-src" (no inline script: the CSP forbids them).
(function () {
  "use strict";
  let loading = null;

  function plotly() {
    if (window.Plotly) return Promise.resolve(window.Plotly);
    if (!loading) {
      const source = document.getElementById("plotly-src");
      loading = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = JSON.parse(source.textContent);
        script.async = true;
        script.onload = () => resolve(window.Plotly);
        script.onerror = () => reject(new Error("plotly.js did not load"));
        document.head.appendChild(script);
      });
    }
    return loading;
  }

  function whenVisible(el, draw) {
    return new Promise((resolve) => {
      if (!el) { resolve(null); return; }
      const run = () => plotly().then((Plotly) => resolve(draw(Plotly)));
      if (!("IntersectionObserver" in window)) { run(); return; }
      const observer = new IntersectionObserver((entries) => {
        if (entries.some((e) => e.isIntersecting)) { observer.disconnect(); run(); }
      }, { rootMargin: "0px" });
      observer.observe(el);
    });
  }

  window.portalCharts = { plotly: plotly, whenVisible: whenVisible };
})();
