// Follows a deployment until it is live, failed or retired: status, progress bar and log, refreshed every second.
(function () {
  "use strict";
  const root = document.getElementById("deployment");
  if (!root) return;
  const status = root.querySelector("[data-testid=deployment-status]");
  const progress = root.querySelector("[data-testid=deployment-progress]");
  const error = root.querySelector("[data-testid=deployment-error]");
  const log = root.querySelector("[data-testid=deployment-log]");
  const labels = { pending: "Pending", running: "Running", live: "Live", failed: "Failed", retired: "Retired" };

  function render(d) {
    status.textContent = labels[d.status] || d.status;
    // On a promotion's page, its own status follows the deployment's end.
    const promotion = document.querySelector("[data-testid=promotion-status]");
    if (promotion && (d.status === "live" || d.status === "failed")) {
      promotion.textContent = labels[d.status];
      promotion.className = "status status-" + d.status;
    }
    status.className = "status status-" + d.status;
    // The page's own heading and its link to the environment follow the end too (no stale "Deploying…").
    const verb = document.querySelector("[data-testid=deployment-verb]");
    if (verb && (d.status === "live" || d.status === "retired")) verb.textContent = verb.dataset.done;
    if (verb && d.status === "failed") verb.textContent = verb.dataset.failed;
    const done = document.querySelector("[data-testid=deployment-done]");
    if (done) done.hidden = d.status !== "live";
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
        if (d.status === "pending" || d.status === "running") setTimeout(poll, 1000);
      })
      .catch(() => setTimeout(poll, 3000));
  }
  poll();
})();
