// Drag-and-drop upload with a real progress bar, then the scan's status until the version is ready or rejected.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const dropzone = document.getElementById("dropzone");
  const fileInput = document.getElementById("file");
  const button = document.getElementById("upload-button");
  const progressWrap = document.getElementById("progress-wrap");
  const progress = document.getElementById("progress");
  const progressText = document.getElementById("progress-text");
  const result = document.getElementById("result");
  const fileName = document.getElementById("file-name");
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  const maxBytes = Number(form.dataset.maxBytes) * 1024 * 1024;

  const say = window.PortalUpload.picker(dropzone, fileInput, button, fileName, result, maxBytes);

  function findingsList(findings) {
    const list = document.createElement("ul");
    (findings || []).filter((f) => f.severity !== "info").forEach((f) => {
      const item = document.createElement("li");
      item.textContent = (f.member ? f.member + ": " : "") + f.message;
      list.append(item);
    });
    return list;
  }

  function follow(statusUrl, pageUrl) {
    fetch(statusUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then((response) => response.json().then((body) => ({ ok: response.ok, body })))
      .then(({ ok, body }) => {
        if (!ok) { say(body.error ? body.error.message : "Could not read the version's status.", "error"); return; }
        const link = document.createElement("a");
        link.href = pageUrl;
        link.textContent = "Open version " + body.number;
        const box = document.createElement("div");
        const line = document.createElement("p");
        line.dataset.testid = "final-status";
        box.append(line);
        if (body.status === "ready") {
          line.textContent = "Version " + body.number + " is ready. ";
          line.append(link);
          say(box, "success");
        } else if (body.status === "rejected") {
          line.textContent = "Version " + body.number + " was rejected: " + body.status_detail + " ";
          line.append(link);
          box.append(findingsList(body.scan.findings));
          say(box, "error");
        } else {
          line.textContent = body.status_detail || "Scanning…";
          line.append(" ", link);
          say(box, "warning");
          if (body.scan.trust_state !== "pending") { setTimeout(() => follow(statusUrl, pageUrl), 1000); }
        }
      })
      .catch(() => setTimeout(() => follow(statusUrl, pageUrl), 2000));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) return;
    const data = new FormData(form);
    data.delete("csrfmiddlewaretoken");
    ["reference_data"].forEach((name) => { if (!data.get(name) || !data.get(name).size) data.delete(name); });
    button.disabled = true;
    progressWrap.hidden = false;
    say("Uploading…");
    window.PortalUpload.send(form.dataset.endpoint, data, csrf, window.PortalUpload.showProgress(progress, progressText, say),
      (status, body) => {
      if (status === 201) {
        progress.value = 100;
        const statusUrl = form.dataset.endpoint + body.number + "/";
        const pageUrl = form.dataset.versionPage + "versions/" + body.number + "/";
        follow(statusUrl, pageUrl);
      } else {
        const box = document.createElement("div");
        const line = document.createElement("p");
        line.dataset.testid = "final-status";
        line.textContent = body.error ? body.error.message : "The upload failed (HTTP " + status + ").";
        box.append(line);
        const details = body.error && body.error.details;
        if (details && details.findings) box.append(findingsList(details.findings));
        else if (details && typeof details === "object" && !Array.isArray(details)) {
          // Every field's problem at once (metrics and sensitive columns are checked together).
          const list = document.createElement("ul");
          list.dataset.testid = "upload-problems";
          Object.entries(details).forEach(([field, messages]) => {
            [].concat(messages).forEach((message) => {
              const item = document.createElement("li");
              item.textContent = field + ": " + message;
              list.append(item);
            });
          });
          box.append(list);
        }
        say(box, "error");
        button.disabled = false;
      }
    });
  });
})();
