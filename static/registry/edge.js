// Follows an edge package's build: status, progress bar, log and error, refreshed every second; reloads once it is
// ready so the forms table (size, metrics, latency) and the download link appear.
(function () {
  "use strict";
  const root = document.getElementById("edge-package");
  if (!root) return;
  const status = root.querySelector("[data-testid=edge-status]");
  const progress = root.querySelector("[data-testid=edge-progress]");
  const error = root.querySelector("[data-testid=edge-error]");
  const log = root.querySelector("[data-testid=edge-log]");
  const ready = root.querySelector("[data-testid=edge-ready]");
  const labels = { queued: "Queued", running: "Building", ready: "Ready", failed: "Failed" };

  function render(d) {
    status.textContent = labels[d.status] || d.status;
    status.className = "status status-" + d.status;
    progress.value = d.progress;
    error.hidden = !d.error;
    error.textContent = d.error || "";
    log.replaceChildren(...d.log.map((entry) => {
      const item = document.createElement("li");
      const time = document.createElement("time");
      time.textContent = entry.at;
      item.append(time, " " + entry.message);
      return item;
    }));
  }

  function poll() {
    fetch(root.dataset.statusUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then((r) => r.json())
      .then((d) => {
        render(d);
        if (d.status === "queued" || d.status === "running") setTimeout(poll, 1000);
        else if (d.status === "ready" && ready.hidden) window.location.reload();
      })
      .catch(() => setTimeout(poll, 3000));
  }
  if (root.querySelector("[data-testid=edge-status]").textContent !== "Ready") poll();
})();
