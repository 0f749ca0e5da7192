// breastcad dashboard: the worklist and the study page, from the node's JSON API.
// Plain JS, no build step. Live progress is polling: /jobs and the page's own data.
"use strict";

const POLL_MS = 2000;
const state = {
  view: null,          // "worklist" | "study"
  studyUid: null,
  items: [],           // the worklist items as received
  sortKey: "suspicion",
  sortDir: "desc",
  lastWorklist: "",
  lastStudy: "",
  timer: null,
};

// -- small DOM helpers (text always goes through textContent) ---------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function pct(value) {
  return value === null || value === undefined ? "-" : (100 * value).toFixed(1) + " %";
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${url}: ${response.status} ${detail}`);
  }
  return response.json();
}

// -- live job progress (header) ------------------------------------------------------------

async function refreshProgress() {
  const jobs = (await getJson("/jobs?limit=200")).items;
  const count = (s) => jobs.filter((j) => j.state === s).length;
  const active = count("pending") + count("queued");
  const text = `jobs: ${count("running")} running, ${active} waiting, ` +
    `${count("done")} done, ${count("failed")} failed` +
    ` (updated ${new Date().toLocaleTimeString()})`;
  document.getElementById("progress").textContent = text;
}

// -- worklist -------------------------------------------------------------------------------

function compare(a, b, key) {
  const x = a[key], y = b[key];
  const missing = (v) => v === null || v === undefined || v === "";
  if (missing(x) && missing(y)) return 0;
  if (missing(x)) return 1;   // unknowns last whatever the direction
  if (missing(y)) return -1;
  if (typeof x === "number" && typeof y === "number") return x - y;
  if (typeof x === "boolean") return (x ? 1 : 0) - (y ? 1 : 0);
  return String(x).localeCompare(String(y));
}

function sortedItems() {
  const items = state.items.slice();  // the server's order (suspicion, then arrival) breaks ties
  const sign = state.sortDir === "asc" ? 1 : -1;
  return items
    .map((item, index) => ({ item, index }))
    .sort((a, b) => {
      const missingA = a.item[state.sortKey] === null || a.item[state.sortKey] === undefined;
      const missingB = b.item[state.sortKey] === null || b.item[state.sortKey] === undefined;
      if (missingA !== missingB) return missingA ? 1 : -1;
      return sign * compare(a.item, b.item, state.sortKey) || a.index - b.index;
    })
    .map((pair) => pair.item);
}

function renderWorklist() {
  const body = document.querySelector("#worklist tbody");
  body.replaceChildren(
    ...sortedItems().map((item) =>
      el("tr", {
          class: "study-row",
          "data-study": item.study_instance_uid,
          onclick: () => { location.hash = "#/study/" + encodeURIComponent(item.study_instance_uid); },
        },
        el("td", {}, item.priority ? el("span", { class: "badge high", text: "HIGH" }) : ""),
        el("td", { class: "suspicion", text: pct(item.suspicion) }),
        el("td", { class: "label", text: item.label || "-" }),
        el("td", { text: item.modality || "-" }),
        el("td", {}, el("span", { class: "badge " + item.state, text: item.state })),
        el("td", {},
          el("a", {
            href: "#/study/" + encodeURIComponent(item.study_instance_uid),
            text: item.accession_number || item.study_instance_uid,
          })),
        el("td", { text: item.study_date || "-" }),
        el("td", { text: item.received_at ? new Date(item.received_at).toLocaleString() : "-" }),
      ))
  );
  document.getElementById("worklist-empty").hidden = state.items.length > 0;
  for (const th of document.querySelectorAll("#worklist th.sortable")) {
    th.classList.remove("sorted-asc", "sorted-desc");
    if (th.dataset.key === state.sortKey) th.classList.add("sorted-" + state.sortDir);
  }
}

async function refreshWorklist() {
  const params = new URLSearchParams();
  const modality = document.getElementById("filter-modality").value;
  const studyState = document.getElementById("filter-state").value;
  if (modality) params.set("modality", modality);
  if (studyState) params.set("state", studyState);
  const data = await getJson("/worklist?" + params.toString());
  const fingerprint = JSON.stringify(data.items);
  if (fingerprint !== state.lastWorklist) {
    state.lastWorklist = fingerprint;
    state.items = data.items;
    renderWorklist();
  }
}

// -- study page -----------------------------------------------------------------------------

const JOB_STEPS = ["pending", "queued", "running", "done"];

function jobSteps(job) {
  if (!job) return el("div", { class: "steps" }, el("span", { text: "receiving" }));
  const reached = JOB_STEPS.indexOf(job.state);
  return el("div", { class: "steps", "data-job-state": job.state },
    JOB_STEPS.map((step, i) => el("span", {
      class: job.state === "failed" && step === "done" ? "failed" : (i <= reached ? "reached" : ""),
      text: job.state === "failed" && step === "done" ? "failed" : step,
    })),
    job.reason ? el("span", { class: "failed", text: job.reason }) : null,
  );
}

function probabilityTable(result) {
  const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  return el("table", { class: "probs" },
    el("tbody", {}, entries.map(([label, p]) => el("tr", { "data-label": label },
      el("td", { text: label }),
      el("td", { class: "bar-cell" }, el("div", { class: "bar", style: `width:${(100 * p).toFixed(1)}%` })),
      el("td", { text: pct(p) }),
    ))));
}

function deliveriesTable(result) {
  if (!result.deliveries.length) return el("p", { class: "muted", text: "No deliveries (no route matched)." });
  return el("table", { class: "deliveries" },
    el("thead", {}, el("tr", {},
      ["Destination", "State", "Attempts", "Last error", ""].map((h) => el("th", { text: h })))),
    el("tbody", {}, result.deliveries.map((d) => el("tr", { "data-delivery": d.id },
      el("td", { text: d.destination + (d.forward_source ? " (with sources)" : "") }),
      el("td", {}, el("span", { class: "badge " + d.state, text: d.state })),
      el("td", { text: d.attempts }),
      el("td", { text: d.last_error || "" }),
      el("td", {}, d.state === "failed"
        ? el("button", { type: "button", class: "retry", onclick: () => retryDelivery(d.id) }, "Retry")
        : ""),
    ))));
}

async function retryDelivery(id) {
  const response = await fetch(`/deliveries/${id}/retry`, { method: "POST" });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    showError(`retry of delivery ${id}: ${detail}`);
    return;
  }
  state.lastStudy = "";
  await refreshStudy();
}

async function similarCases(result, container) {
  let data;
  try {
    data = await getJson(`/results/${result.id}/similar?k=5`);
  } catch (err) {
    container.replaceChildren(el("p", { class: "muted", text: "No similar cases indexed for this result." }));
    return;
  }
  if (!data.items.length) {
    container.replaceChildren(el("p", { class: "muted", text: "No similar past cases yet." }));
    return;
  }
  container.replaceChildren(el("div", { class: "similar" }, data.items.map((c) =>
    el("figure", { "data-study": c.study_instance_uid },
      el("a", { href: "#/study/" + encodeURIComponent(c.study_instance_uid) },
        el("img", { src: c.thumbnail, alt: "similar case " + c.label, loading: "lazy" })),
      el("figcaption", {},
        el("strong", { text: c.label }),
        c.ground_truth ? ` (confirmed ${c.ground_truth})` : "",
        ` - distance ${c.distance.toFixed(3)}`)))));
}

const SIDES = { R: "Right breast", L: "Left breast" };

function sideName(laterality) {
  return SIDES[laterality] || "Breast, side unknown";
}

function viewName(view) {
  return [view.laterality, view.view_position].filter(Boolean).join(" ") || "view";
}

function sourceSrc(sop, size) {
  return `/instances/${encodeURIComponent(sop)}/image.png` + (size ? `?size=${size}` : "");
}

// the per-breast findings of a mammography result: right breast first (on the left, as hung)
function breastPanels(result) {
  return el("div", { class: "breasts" }, result.breasts.map((breast) => {
    const probability = breast.probabilities ? breast.probabilities[breast.label] : null;
    // the study finding is the more suspicious breast's: say which one it is
    const decides = breast.label === result.label && probability === result.probability;
    return el("section", { class: "breast" + (decides ? " decides" : ""),
                           "data-laterality": breast.laterality || "unknown" },
      el("h3", {},
        sideName(breast.laterality), ": ",
        el("span", { class: "breast-finding", text: `${breast.label || "-"} ${pct(probability)}` }),
        decides ? el("span", { class: "badge", text: "study finding" }) : null),
      breast.probabilities ? probabilityTable({ probabilities: breast.probabilities }) : null,
      el("div", { class: "views" }, breast.views.map((view) => {
        const name = viewName({ laterality: breast.laterality, ...view });
        return el("div", { class: "view", "data-sop": view.sop_instance_uid,
                           "data-series": view.series_instance_uid },
          el("figure", {},
            el("img", { class: "source", src: sourceSrc(view.sop_instance_uid, 512), alt: name }),
            el("figcaption", { text: `${name} source` })),
          view.heatmap ? el("figure", {},
            el("img", { class: "heatmap", src: view.heatmap, alt: `heatmap ${name}` }),
            el("figcaption", { text: `${name} heatmap` })) : null,
        );
      })),
    );
  }));
}

function imagesOf(result) {
  // the images no breast panel shows (all of them for US and SM results)
  const perImage = result.per_image || [];
  const shown = new Set((result.breasts || []).flatMap((b) => b.views.map((v) => v.index)));
  return result.heatmaps.map((link, i) => ({ link, image: perImage[i] || {}, index: i + 1 }))
    .filter((entry) => !shown.has(entry.index));
}

function resultBlock(result) {
  const breasts = result.breasts || [];
  const images = imagesOf(result);
  const similar = el("div", { class: "similar-cases" }, el("p", { class: "muted", text: "loading..." }));
  const block = el("div", { class: "result", "data-result": result.id },
    el("p", {},
      breasts.length ? el("span", { class: "muted", text: "Study finding (the more suspicious breast): " }) : "",
      el("span", { class: "finding", text: `${result.label} ${pct(result.probability)}` }),
      " ",
      result.priority ? el("span", { class: "badge high", text: "HIGH PRIORITY" }) : "",
      result.not_assessable ? el("span", { class: "badge failed", text: "not assessable" }) : "",
      el("span", { class: "muted", text: ` model ${result.model.name} ${result.model.version}` }),
      " ", el("a", { href: result.sr, text: "SR" }),
      result.predecessor_id ? el("span", { class: "muted", text: ` supersedes result ${result.predecessor_id}` }) : ""),
    breasts.length ? breastPanels(result) : probabilityTable(result),
    images.length ? [
      el("h3", { text: breasts.length ? "Other images" : "Images" }),
      el("div", { class: "images" }, images.map(({ link, image }) => [
        image.sop_instance_uid ? el("figure", {},
          el("img", { class: "source", src: sourceSrc(image.sop_instance_uid), alt: "source image" }),
          el("figcaption", { text: "source" + (image.laterality ? " " + image.laterality : "") })) : null,
        el("figure", {},
          el("img", { class: "heatmap", src: link, alt: "heatmap " + (image.label || result.label) }),
          el("figcaption", { text: `heatmap: ${image.label || result.label}` })),
      ])),
    ] : null,
    el("h3", { text: "Similar past cases" }), similar,
    el("h3", { text: "Deliveries" }), deliveriesTable(result),
  );
  similarCases(result, similar);
  return block;
}

function resultList(results) {
  // current result first, the ones it superseded folded away
  return results.slice().reverse().map((r, i) => i === 0 ? resultBlock(r)
    : el("details", {}, el("summary", { text: `earlier result ${r.id}: ${r.label}` }), resultBlock(r)));
}

// A result over several series (a mammography study's: one for its views in all their series)
// is shown once, in its own section; a series' own results (US, SM) under that series.
function isStudyResult(result) {
  return (result.breasts || []).length > 0 || (result.series_instance_uids || []).length > 1;
}

function resultChains(study) {
  // results that supersede one another: a series' own, or the mammography results of the study
  const chains = new Map();
  for (const result of study.results || []) {
    const key = isStudyResult(result) ? "study " + result.modality : "series " + result.series_instance_uid;
    if (!chains.has(key)) chains.set(key, []);
    chains.get(key).push(result);  // oldest first, as the API lists them
  }
  return chains;
}

function latestJob(jobs) {
  return jobs.reduce((latest, job) => (!latest || job.id > latest.id ? job : latest), null);
}

function studyResultSection(key, results, seriesByUid) {
  const current = results[results.length - 1];
  const covered = current.series_instance_uids || [current.series_instance_uid];
  const views = new Map();  // series -> "R CC", from the breasts' views
  for (const breast of current.breasts || []) {
    for (const view of breast.views) {
      const name = viewName({ laterality: breast.laterality, ...view });
      views.set(view.series_instance_uid, [...(views.get(view.series_instance_uid) || []), name]);
    }
  }
  const jobs = covered.flatMap((uid) => (seriesByUid.get(uid) || { jobs: [] }).jobs);
  return el("section", { class: "series study-result", "data-result-group": key },
    el("h2", { text: `${current.modality || "?"} study result over ${covered.length} series` }),
    el("ul", { class: "covered" }, covered.map((uid) => el("li", { "data-series": uid },
      el("strong", { text: (views.get(uid) || ["?"]).join(", ") }), " ",
      el("span", { class: "muted uid", text: uid })))),
    jobSteps(latestJob(jobs)),
    resultList(results));
}

function renderStudy(study) {
  document.getElementById("study-title").textContent =
    "Study " + (study.accession_number || study.study_instance_uid);
  document.getElementById("study-facts").replaceChildren(
    el("dt", { text: "Study Instance UID" }), el("dd", { text: study.study_instance_uid }),
    el("dt", { text: "Accession" }), el("dd", { text: study.accession_number || "-" }),
    el("dt", { text: "Study date" }), el("dd", { text: study.study_date || "-" }),
  );
  const seriesByUid = new Map(study.series.map((s) => [s.series_instance_uid, s]));
  const chains = resultChains(study);
  const studySections = [];
  const coveredBy = new Map();  // series uid -> the study result covering it
  for (const [key, results] of chains) {
    if (!key.startsWith("study ")) continue;
    studySections.push(studyResultSection(key, results, seriesByUid));
    const current = results[results.length - 1];
    for (const uid of current.series_instance_uids || []) coveredBy.set(uid, current);
  }
  const seriesSections = study.series.map((series) => {
    const job = series.jobs.length ? series.jobs[series.jobs.length - 1] : null;
    const own = chains.get("series " + series.series_instance_uid) || [];
    const covering = coveredBy.get(series.series_instance_uid);
    if (covering && !own.length) {
      // analysed in a study result shown above: one line, not the result again
      return el("section", { class: "series covered-series", "data-series": series.series_instance_uid },
        el("strong", { text: `${series.modality || "?"} series, ${series.instance_count} instance(s)` }), " ",
        el("span", { class: "muted uid", text: series.series_instance_uid }), " ",
        el("span", { class: "badge " + (job ? job.state : "done"), text: job ? job.state : "analysed" }),
        el("span", { class: "covered-by", text: ` analysed with the study: result ${covering.id} above` }));
    }
    return el("section", { class: "series", "data-series": series.series_instance_uid },
      el("h2", { text: `${series.modality || "?"} series, ${series.instance_count} instance(s)` }),
      el("p", { class: "muted", text: series.series_instance_uid }),
      jobSteps(job), own.length ? resultList(own) : el("p", { class: "muted", text: "No result yet." }));
  });
  document.getElementById("study-series").replaceChildren(...studySections, ...seriesSections);
}

async function refreshStudy() {
  const study = await getJson("/studies/" + encodeURIComponent(state.studyUid));
  // re-render only what changed: images are not reloaded on every poll
  const fingerprint = JSON.stringify(study);
  if (fingerprint !== state.lastStudy) {
    state.lastStudy = fingerprint;
    renderStudy(study);
  }
}

// -- routing and polling --------------------------------------------------------------------

async function tick() {
  try {
    await refreshProgress();
    if (state.view === "study") await refreshStudy();
    else await refreshWorklist();
    showError("");
  } catch (err) {
    showError(err.message);
  }
}

function route() {
  const match = location.hash.match(/^#\/study\/(.+)$/);
  state.view = match ? "study" : "worklist";
  state.studyUid = match ? decodeURIComponent(match[1]) : null;
  state.lastStudy = "";
  document.getElementById("worklist-view").hidden = state.view !== "worklist";
  document.getElementById("study-view").hidden = state.view !== "study";
  clearInterval(state.timer);
  tick();
  state.timer = setInterval(tick, POLL_MS);
}

document.querySelector("#worklist thead").addEventListener("click", (event) => {
  const th = event.target.closest("th.sortable");
  if (!th) return;
  if (state.sortKey === th.dataset.key) state.sortDir = state.sortDir === "asc" ? "desc" : "asc";
  else { state.sortKey = th.dataset.key; state.sortDir = "desc"; }
  renderWorklist();
});
for (const id of ["filter-modality", "filter-state"]) {
  document.getElementById(id).addEventListener("change", () => { state.lastWorklist = ""; tick(); });
}
window.addEventListener("hashchange", route);
route();
