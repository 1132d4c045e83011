// The list of scanned slides, a page at a time (a folder may hold thousands: never all at once).
"use strict";
const $ = (id) => document.getElementById(id);
const PAGE = 50;
let offset = 0, total = 0;
const key = () => sessionStorage.getItem("histoscan-key") || "";
const headers = () => (key() ? {Authorization: "Bearer " + key()} : {});
const fmt = (v, d) => (v == null ? "" : Number(v).toFixed(d));

async function load() {
  const q = encodeURIComponent($("filter").value.trim());
  const r = await fetch(`/v1/slides?offset=${offset}&limit=${PAGE}&q=${q}`, {headers: headers()});
  const j = await r.json().catch(() => ({error: r.statusText}));
  $("message").textContent = r.ok ? "" : j.error;
  const body = document.querySelector("#slides tbody");
  body.textContent = "";
  if (!r.ok) return;
  total = j.total;
  for (const s of j.slides) {
    const tr = document.createElement("tr");
    tr.className = "slide status-row-" + s.status;
    const name = document.createElement("td");
    if (s.viewer) { const a = document.createElement("a"); a.href = s.viewer; a.textContent = s.name; name.appendChild(a); }
    else name.textContent = s.name;
    const status = document.createElement("td");
    status.className = "status status-" + s.status;
    status.textContent = s.status === "done" ? "scanned" : s.status;
    if (s.message) { status.title = s.message; status.textContent += ": " + s.message; }
    const model = document.createElement("td");  // the run that scanned it, and its fingerprint (identity)
    model.className = "model";
    model.textContent = s.run || s.model || "";
    if (s.model) model.title = `model ${s.model}` + (s.identity_key ? `, scan identity ${s.identity_key}` : "");
    tr.appendChild(name); tr.appendChild(status); tr.appendChild(model);
    for (const [v, d] of [[s.tumour_mm2, 3], [s.tissue_mm2, 3], [s.max_probability, 3], [s.topk_mean_probability, 3], [s.tiles, 0]]) {
      const td = document.createElement("td"); td.className = "num"; td.textContent = fmt(v, d); tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  const last = Math.min(offset + PAGE, total);
  $("count").textContent = total ? `${offset + 1}–${last} of ${total.toLocaleString("en")}` : "no slides";
  $("prev").disabled = offset === 0;
  $("next").disabled = last >= total;
}
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
$("next").addEventListener("click", () => { offset += PAGE; load(); });
$("filter").addEventListener("input", () => { offset = 0; load(); });
$("key").value = key();
$("key").addEventListener("change", () => { sessionStorage.setItem("histoscan-key", $("key").value); load(); });
load();
