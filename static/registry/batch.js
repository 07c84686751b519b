// Batch scoring: the submit form (drag and drop, upload progress, then the job's page) and a job's live progress.
(function () {
  "use strict";

  const form = document.getElementById("batch-form");
  if (form) {
    const input = document.getElementById("batch-file");
    const button = document.getElementById("batch-button");
    const wrap = document.getElementById("batch-progress-wrap");
    const bar = document.getElementById("batch-progress");
    const text = document.getElementById("batch-progress-text");
    const result = document.getElementById("batch-result");
    const name = document.getElementById("batch-file-name");
    const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
    const maxBytes = Number(form.dataset.maxBytes) * 1024 * 1024;
    const say = window.PortalUpload.picker(document.getElementById("batch-dropzone"), input, button, name, result,
      maxBytes);

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!input.files[0]) return;
      const data = new FormData(form);
      data.delete("csrfmiddlewaretoken");
      data.append("model", form.dataset.model);
      ["id_column", "subject_column"].forEach((field) => { if (!data.get(field)) data.delete(field); });
      button.disabled = true;
      wrap.hidden = false;
      say("Uploading…");
      window.PortalUpload.send(form.dataset.endpoint, data, csrf, window.PortalUpload.showProgress(bar, text, say),
        (status, body) => {
        if (status === 202) {
          say("Accepted; opening the job…", "success");
          window.location.assign(form.dataset.jobPage + body.id + "/");
        } else {
          say(body.error ? body.error.message : "The file was not accepted (HTTP " + status + ").", "error");
          button.disabled = false;
        }
      });
    });
  }

  const root = document.getElementById("batch-job");
  if (root) {
    const $ = (id) => root.querySelector("[data-testid=" + id + "]");
    const labels = { queued: "Queued", planning: "Planning", scoring: "Scoring", assembling: "Assembling",
      done: "Done", failed: "Failed", cancelled: "Cancelled" };
    const active = ["queued", "planning", "scoring", "assembling"];

    const render = (job) => {
      const status = $("batch-status");
      status.textContent = labels[job.status] || job.status;
      status.className = "status status-" + job.status;
      $("batch-rows").textContent = job.rows_done.toLocaleString() + (job.rows_total ? " of " + job.rows_total.toLocaleString() : "") + " rows scored";
      $("batch-bad-rows").textContent = job.rows_failed.toLocaleString();
      $("batch-chunks").textContent = job.chunks_done + " of " + job.chunks_total;
      $("batch-progress").value = job.progress;
      $("batch-logged").textContent = job.rows_logged.toLocaleString();
      $("batch-finished").textContent = job.finished_at ? job.finished_at.replace("T", " ").slice(0, 19) + " (" + job.seconds + " s)" : "—";
      const state = $("batch-state");
      if (state && job.state) {
        state.replaceChildren(Object.assign(document.createElement("strong"), { textContent: job.state.text }));
        state.className = "batch-state batch-state-" + job.state.phase;
        state.dataset.final = String(job.state.final);
      }
      const error = $("batch-error");
      error.hidden = !job.error;
      error.textContent = job.error || "";
      $("batch-result-link").hidden = !job.result_sha256;
      $("batch-errors-link").hidden = !job.errors_sha256;
      const cancel = $("batch-cancel-form");
      if (cancel && active.indexOf(job.status) < 0) cancel.hidden = true;
      $("batch-chunk-table").querySelector("tbody").replaceChildren(...job.chunks.map((c) => {
        const row = document.createElement("tr");
        const badge = document.createElement("span");
        badge.className = "status status-" + c.status;
        badge.textContent = c.status;
        [String(c.index + 1), badge, String(c.rows === null ? c.rows_planned : c.rows), String(c.rows_failed),
          String(c.attempts), c.worker].forEach((value) => {
          const cell = document.createElement("td");
          cell.append(value);
          row.append(cell);
        });
        return row;
      }));
    };

    let polls = 0;
    const poll = () => {
      fetch(root.dataset.statusUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then((r) => r.json())
        .then((job) => {
          render(job);
          // The server says when nothing will change any more (scored, and every prediction logged).
          polls += 1;
          if (!job.state.final) setTimeout(poll, active.indexOf(job.status) >= 0 ? 700 : (polls > 100 ? 5000 : 1500));
        })
        .catch(() => setTimeout(poll, 3000));
    };
    poll();
  }
})();
