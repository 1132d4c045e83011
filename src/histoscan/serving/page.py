"""GET /: a small page to try the model in a browser (plain HTML and JavaScript, no build step)."""

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
 .error{color:#b00}
 input[type=password]{width:16rem}
</style></head>
<body>
<h1>histoscan</h1>
<p id="model">loading model card...</p>
<div id="drop">Drop patches here (TIFF, PNG, JPEG) or <input id="pick" type="file" multiple accept=".tif,.tiff,.png,.jpg,.jpeg,image/*"></div>
<p><label>API key (if the server needs one): <input id="key" type="password" autocomplete="off"></label></p>
<div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
function headers() { const k = $("key").value; return k ? {"Authorization": "Bearer " + k} : {}; }
async function card() {
  const r = await fetch("/v1/model", {headers: headers()});
  const j = await r.json();
  $("model").textContent = r.ok ? `model ${j.model}: ${j.architecture}, classes ${j.classes.join(" / ")}, input ${j.input_size} px` : j.error;
}
function show(file, j) {
  const row = document.createElement("div"); row.className = "card";
  const img = document.createElement("img"); img.alt = file.name; row.appendChild(img);
  const reader = new FileReader(); reader.onload = () => { img.src = reader.result; }; reader.readAsDataURL(file);
  const info = document.createElement("div");
  if (j.error) { info.innerHTML = `<b></b><div class="error"></div>`; info.querySelector("b").textContent = file.name;
                 info.querySelector(".error").textContent = j.error; }
  else {
    const pct = (100 * j.confidence).toFixed(1);
    info.innerHTML = `<b></b> <span class="label"></span> <span class="conf"></span><div class="bar"><div></div></div>`;
    info.querySelector("b").textContent = file.name;
    info.querySelector(".label").textContent = j.label;
    info.querySelector(".conf").textContent = pct + "%";
    info.querySelector(".bar div").style.width = pct + "%";
  }
  row.appendChild(info); $("results").prepend(row);
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
