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

  function bindDropzone(zone, input, changed) {
    input.addEventListener("change", changed);
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

  return { human, bindDropzone, send };
})();
