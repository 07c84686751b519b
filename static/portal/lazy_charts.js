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

  // Charts that come into view together are drawn one after another, each in a task of its own (a timeout between
  // them lets the browser handle input and paint): drawn in one go, the monitoring page's five charts held the main
  // thread for 0.4 s on a laptop (Lighthouse's total blocking time).
  let drawn = Promise.resolve();
  const nextTask = () => new Promise((resolve) => setTimeout(resolve, 0));

  function whenVisible(el, draw) {
    return new Promise((resolve) => {
      if (!el) { resolve(null); return; }
      const run = () => {
        drawn = drawn.then(() => plotly()).then((Plotly) => nextTask().then(() => resolve(draw(Plotly))))
          .catch((error) => { resolve(null); console.error(error); });
      };
      if (!("IntersectionObserver" in window)) { run(); return; }
      const observer = new IntersectionObserver((entries) => {
        if (entries.some((e) => e.isIntersecting)) { observer.disconnect(); run(); }
      }, { rootMargin: "0px" });
      observer.observe(el);
    });
  }

  window.portalCharts = { plotly: plotly, whenVisible: whenVisible };
})();
