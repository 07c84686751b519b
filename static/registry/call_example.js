// Copy buttons of the "Call this model" section. A static file: the Content-Security-Policy forbids inline scripts.
// Where the Clipboard API is missing (a page served over plain HTTP from another host), the snippet is selected
// instead, so Ctrl+C copies it.
(() => {
  const label = (button, text) => {
    const original = button.dataset.label || button.textContent;
    button.dataset.label = original;
    button.textContent = text;
    window.setTimeout(() => { button.textContent = original; }, 2000);
  };
  const select = (node) => {
    const range = document.createRange();
    range.selectNodeContents(node);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  };
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-copy-target]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copyTarget);
    if (!source) return;
    const fallback = () => { select(source); label(button, "Selected: press Ctrl+C"); };
    if (!navigator.clipboard || !window.isSecureContext) { fallback(); return; }
    navigator.clipboard.writeText(source.textContent).then(() => label(button, "Copied"), fallback);
  });
})();
