// A table or code block wider than the screen scrolls inside itself (portal.css); a keyboard user must be able to
// reach it to scroll it, so each one that overflows becomes a focus stop (axe: scrollable-region-focusable).
// Every size is read first and every attribute written after: writing tabindex between two reads made the browser
// lay the page out again for each table (on the monitoring page, Lighthouse counted this script's forced layouts
// as its longest task before plotly.js).
(function () {
  "use strict";
  function mark() {
    const regions = [...document.querySelectorAll("main table, main pre, main .table-scroll")];
    const scrollable = regions.map((el) => {
      const scrolls = el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1;
      if (!scrolls) return false;
      const style = getComputedStyle(el);
      return /(auto|scroll)/.test(style.overflowX + style.overflowY);
    });
    regions.forEach((el, i) => {
      if (scrollable[i] && !el.hasAttribute("tabindex")) {
        el.setAttribute("tabindex", "0");
        el.dataset.scrollRegion = "1";
      } else if (!scrollable[i] && el.dataset.scrollRegion) {
        el.removeAttribute("tabindex");
        delete el.dataset.scrollRegion;
      }
    });
  }
  mark();
  let pending = 0;
  window.addEventListener("resize", () => { clearTimeout(pending); pending = setTimeout(mark, 150); });
})();
