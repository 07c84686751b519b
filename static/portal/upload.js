// Shared by the pages that upload files: drag and drop onto a zone, sizes for people, and a POST whose upload
// progress is reported as it goes (XMLHttpRequest: fetch() cannot report upload progress).
window.PortalUpload = (function () {
  "use strict";

  function human(bytes) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
    return bytes.toFixed(i ? 1 : 0) + " " + units[i];
  }

  // The zone is not a focus stop of its own: its "choose" button is (Enter or Space opens the file dialog), and a
  // click anywhere on the zone does the same for a mouse.
  function bindDropzone(zone, input, changed) {
    input.addEventListener("change", changed);
    zone.querySelectorAll("[data-picks]").forEach((button) => button.addEventListener("click", (event) => {
      event.stopPropagation();
      input.click();
    }));
    zone.addEventListener("click", (event) => {
      if (event.target !== input) input.click();
    });
    zone.dataset.ready = "1";  // bound: its button now opens the file dialog
    ["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((name) => zone.addEventListener(name, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      if (event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        changed();
      }
    });
  }

  // A file picker with a drop zone: shows the chosen file's name and size, refuses one over `maxBytes`, enables
  // `button`. Returns `say(content, kind)`, which puts a message (text or a node) in `result`.
  function picker(zone, input, button, name, result, maxBytes) {
    const say = (content, kind) => {
      result.className = "message " + (kind || "");
      result.replaceChildren();
      if (typeof content === "string") { result.textContent = content; } else { result.append(content); }
    };
    bindDropzone(zone, input, () => {
      const file = input.files[0];
      name.textContent = file ? file.name + " (" + human(file.size) + ")" : "";
      button.disabled = !file || file.size > maxBytes;
      if (file && file.size > maxBytes) {
        say("This file is larger than the upload limit of " + human(maxBytes) + ".", "error");
      } else {
        result.textContent = "";
        result.className = "";
      }
    });
    return say;
  }

  // A `progress` callback for send() that fills `bar` and `text`, and says when the server has all of it.
  function showProgress(bar, text, say) {
    return (pct, loaded, total) => {
      bar.value = pct;
      text.textContent = pct + "% · " + human(loaded) + " of " + human(total);
      if (loaded === total) say("Uploaded; checking the file…");
    };
  }

  // POST `data` to `url`; `progress(percent, loaded, total)` while sending; `done(status, body)` at the end.
  function send(url, data, csrf, progress, done) {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("X-CSRFToken", csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) progress(Math.floor((e.loaded / e.total) * 100), e.loaded, e.total);
    });
    xhr.addEventListener("load", () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { body = {}; }
      done(xhr.status, body);
    });
    xhr.addEventListener("error", () => done(0, { error: { message: "The connection broke during the upload. Try again." } }));
    xhr.send(data);
  }

  return { human, picker, showProgress, send };
})();
