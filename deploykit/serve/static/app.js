// deploykit web page: pick a model, pick or drop an image, show the top-5 predictions as bars.
// Plain JavaScript, no build step, no external resources, so it works offline.
(function () {
  "use strict";

  // The API lives one level above this script (<base>/static/app.js), so the page also works when the
  // server is mounted under a sub-path.
  var script = document.currentScript;
  var BASE = new URL("..", script ? script.src : location.href);
  var TOP_K = 5;

  var $ = function (id) { return document.getElementById(id); };
  var modelSelect = $("model");
  var fileInput = $("file");
  var drop = $("drop");
  var preview = $("preview");
  var dropText = $("drop-text");
  var keyField = $("key-field");
  var keyInput = $("api-key");
  var statusEl = $("status");
  var errorEl = $("error");
  var results = $("results");
  var bars = $("bars");
  var latency = $("latency");

  var apiKey = "";
  var currentFile = null;
  var previewUrl = null;
  var pending = null;  // AbortController of the request in flight

  function url(path) { return new URL(path, BASE).toString(); }

  function headers() { return apiKey ? { "X-API-Key": apiKey } : {}; }

  function setStatus(text) { statusEl.textContent = text; }

  function showError(text) {
    errorEl.textContent = text;
    errorEl.hidden = !text;
    if (text) { setStatus(""); }
  }

  // Turn a failed response into one readable line: the server's {"error": ...} when there is one.
  function errorMessage(response, body) {
    if (body && typeof body.error === "string" && body.error) {
      return body.error + " (HTTP " + response.status + ")";
    }
    return "The server answered HTTP " + response.status + " " + (response.statusText || "") + ".";
  }

  function readJson(response) {
    return response.text().then(function (text) {
      try { return text ? JSON.parse(text) : null; } catch (e) { return null; }
    });
  }

  function askForKey(message) {
    keyField.hidden = false;
    showError(message);
    keyInput.focus();
  }

  function loadModels() {
    setStatus("Loading models…");
    return fetch(url("models"), { headers: headers(), cache: "no-store" }).then(function (response) {
      return readJson(response).then(function (body) {
        if (response.status === 401) {
          askForKey(apiKey ? "The API key was not accepted. " + errorMessage(response, body)
                           : "This server needs an API key.");
          return;
        }
        if (!response.ok || !body || !Array.isArray(body.models)) {
          showError(errorMessage(response, body));
          return;
        }
        fillModels(body.models);
        showError("");
        setStatus(body.models.length ? "" : "The server has no models.");
        if (currentFile) { predict(); }
      });
    }).catch(function () {
      showError("Cannot reach the server. Is it running?");
    });
  }

  function fillModels(models) {
    var previous = modelSelect.value;
    modelSelect.textContent = "";
    models.forEach(function (m) {
      var option = document.createElement("option");
      option.value = m.name;
      var card = m.card || {};
      var classes = card.labels ? " · " + card.labels.length + " classes" : "";
      option.textContent = m.name + classes + (m.ready === false ? " (loading)" : "");
      option.selected = previous ? m.name === previous : !!m.default;
      modelSelect.appendChild(option);
    });
    modelSelect.disabled = models.length === 0;
  }

  function setFile(file) {
    if (!file) { return; }
    currentFile = file;
    if (previewUrl) { URL.revokeObjectURL(previewUrl); }
    if (file.type && file.type.indexOf("image/") === 0) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      preview.alt = "Preview of " + file.name;
      preview.hidden = false;
    } else {
      previewUrl = null;
      preview.hidden = true;
      preview.removeAttribute("src");
    }
    dropText.textContent = file.name + " — choose or drop another image";
    predict();
  }

  function predict() {
    var model = modelSelect.value;
    if (!currentFile || !model) { return; }
    if (pending) { pending.abort(); }
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    pending = controller;
    var form = new FormData();
    form.append("file", currentFile, currentFile.name);
    showError("");
    setStatus("Predicting…");
    results.setAttribute("aria-busy", "true");
    var started = performance.now();
    var target = url("models/" + encodeURIComponent(model) + "/predict?top_k=" + TOP_K);
    fetch(target, { method: "POST", body: form, headers: headers(), signal: controller && controller.signal })
      .then(function (response) {
        return readJson(response).then(function (body) {
          var roundTrip = performance.now() - started;
          if (response.status === 401) {
            results.hidden = true;
            askForKey(apiKey ? "The API key was not accepted. " + errorMessage(response, body)
                             : "This server needs an API key.");
            return;
          }
          if (!response.ok || !body || !Array.isArray(body.predictions) || !body.predictions.length) {
            results.hidden = true;
            showError(errorMessage(response, body));
            return;
          }
          render(body, roundTrip);
        });
      })
      .catch(function (err) {
        if (err && err.name === "AbortError") { return; }
        results.hidden = true;
        showError("Cannot reach the server. Is it running?");
      })
      .then(function () {
        if (pending === controller) { pending = null; }
        results.removeAttribute("aria-busy");
      });
  }

  function render(body, roundTrip) {
    var top = body.predictions[0].top_k || [];
    bars.textContent = "";
    top.forEach(function (entry, i) {
      var percent = Math.max(0, Math.min(100, entry.probability * 100));
      var text = percent >= 99.95 || percent < 0.05 ? percent.toFixed(0) : percent.toFixed(1);
      var li = document.createElement("li");
      li.className = "bar" + (i === 0 ? " best" : "");
      var name = document.createElement("span");
      name.className = "name";
      name.textContent = entry.label;
      name.title = entry.label + " (class " + entry.index + ")";
      var track = document.createElement("span");
      track.className = "track";
      track.setAttribute("aria-hidden", "true");
      var fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = percent.toFixed(2) + "%";
      track.appendChild(fill);
      var value = document.createElement("span");
      value.className = "value";
      value.textContent = text + "%";
      li.appendChild(name);
      li.appendChild(track);
      li.appendChild(value);
      bars.appendChild(li);
    });
    var t = body.timings_ms || {};
    var parts = [];
    if (typeof t.total === "number") { parts.push("server " + t.total.toFixed(1) + " ms"); }
    if (typeof t.inference === "number") { parts.push("inference " + t.inference.toFixed(1) + " ms"); }
    parts.push("round trip " + roundTrip.toFixed(0) + " ms");
    latency.textContent = "Latency: " + parts.join(" · ") + " — model " + body.model;
    results.hidden = false;
    setStatus("Top prediction: " + (top[0] ? top[0].label : "none"));
  }

  fileInput.addEventListener("change", function () {
    if (fileInput.files && fileInput.files[0]) { setFile(fileInput.files[0]); }
  });
  modelSelect.addEventListener("change", predict);

  ["dragenter", "dragover"].forEach(function (type) {
    drop.addEventListener(type, function (event) {
      event.preventDefault();
      drop.classList.add("over");
    });
  });
  ["dragleave", "dragend"].forEach(function (type) {
    drop.addEventListener(type, function () { drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (event) {
    event.preventDefault();
    drop.classList.remove("over");
    var files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) { setFile(files[0]); }
  });
  // A file dropped next to the drop zone would otherwise make the browser navigate away from the page.
  window.addEventListener("dragover", function (event) { event.preventDefault(); });
  window.addEventListener("drop", function (event) { event.preventDefault(); });

  function applyKey() {
    apiKey = keyInput.value.trim();
    loadModels();
  }
  $("key-apply").addEventListener("click", applyKey);
  keyInput.addEventListener("keydown", function (event) {
    if (event.key === "Enter") { event.preventDefault(); applyKey(); }
  });
  $("form").addEventListener("submit", function (event) { event.preventDefault(); });

  loadModels();
})();
