// A table or code block wider than the screen scrolls inside itself (portal.css); a keyboard user must be able to
// reach it to scroll it, so each one that overflows becomes a focus stop (axe: scrollable-region-focusable).
(function () {
  "use strict";
  function mark() {
    for (const el of document.querySelectorAll("main table, main pre, main .table-scroll")) {
      const scrolls = el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1;
      const style = getComputedStyle(el);
      const scrollable = scrolls && /(auto|scroll)/.test(style.overflowX + style.overflowY);
      if (scrollable && !el.hasAttribute("tabindex")) {
        el.setAttribute("tabindex", "0");
        el.dataset.scrollRegion = "1";
      } else if (!scrollable && el.dataset.scrollRegion) {
        el.removeAttribute("tabindex");
        delete el.dataset.scrollRegion;
      }
    }
  }
  mark();
  let pending = 0;
  window.addEventListener("resize", () => { clearTimeout(pending); pending = setTimeout(mark, 150); });
})();
