"""GET /: a small page to try the model in a browser (plain HTML and JavaScript, no build step).

Every upload is shown as a picture: the browser's own decoding where it can, else (TIFF, the
Kaggle format, which browsers do not display) a PNG preview from ``/v1/preview``. Cards come in
upload order. After a prediction the card shows P(tumour) as the bar (the model's probability of
the tumour class, whatever class it predicts), with the answer (the class, or ``refer`` / ``not
tissue`` / ``out of distribution`` in amber) and the model's class beside it, the uncertainty and
the tissue check's flag. "Why?" asks ``/v1/explain`` for the Grad-CAM overlay and shows it beside
the patch. Overlays share one scale across the page (full colour = the largest map value seen so
far; earlier overlays are redrawn when it grows), or, with the box ticked, each its own maximum;
the caption says which. When the explainer is not built yet the page says the first map is slow.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>histoscan</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:56rem;color:#222}
 #drop{border:2px dashed #a56;border-radius:8px;padding:2rem;text-align:center;background:#fbf5f8}
 #drop.over{background:#f3dce8}
 .card{display:flex;gap:1rem;align-items:center;border-bottom:1px solid #eee;padding:.5rem 0}
 .card img{width:96px;height:96px;object-fit:cover;border-radius:4px}
 .bar{background:#eee;border-radius:4px;height:12px;width:16rem}
 .bar div{background:#b2386e;height:12px;border-radius:4px}
 .error{color:#b00} .withheld{color:#a60;font-weight:bold} .detail{font-size:.85rem;color:#555}
 .why{margin-left:.5rem} .card img.overlay{width:144px;height:144px}
 input[type=password]{width:16rem} .ptumour{font-variant-numeric:tabular-nums}
</style></head>
<body>
<h1>histoscan</h1>
<p id="model">loading model card...</p>
<div id="drop">Drop patches here (TIFF, PNG, JPEG) or <input id="pick" type="file" multiple accept=".tif,.tiff,.png,.jpg,.jpeg,image/*"></div>
<p><label>API key (if the server needs one): <input id="key" type="password" autocomplete="off"></label></p>
<p><label><input id="perimage" type="checkbox"> scale each Grad-CAM map to its own maximum (default: one scale
across the page, so a weak map looks weak)</label></p>
<p id="slow" class="detail" hidden>The first "Why?" map takes a few seconds longer: the explainer is built on
first use (start the server with --explain-warm to build it at start-up).</p>
<div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
let positive = null;  // the tumour class: the bar shows its probability
let shared = 0;       // one overlay scale across the page: the largest map value seen so far
const explained = []; // {file, box} of every overlay drawn on the shared scale, redrawn when it grows
function headers() { const k = $("key").value; return k ? {"Authorization": "Bearer " + k} : {}; }
function tumourClass(classes) {
  return classes.find((c) => ["tumor", "tumour"].includes(c.toLowerCase())) || classes[classes.length - 1];
}
async function card() {
  const r = await fetch("/v1/model", {headers: headers()});
  const j = await r.json();
  $("model").textContent = r.ok ? `model ${j.model}: ${j.architecture}, classes ${j.classes.join(" / ")}, input ${j.input_size} px` : j.error;
  if (r.ok) { positive = tumourClass(j.classes); $("slow").hidden = !!j.explainer_ready; }
}
function show(file, j) {
  const row = document.createElement("div"); row.className = "card";
  const img = document.createElement("img"); img.alt = file.name; img.className = "upload"; row.appendChild(img);
  preview(file, img);
  const info = document.createElement("div");
  if (j.error) { info.innerHTML = `<b></b><div class="error"></div>`; info.querySelector("b").textContent = file.name;
                 info.querySelector(".error").textContent = j.error; }
  else {
    const cls = positive || tumourClass(Object.keys(j.probabilities));
    const pct = (100 * j.probabilities[cls]).toFixed(1);
    info.innerHTML = `<b></b> <span class="ptumour"></span> <span class="answer"></span>` +
      `<div class="bar" title="P(tumour)"><div></div></div>` +
      `<div class="detail"><span class="label"></span> <span class="uncertainty"></span> <span class="quality"></span></div>`;
    info.querySelector("b").textContent = file.name;
    const said = j.answer || j.label;
    info.querySelector(".answer").textContent = said;
    if (said !== j.label) info.querySelector(".answer").classList.add("withheld");
    info.querySelector(".label").textContent = `model's class: ${j.label}`;
    info.querySelector(".uncertainty").textContent = j.uncertainty == null ? "" : `uncertainty ${j.uncertainty.toFixed(4)}`;
    info.querySelector(".quality").textContent = j.quality ? `tissue check: ${j.quality}` : "";
    info.querySelector(".ptumour").textContent = `P(${cls}) ${pct}%`;
    info.querySelector(".bar div").style.width = pct + "%";
    const why = document.createElement("button"); why.className = "why"; why.textContent = "Why?";
    why.addEventListener("click", () => explain(file, row, why));
    info.querySelector(".answer").after(why);
  }
  row.appendChild(info); $("results").appendChild(row);
}
function preview(file, img) {
  // browsers decode PNG and JPEG; a TIFF (the Kaggle format) fails, and the server sends a PNG of it
  let asked = false;
  img.addEventListener("error", async () => {
    if (asked) return; asked = true;
    const body = new FormData(); body.append("file", file);
    const r = await fetch("/v1/preview", {method: "POST", body, headers: headers()});
    if (r.ok) img.src = URL.createObjectURL(await r.blob());
  });
  const reader = new FileReader(); reader.onload = () => { img.src = reader.result; }; reader.readAsDataURL(file);
}
async function overlay(file, scale) {
  const body = new FormData(); body.append("file", file);
  const q = scale ? `?scale=${scale}` : "";
  const r = await fetch("/v1/explain" + q, {method: "POST", body, headers: headers()});
  return [r, await r.json()];
}
function draw(box, r, j, perImage) {
  box.replaceChildren(); box.className = "explanation";
  if (!r.ok) { box.className = "error"; box.textContent = j.error; return; }
  const ov = document.createElement("img"); ov.className = "overlay"; ov.alt = "Grad-CAM overlay";
  ov.src = "data:image/png;base64," + j.overlay_png;
  const cap = document.createElement("div"); cap.className = "caption";
  const how = perImage ? "per-image scale: full colour = this map's max" : "one scale across the page: full colour";
  cap.textContent = `evidence for ${j.target} (${j.method}; ${how} = map value ${j.scale.toPrecision(3)}; ` +
    `this map's max ${j.map_max.toPrecision(3)})`;
  box.appendChild(ov); box.appendChild(cap);
}
async function explain(file, row, button) {
  button.disabled = true; button.textContent = "explaining...";
  const perImage = $("perimage").checked;
  let [r, j] = await overlay(file, perImage ? 0 : shared);
  const box = document.createElement("div");
  if (r.ok) $("slow").hidden = true;
  if (r.ok && !perImage && j.map_max > shared) {
    shared = j.map_max;  // a new largest value: this map is drawn at it, the earlier ones are redrawn
    if (j.scale !== shared) [r, j] = await overlay(file, shared);
    for (const e of explained) { const [r2, j2] = await overlay(e.file, shared); draw(e.box, r2, j2, false); }
  }
  draw(box, r, j, perImage);
  if (r.ok && !perImage) explained.push({file, box});
  row.appendChild(box); button.remove();
}
async function send(files) {
  for (const f of files) {
    const body = new FormData(); body.append("file", f);
    try { const r = await fetch("/v1/predict", {method: "POST", body, headers: headers()}); show(f, await r.json()); }
    catch (e) { show(f, {error: String(e)}); }
  }
}
$("pick").addEventListener("change", (e) => send(e.target.files));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); send(e.dataTransfer.files); });
$("key").addEventListener("change", card);
card();
</script>
</body></html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index() -> str:
    """The try-it page."""
    return PAGE
