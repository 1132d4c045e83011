// One slide: Deep Zoom tiles (OpenSeadragon), the probability grid as an overlay, the tumour regions on top.
"use strict";
const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem("histoscan-key") || "";
const headers = () => (key() ? {Authorization: "Bearer " + key()} : {});
const slideId = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
// what the page did, for tests and for anyone debugging in the console
const state = (window.histoscan = {info: null, viewer: null, tilesByLevel: {}, regions: [], selected: null, ready: false});

async function getJSON(url) {
  const r = await fetch(url, {headers: headers()});
  const j = await r.json().catch(() => ({error: `${r.status} ${r.statusText}`}));
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}
function showMessage(text) { $("message").textContent = text; }

async function main() {
  $("key").value = key();
  $("key").addEventListener("change", () => { sessionStorage.setItem("histoscan-key", $("key").value); location.reload(); });
  let info;
  try { info = await getJSON(`/v1/slides/${encodeURIComponent(slideId)}`); }
  catch (e) { showMessage(e.message); return; }
  state.info = info;
  $("title").textContent = info.name;
  document.title = `histoscan: ${info.name}`;
  const f = [];
  if (info.tumour_mm2 != null) f.push(`tumour ${info.tumour_mm2.toFixed(3)} mm²`);
  if (info.max_probability != null) f.push(`max P ${info.max_probability.toFixed(3)}`);
  if (info.topk_mean_probability != null) f.push(`top-${info.top_k ?? "k"} mean P ${info.topk_mean_probability.toFixed(3)}`);
  if (info.mpp) f.push(`${info.mpp.toFixed(3)} µm/px` + (info.slide_mpp_source ? ` (${info.slide_mpp_source})` : ""));
  const made = [info.run, info.model && `[${info.model}]`].filter(Boolean).join(" ");  // what made the result
  if (made) f.push(`model ${made}`);
  $("facts").textContent = f.join(" · ");
  if (info.overlay) $("colorbar").querySelector(".ramp").style.background = `linear-gradient(to right, ${info.overlay.colors.join(",")})`;
  if (info.status !== "done") {  // moved, deleted or failed: say so instead of an empty viewer
    showMessage(info.message || `this slide cannot be shown (${info.status})`);
    $("stage").style.display = "none";
    return;
  }
  const viewer = OpenSeadragon({
    id: "viewer",
    tileSources: info.dzi,
    loadTilesWithAjax: true,
    ajaxHeaders: headers(),
    showNavigationControl: false,  // its buttons need image files; the page has its own
    drawer: "canvas",
    maxZoomPixelRatio: 2,
    visibilityRatio: 0.5,
    gestureSettingsMouse: {clickToZoom: false},  // a click selects a region
  });
  state.viewer = viewer;
  viewer.addHandler("open-failed", (e) => showMessage(`the slide could not be opened: ${e.message}`));
  viewer.addHandler("tile-load-failed", (e) => showMessage(`a tile failed to load: ${e.message}`));
  viewer.addHandler("tile-loaded", (e) => {
    if (e.tiledImage === viewer.world.getItemAt(0)) state.tilesByLevel[e.tile.level] = (state.tilesByLevel[e.tile.level] || 0) + 1;
  });
  viewer.addHandler("open", async () => {
    await Promise.all([addOverlay(viewer, info), addRegions(viewer, info)]);
    updateScaleBar(viewer, info);
    state.ready = true;
  });
  viewer.addHandler("animation", () => updateScaleBar(viewer, info));
  viewer.addHandler("resize", () => updateScaleBar(viewer, info));
  viewer.addHandler("canvas-click", (e) => { if (e.quick) pick(viewer, e.position); });
  $("zoom-in").addEventListener("click", () => viewer.viewport.zoomBy(2));
  $("zoom-out").addEventListener("click", () => viewer.viewport.zoomBy(0.5));
  $("home").addEventListener("click", () => viewer.viewport.goHome());
}

// image pixels (of the Deep Zoom pyramid) -> an OpenSeadragon viewport rectangle (the image is 1 wide)
function rect(info, x, y, w, h) { return new OpenSeadragon.Rect(x / info.width, y / info.width, w / info.width, h / info.width); }

async function addOverlay(viewer, info) {
  const ov = info.overlay;
  if (!ov) { $("overlay-toggle").disabled = true; return; }
  const r = await fetch(ov.url, {headers: headers()});
  if (!r.ok) { showMessage(`heatmap: ${(await r.json().catch(() => ({}))).error || r.statusText}`); return; }
  const img = document.createElement("img");
  img.className = "heat"; img.id = "heat"; img.alt = "P(tumour) heatmap";
  img.src = URL.createObjectURL(await r.blob());
  await img.decode().catch(() => {});
  // an HTML overlay scales with the view; CSS image-rendering keeps each scanned cell a sharp square
  viewer.addOverlay({element: img, location: rect(info, ov.x, ov.y, ov.width, ov.height)});
  const apply = () => {
    img.style.opacity = $("opacity").value;
    img.style.visibility = $("overlay-toggle").checked ? "visible" : "hidden";
  };
  $("opacity").addEventListener("input", apply);
  $("overlay-toggle").addEventListener("change", apply);
  apply();
}

function polygons(geometry) {
  if (!geometry) return [];
  if (geometry.type === "Polygon") return [geometry.coordinates];
  if (geometry.type === "MultiPolygon") return geometry.coordinates;
  return [];
}

async function addRegions(viewer, info) {
  if (!info.regions) { $("regions-toggle").disabled = true; return; }
  let geo;
  try { geo = await getJSON(info.regions.url); } catch (e) { showMessage(`regions: ${e.message}`); return; }
  const [dx, dy] = info.regions.offset;
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "regions");
  svg.setAttribute("viewBox", `0 0 ${info.width} ${info.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  geo.features.forEach((feature, i) => {
    const polys = polygons(feature.geometry).map((poly) => poly.map((ring) => ring.map(([x, y]) => [x + dx, y + dy])));
    if (!polys.length) return;
    const path = document.createElementNS(NS, "path");
    path.setAttribute("d", polys.flat().map((ring) => "M" + ring.map((p) => p.join(",")).join("L") + "Z").join(""));
    path.dataset.index = String(i);
    svg.appendChild(path);
    state.regions.push({feature, polys, path});
  });
  viewer.addOverlay({element: svg, location: rect(info, 0, 0, info.width, info.height)});
  $("regions-toggle").addEventListener("change", () => { svg.style.visibility = $("regions-toggle").checked ? "visible" : "hidden"; });
}

// even-odd rule over every ring: holes (normal tissue inside a tumour) are not part of the region
function inside(rings, x, y) {
  let odd = false;
  for (const ring of rings) {
    for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
      const [xi, yi] = ring[i], [xj, yj] = ring[j];
      if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) odd = !odd;
    }
  }
  return odd;
}

const LABELS = {area_um2: ["area", (v) => `${(v / 1e6).toFixed(4)} mm² (${Math.round(v).toLocaleString("en")} µm²)`],
  mean_probability: ["mean P", (v) => v.toFixed(3)], max_probability: ["max P", (v) => v.toFixed(3)]};

function pick(viewer, position) {
  if (!$("regions-toggle").checked) return;
  const p = viewer.world.getItemAt(0).viewerElementToImageCoordinates(position);
  const hit = state.regions.find((r) => r.polys.some((rings) => inside(rings, p.x, p.y)));
  state.regions.forEach((r) => r.path.classList.toggle("selected", r === hit));
  state.selected = hit ? state.regions.indexOf(hit) : null;
  const box = $("region-info");
  box.textContent = "";
  if (!hit) return;
  const props = hit.feature.properties || {};
  const title = document.createElement("b");
  title.textContent = (props.classification && props.classification.name) || props.name || "region";
  const dl = document.createElement("dl");
  let m = props.measurements || {};
  if (Array.isArray(m)) m = Object.fromEntries(m.map((e) => [e.name, e.value]));  // older QuPath layout
  for (const [k, v] of Object.entries(m)) {
    const [label, show] = LABELS[k] || [k, (x) => (typeof x === "number" ? x.toPrecision(4) : String(x))];
    const dt = document.createElement("dt"); dt.textContent = label;
    const dd = document.createElement("dd"); dd.className = "m-" + k; dd.textContent = show(v);
    dl.appendChild(dt); dl.appendChild(dd);
  }
  box.appendChild(title); box.appendChild(dl);
}

// OpenSeadragon has no scale bar of its own (its plugin is not vendored here): a bar of a round length
// (1, 2 or 5 x 10^n µm) at most 160 screen pixels long, from the slide's µm/px and the current zoom.
function updateScaleBar(viewer, info) {
  const bar = $("scalebar");
  const item = viewer.world.getItemAt(0);
  if (!info.mpp || !item) { bar.textContent = ""; return; }
  const screenPerImage = item.viewportToImageZoom(viewer.viewport.getZoom(true));
  const umPerScreenPx = info.mpp / screenPerImage;
  const most = 160 * umPerScreenPx;
  const p = Math.pow(10, Math.floor(Math.log10(most)));
  const um = [5, 2, 1].map((k) => k * p).find((v) => v <= most);
  const px = um / umPerScreenPx;
  const label = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
  bar.innerHTML = `<div class="bar"></div><span class="label"></span>`;
  bar.querySelector(".bar").style.width = `${px.toFixed(1)}px`;
  bar.querySelector(".label").textContent = label;
  state.scale = {um, px};
}

main();
