// breastcad upload page: vanilla JS, no build step, no CDN.
// POST /analyse per file (progress from XHR upload events); a plain image's answer is the
// result; a DICOM file's answer names its study, polled at /studies/{uid} until the result of its
// series exists. Similar cases come from GET /results/{id}/similar when the node has it
// ({"items": [{label, ground_truth, distance, thumbnail, ...}]}); otherwise "no similar cases yet".
"use strict";

(function () {
  const POLL_MS = 1000;
  const POLL_LIMIT_MS = 15 * 60 * 1000;

  const form = document.getElementById("upload-form");
  const input = document.getElementById("file-input");
  const drop = document.getElementById("drop-zone");
  const modality = document.getElementById("modality");
  const results = document.getElementById("results");
  const template = document.getElementById("card-template");

  // When the node requires an API token, the browser holds it as a cookie (GET /login?token=...),
  // which same-origin requests carry; the page itself never sees the token.
  function apiFetch(url) {
    return window.fetch(url, { credentials: "same-origin" });
  }

  function newCard(file) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.querySelector(".file-name").textContent = file.name;
    const isDicom = /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom";
    card.querySelector(".kind").textContent = isDicom ? "DICOM" : "image";
    setStatus(card, "uploading", "Uploading…");
    results.prepend(card);
    return card;
  }

  function setStatus(card, state, text) {
    card.dataset.state = state;
    card.querySelector(".status").textContent = text;
  }

  function percent(value) {
    return (100 * value).toFixed(1) + " %";
  }

  function errorText(xhr) {
    try {
      const body = JSON.parse(xhr.responseText);
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    } catch (ignored) {
      // not JSON: fall through to the status line
    }
    return "the node answered " + xhr.status + " " + (xhr.statusText || "");
  }

  function showResult(card, finding) {
    card.querySelector(".result").hidden = false;
    card.querySelector(".label").textContent = finding.label;
    card.querySelector(".probability").textContent = percent(finding.probability);
    card.querySelector(".not-assessable").hidden = !finding.notAssessable;
    card.dataset.notAssessable = finding.notAssessable ? "true" : "false";
    const body = card.querySelector(".probabilities tbody");
    body.replaceChildren();
    const entries = Object.entries(finding.probabilities).sort((a, b) => b[1] - a[1]);
    for (const [name, value] of entries) {
      const row = document.createElement("tr");
      const label = document.createElement("td");
      label.textContent = name;
      const bar = document.createElement("td");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = Math.max(0, Math.min(100, 100 * value)).toFixed(1) + "%";
      bar.append(fill);
      const number = document.createElement("td");
      number.textContent = percent(value);
      row.append(label, bar, number);
      body.append(row);
    }
    card.querySelector(".model").textContent = finding.model
      ? "Model " + finding.model.name + " " + finding.model.version
      : "";
    card.querySelector(".stored-note").textContent = finding.storedNote;
    const img = card.querySelector(".heatmap");
    if (finding.heatmap.startsWith("data:")) {
      img.src = finding.heatmap;
    } else {
      apiFetch(finding.heatmap)
        .then((r) => (r.ok ? r.blob() : Promise.reject(new Error("heatmap " + r.status))))
        .then((blob) => {
          img.src = URL.createObjectURL(blob);
        })
        .catch((err) => {
          img.alt = "heatmap not available: " + err.message;
        });
    }
    setStatus(card, "done", "Done.");
  }

  function showSimilar(card, resultId) {
    const list = card.querySelector(".similar-list");
    const empty = card.querySelector(".similar-empty");
    list.replaceChildren();
    if (resultId === null) {
      empty.textContent = "No similar cases yet (a plain image is not stored, so it is not "
        + "compared with past cases).";
      empty.hidden = false;
      return;
    }
    apiFetch("/results/" + resultId + "/similar")
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => {
        const items = body === null ? [] : (Array.isArray(body) ? body : (body.items || []));
        if (!items.length) {
          empty.hidden = false;
          return;
        }
        for (const item of items.slice(0, 5)) {
          const li = document.createElement("li");
          if (item.thumbnail) {
            const thumb = document.createElement("img");
            thumb.className = "similar-thumb";
            thumb.alt = "heatmap of a similar case";
            apiFetch(item.thumbnail)
              .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
              .then((blob) => {
                thumb.src = URL.createObjectURL(blob);
              })
              .catch(() => thumb.remove());
            li.append(thumb);
          }
          const parts = [];
          if (item.label) parts.push(item.label);
          if (item.ground_truth) parts.push("confirmed " + item.ground_truth);
          if (typeof item.distance === "number") parts.push("distance " + item.distance.toFixed(2));
          if (typeof item.similarity === "number") parts.push("similarity " + item.similarity.toFixed(2));
          const text = document.createElement("span");
          text.textContent = parts.join(", ") || "a past case";
          li.append(text);
          list.append(li);
        }
      })
      .catch(() => {
        empty.hidden = false;
      });
  }

  function pollStudy(card, answer) {
    const started = Date.now();
    setStatus(card, "analysing", "Stored as a study; waiting for its analysis…");
    card.querySelector(".progress").removeAttribute("value");
    const tick = () => {
      apiFetch(answer.study_url)
        .then((r) => (r.ok ? r.json() : Promise.reject(new Error("study " + r.status))))
        .then((study) => {
          const series = (study.series || []).find(
            (s) => s.series_instance_uid === answer.series_instance_uid,
          );
          const result = series && series.results.length ? series.results[series.results.length - 1] : null;
          if (result) {
            showResult(card, {
              label: result.label,
              probability: result.probability,
              probabilities: result.probabilities,
              notAssessable: result.not_assessable,
              model: result.model,
              heatmap: result.heatmaps[0] || "",
              storedNote: "Stored as study " + answer.study_instance_uid
                + "; its Structured Report and heatmap were made like any other study's.",
            });
            showSimilar(card, result.id);
            return;
          }
          const job = series && series.jobs.length ? series.jobs[series.jobs.length - 1] : null;
          if (job && job.state === "failed") {
            setStatus(card, "error", "The analysis failed: " + (job.reason || "no reason given"));
            return;
          }
          const what = series ? (series.state === "receiving" ? "waiting for the series to complete"
            : "analysing (" + (job ? job.state : "queued") + ")") : "waiting";
          setStatus(card, "analysing", "Stored as a study; " + what + "…");
          if (Date.now() - started > POLL_LIMIT_MS) {
            setStatus(card, "error", "No result after 15 minutes; see the study in the API.");
            return;
          }
          window.setTimeout(tick, POLL_MS);
        })
        .catch((err) => {
          setStatus(card, "error", "Cannot follow the analysis: " + err.message);
        });
    };
    tick();
  }

  function upload(file) {
    const card = newCard(file);
    const progress = card.querySelector(".progress");
    progress.value = 0;
    const data = new FormData();
    data.append("file", file, file.name);
    data.append("modality", modality.value);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/analyse");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress.value = (100 * event.loaded) / event.total;
    });
    xhr.upload.addEventListener("load", () => {
      progress.removeAttribute("value");
      setStatus(card, "analysing", "Uploaded; analysing…");
    });
    xhr.addEventListener("load", () => {
      if (xhr.status === 200 || xhr.status === 202) {
        const answer = JSON.parse(xhr.responseText);
        if (answer.kind === "dicom") {
          pollStudy(card, answer);
          return;
        }
        showResult(card, {
          label: answer.label,
          probability: answer.probability,
          probabilities: answer.probabilities,
          notAssessable: answer.not_assessable,
          model: answer.model,
          heatmap: answer.heatmap,
          storedNote: "Analysed without storing a study: nothing of this image was kept.",
        });
        showSimilar(card, null);
        return;
      }
      setStatus(card, "error", errorText(xhr));
    });
    xhr.addEventListener("error", () => {
      setStatus(card, "error", "The upload failed: the node could not be reached.");
    });
    xhr.send(data);
  }

  function uploadAll(files) {
    for (const file of files) upload(file);
  }

  input.addEventListener("change", () => {
    uploadAll(Array.from(input.files));
    input.value = "";
  });
  form.addEventListener("submit", (event) => event.preventDefault());
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    uploadAll(Array.from(event.dataTransfer.files));
  });
})();
