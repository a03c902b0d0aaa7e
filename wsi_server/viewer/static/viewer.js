// The slide viewer: OpenSeadragon on the slide's native Deep Zoom grid, with a scale bar,
// magnification, a metadata panel and the viewport kept in the URL.
//
// URL: /view/{id}?x=<centre x>&y=<centre y>&z=<zoom>&r=<rotation>, with x and y in
// full-resolution slide pixels, z in screen pixels per slide pixel (so 0.5 at a 40× scan is
// 20× on any screen size) and r in degrees. A copied link reopens the same field of view;
// every settled view is a history entry, so back/forward step through views.
import {
  STANDARD_MAGNIFICATIONS, describeFormat, escapeHtml, formatBytes, formatDimensions,
  formatMagnification, formatMpp, scaleBar, scanPower,
} from "./format.js?v={{v}}";
import { loadMe, renderAccount, renderShareBanner } from "./auth.js?v={{v}}";
import { initShare } from "./share.js?v={{v}}";
import { prefetchAhead } from "./prefetch.js?v={{v}}";

const $ = (id) => document.getElementById(id);
const slideId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");

let viewer = null;
let slide = null;
let power = { power: null, estimated: false };
let magnifications = [];

// -- errors ---------------------------------------------------------------------------
function showSlideError(detail, code) {
  const box = $("slide-error");
  box.querySelector(".detail").textContent = detail;
  box.querySelector(".code").textContent = code ? `error: ${code}` : "";
  box.hidden = false;
  $("scalebar").hidden = true;
  document.body.classList.add("has-error");
}

let failedTiles = 0;
let failureDetail = "";
async function onTileFailed(event) {
  failedTiles += 1;
  const toast = $("tile-error");
  if (failedTiles === 1 && event.tile) {
    // Ask the server why (its JSON error), once: "tile out of range", "unreadable slide"...
    try {
      const r = await fetch(event.tile.getUrl());
      if (!r.ok) {
        const body = await r.json();
        failureDetail = body.detail || body.error || "";
      }
    } catch {
      failureDetail = "the server did not answer";
    }
  }
  const why = failureDetail ? ` (${failureDetail})` : "";
  toast.querySelector(".text").textContent =
    `${failedTiles} image tile${failedTiles > 1 ? "s" : ""} could not be loaded${why}; ` +
    "parts of the slide may be missing or blurred.";
  toast.hidden = false;
}

// -- URL <-> viewport -----------------------------------------------------------------
function readUrlView() {
  const p = new URLSearchParams(location.search);
  const num = (k) => (p.has(k) && p.get(k) !== "" && isFinite(Number(p.get(k))) ? Number(p.get(k)) : null);
  const v = { x: num("x"), y: num("y"), z: num("z"), r: num("r") ?? 0 };
  return v.x !== null && v.y !== null && v.z !== null && v.z > 0 ? v : null;
}

function currentView() {
  const vp = viewer.viewport;
  const centre = vp.viewportToImageCoordinates(vp.getCenter(true));
  const z = vp.viewportToImageZoom(vp.getZoom(true));
  const r = ((Math.round(vp.getRotation(true)) % 360) + 360) % 360;
  return { x: centre.x, y: centre.y, z, r };
}

function sameView(a, b) {
  if (!a || !b) return false;
  const tol = 2 / a.z; // two screen pixels
  return Math.abs(a.x - b.x) <= tol && Math.abs(a.y - b.y) <= tol
    && Math.abs(a.z - b.z) / a.z < 0.005 && a.r === b.r;
}

function viewQuery(v) {
  const p = new URLSearchParams(location.search);
  p.set("x", Math.round(v.x));
  p.set("y", Math.round(v.y));
  p.set("z", Number(v.z.toPrecision(4)));
  if (v.r) p.set("r", v.r); else p.delete("r");
  return `?${p}`;
}

function applyView(v, immediately) {
  const vp = viewer.viewport;
  vp.setRotation(v.r || 0, immediately);
  vp.zoomTo(vp.imageToViewportZoom(v.z), null, immediately);
  vp.panTo(vp.imageToViewportCoordinates(v.x, v.y), immediately);
  if (immediately) vp.applyConstraints(true);
}

/** True when the viewport is where it is going (no zoom, pan or rotation in progress). */
function settled() {
  const vp = viewer.viewport;
  const a = vp.getCenter(true);
  const b = vp.getCenter(false);
  const zoom = vp.getZoom(false);
  return Math.abs(vp.getZoom(true) - zoom) <= zoom * 1e-6
    && Math.abs(a.x - b.x) <= 1e-6 / zoom && Math.abs(a.y - b.y) <= 1e-6 / zoom
    && Math.abs(vp.getRotation(true) - vp.getRotation(false)) < 1e-6;
}

let urlTimer = 0;
let replaceNext = false; // after a history step, a settled view corrects that entry
function scheduleUrlUpdate() {
  clearTimeout(urlTimer);
  urlTimer = setTimeout(() => {
    if (!settled()) return; // still moving: the animation's end schedules another update
    const now = currentView();
    if (sameView(now, readUrlView())) { replaceNext = false; return; }
    const url = viewQuery(now);
    if (replaceNext) history.replaceState(null, "", url);
    else history.pushState(null, "", url);
    replaceNext = false;
  }, 250);
}

// -- readouts: magnification, scale bar, rotation -------------------------------------
function updateReadouts() {
  if (!viewer || !viewer.world.getItemCount()) return;
  const vp = viewer.viewport;
  const z = vp.viewportToImageZoom(vp.getZoom(true));
  const mag = $("mag");
  if (power.power) {
    const m = power.power * z;
    mag.textContent = `${power.estimated ? "≈ " : ""}${formatMagnification(m)}`;
    mag.dataset.magnification = String(m);
    // Magnifications below the whole-slide view of a small slide cannot be reached.
    const minMag = power.power * vp.viewportToImageZoom(vp.getMinZoom()) * 0.999;
    for (const b of $("mags").children) {
      const bm = Number(b.dataset.mag);
      b.setAttribute("aria-pressed", String(Math.abs(bm - m) / m < 0.02));
      b.disabled = bm < minMag;
    }
  } else {
    mag.textContent = `${Math.round(z * 100)} %`;
  }
  const bar = $("scalebar");
  const mpp = slide.mpp && slide.mpp[0];
  const sb = mpp ? scaleBar(mpp / z) : null;
  if (sb && !document.body.classList.contains("has-error")) {
    bar.hidden = false;
    bar.querySelector(".bar").style.width = `${sb.px.toFixed(1)}px`;
    bar.querySelector(".label").textContent = sb.label;
    bar.dataset.um = String(sb.um);
    bar.dataset.px = String(sb.px);
  } else {
    bar.hidden = true;
  }
  const r = ((Math.round(vp.getRotation(true)) % 360) + 360) % 360;
  $("rotation").textContent = r ? `${r}°` : "";
}

function goToMagnification(m) {
  if (!power.power) return;
  const vp = viewer.viewport;
  vp.zoomTo(vp.imageToViewportZoom(m / power.power));
  vp.applyConstraints();
}

// -- the side panel ---------------------------------------------------------------------
function renderPanel(s) {
  const props = s.properties || {};
  const scanner = props["aperio.ScanScope ID"] || props["hamamatsu.Product"]
    || props["dicom.ManufacturerModelName"] || props["openslide.vendor"];
  const rows = [
    ["Name", s.name],
    ["Format", describeFormat(s)],
    ["Dimensions", formatDimensions(s.width, s.height)],
    ["Resolution", formatMpp(s.mpp)],
    ["Objective", s.objective_power ? formatMagnification(s.objective_power)
      : power.power ? `≈ ${formatMagnification(power.power)} (from pixel size)` : "–"],
    ["Levels", String(s.level_count)],
    ["Tile size", s.native_tile_size ? `${s.native_tile_size} px` : "–"],
    ["File size", formatBytes(s.size_bytes)],
  ];
  if (scanner) rows.push(["Scanner", scanner]);
  $("meta").innerHTML = rows.map(([k, v]) => `<dt>${escapeHtml(k)}</dt><dd>${escapeHtml(v)}</dd>`).join("");
  // How stored tiles come over the wire, and a link to the other way (keeping the view:
  // the address bar holds it by the time the link is followed).
  const stored = tileEncoding(s) === "stored";
  $("meta").insertAdjacentHTML("beforeend", `<dt>Tiles</dt><dd id="tile-encoding">${
    stored ? "as scanned (exact)" : "re-encoded (lighter)"} · <a href="" id="encoding-switch">${
    stored ? "use lighter tiles on a slow connection" : "use the scanned tiles"}</a></dd>`);
  $("encoding-switch").addEventListener("click", (e) => {
    e.preventDefault();
    const p = new URLSearchParams(location.search);
    p.set("encoding", stored ? "reencoded" : "stored");
    location.search = `?${p}`;
  });

  const shown = (s.associated || []).filter((n) => n === "label" || n === "macro");
  if (shown.length) {
    $("associated-images").innerHTML = shown.map((n) => `<figure data-name="${escapeHtml(n)}">
      <img alt="${escapeHtml(n)} image" loading="lazy"
           src="/api/slides/${encodeURIComponent(s.id)}/associated/${encodeURIComponent(n)}?v=${escapeHtml(s.version)}">
      <figcaption>${n === "label" ? "Label" : "Macro (overview photo)"}</figcaption></figure>`).join("");
    $("associated").hidden = false;
  }

  if (s.levels && s.levels.length) {
    $("levels").innerHTML = "<tr><th>Level</th><th>Size</th><th>Downsample</th></tr>" + s.levels.map(
      (lv, i) => `<tr><td>${i}</td><td>${formatDimensions(lv.width, lv.height)}</td>
        <td>${Number(lv.downsample.toPrecision(4))}</td></tr>`).join("");
    $("levels-section").hidden = false;
  }
  const keys = Object.keys(props).sort();
  if (keys.length) {
    $("props").innerHTML = keys.map((k) =>
      `<tr><td>${escapeHtml(k)}</td><td>${escapeHtml(props[k])}</td></tr>`).join("");
    $("props-count").textContent = String(keys.length);
    $("props-section").hidden = false;
  }
}

function renderMagnificationButtons() {
  const max = power.power ? power.power * 1.001 : 0;
  magnifications = STANDARD_MAGNIFICATIONS.filter((m) => m <= max);
  $("mags").innerHTML = magnifications.map((m, i) =>
    `<button class="btn" type="button" data-mag="${m}" aria-pressed="false"
      title="${formatMagnification(m)} (key ${i + 1})">${formatMagnification(m)}</button>`).join("");
  for (const b of $("mags").children) {
    b.addEventListener("click", () => goToMagnification(Number(b.dataset.mag)));
  }
}

// -- controls ---------------------------------------------------------------------------
function rotate(by) {
  const vp = viewer.viewport;
  vp.setRotation(vp.getRotation() + by);
}

function togglePanel() {
  const hidden = document.body.classList.toggle("panel-hidden");
  $("panel-toggle").setAttribute("aria-pressed", String(!hidden));
}

function toggleFullscreen() {
  if (document.fullscreenElement) document.exitFullscreen();
  else document.documentElement.requestFullscreen?.();
}

async function copyLink() {
  const button = $("copy-link");
  try {
    await navigator.clipboard.writeText(location.href);
    button.textContent = "Copied";
  } catch {
    window.prompt("Copy this link to the current view:", location.href);
  }
  setTimeout(() => { button.textContent = "Copy link"; }, 1500);
}

function bindControls() {
  $("zoom-in").addEventListener("click", () => { viewer.viewport.zoomBy(1.5); viewer.viewport.applyConstraints(); });
  $("zoom-out").addEventListener("click", () => { viewer.viewport.zoomBy(1 / 1.5); viewer.viewport.applyConstraints(); });
  $("home").addEventListener("click", () => viewer.viewport.goHome());
  $("rot-left").addEventListener("click", () => rotate(-90));
  $("rot-right").addEventListener("click", () => rotate(90));
  $("fullscreen").addEventListener("click", toggleFullscreen);
  $("copy-link").addEventListener("click", copyLink);
  $("panel-toggle").addEventListener("click", togglePanel);
  $("tile-retry").addEventListener("click", () => {
    failedTiles = 0;
    failureDetail = "";
    $("tile-error").hidden = true;
    const item = viewer.world.getItemAt(0);
    if (item) item.reset();
    viewer.forceRedraw();
  });
  document.addEventListener("keydown", (e) => {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.closest && e.target.closest("input, textarea, select, dialog")) return;
    const inCanvas = e.target.closest && e.target.closest(".openseadragon-canvas");
    if (/^[1-6]$/.test(e.key)) {
      const m = magnifications[Number(e.key) - 1];
      if (m) { goToMagnification(m); e.preventDefault(); }
    } else if (e.key === "i" || e.key === "I") {
      togglePanel();
    } else if (!inCanvas) {
      // OpenSeadragon handles these itself while its canvas has the focus.
      if (e.key === "0") viewer.viewport.goHome();
      else if (e.key === "r") rotate(90);
      else if (e.key === "R") rotate(-90);
      else if (e.key === "+" || e.key === "=") viewer.viewport.zoomBy(1.5);
      else if (e.key === "-" || e.key === "_") viewer.viewport.zoomBy(1 / 1.5);
      else return;
      viewer.viewport.applyConstraints();
    }
  });
}

// -- who is looking: account, share banner, Share button ----------------------------------
/** The view to share: the current viewport once the slide is open, else none. */
function shareableView() {
  if (!viewer || !viewer.world.getItemCount()) return null;
  const v = currentView();
  return { x: Math.round(v.x), y: Math.round(v.y), z: Number(v.z.toPrecision(4)), r: v.r };
}

/** The header's account area and, for a share-link viewer, the banner. */
async function renderAccess() {
  const me = await loadMe();
  renderAccount(me, $("account"));
  renderShareBanner(me, $("share-banner"), slideId);
  return me;
}

// -- start ------------------------------------------------------------------------------
/** "stored" or "reencoded": the page's ?encoding=, else the server's choice. */
function tileEncoding(s) {
  const asked = new URLSearchParams(location.search).get("encoding");
  return asked === "stored" || asked === "reencoded" ? asked : s.tile_encoding || "stored";
}

/** The slide's native descriptor asking for tiles in ``tileEncoding`` (OpenSeadragon
 *  copies a descriptor's query string onto every tile URL). */
function nativeDzi(s) {
  const url = new URL(s.native_dzi, location.href);
  url.searchParams.set("encoding", tileEncoding(s));
  return url.pathname + url.search;
}

function openViewer(s) {
  viewer = OpenSeadragon({
    element: $("osd"),
    prefixUrl: "/viewer/osd/images/",
    // ?source=iiif opens the slide through its IIIF Image API service instead of Deep Zoom.
    tileSources: new URLSearchParams(location.search).get("source") === "iiif"
      ? `/iiif/3/${encodeURIComponent(s.id)}/info.json` : nativeDzi(s),
    drawer: "canvas",
    showNavigationControl: false,
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    navigatorAutoFade: false,
    navigatorSizeRatio: 0.18,
    navigatorBackground: "#0b0c0d",
    maxZoomPixelRatio: 2,
    visibilityRatio: 0.2,
    animationTime: 0.5,
    timeout: 30000,
    // A 1920×1080 field of view needs ~70 native tiles plus coarser ones: request several
    // per frame (the default, 1, takes seconds at a browser's frame rate) and keep more
    // decoded tiles than the default 200 so that panning back does not refetch.
    maxTilesPerFrame: 6,
    maxImageCacheCount: 600,
    // At a stored level's own scale (10× on a 40× scan) the default 0.5 also loads the next
    // finer level, drawn at half size: 2-3× the tiles, rendered by the server when not
    // stored. 0.55 draws the 1:1 level there (benchmarks/bench_wan: WAN pan/zoom p95
    // 1.86 s -> 0.70-0.90 s, 653 -> 483 kB a step).
    minPixelRatio: 0.55,
    tileRetryMax: 1,
    tileRetryDelay: 800,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    preserveImageSizeOnResize: true,
  });
  window.wsiViewer = viewer; // for the browser tests and the console
  // The next screen in the direction of a pan, while the reader looks at this one
  // (?prefetch=0 turns it off, for comparison: benchmarks/bench_wan --think-ms).
  if (new URLSearchParams(location.search).get("prefetch") !== "0") {
    window.wsiPrefetch = prefetchAhead(viewer, currentView);
  }

  viewer.addHandler("open", () => {
    const v = readUrlView();
    if (v) applyView(v, true);
    updateReadouts();
    // The view we arrived at replaces the entry we arrived with; later views are new entries.
    history.replaceState(null, "", viewQuery(currentView()));
    replaceNext = false;
    viewer.canvas.focus({ preventScroll: true });
  });
  viewer.addHandler("open-failed", (e) => {
    showSlideError(`The image pyramid could not be opened: ${e.message || "unknown error"}.`, "open_failed");
  });
  viewer.addHandler("tile-load-failed", onTileFailed);
  // Time from navigation to the first painted tile (checked by the browser tests).
  const firstTile = () => {
    window.wsiFirstTileMs = performance.now();
    viewer.removeHandler("tile-drawn", firstTile);
  };
  viewer.addHandler("tile-drawn", firstTile);
  viewer.addHandler("animation", updateReadouts);
  viewer.addHandler("resize", updateReadouts);
  viewer.addHandler("rotate", updateReadouts);
  viewer.addHandler("animation-finish", () => { updateReadouts(); scheduleUrlUpdate(); });
  window.addEventListener("popstate", () => {
    const v = readUrlView();
    replaceNext = true; // stepping through history must not add entries
    if (v) applyView(v, false); else viewer.viewport.goHome();
  });
}

async function main() {
  bindControls();
  const access = renderAccess(); // in parallel with the slide's metadata
  const ok = await openSlide(access);
  // A share-link viewer is read-only; a slide that did not load has nothing to share.
  const me = await access;
  if (ok && me.can_share && slide?.can_share !== false) initShare(slideId, shareableView);
}

/**
 * Read the slide's metadata and open the viewer once the header is final (a share banner
 * changes the viewer's height); false when the slide cannot be shown.
 */
async function openSlide(access) {
  let body;
  try {
    const r = await fetch(`/api/slides/${encodeURIComponent(slideId)}`);
    body = await r.json().catch(() => ({ error: "bad_response", detail: `HTTP ${r.status}` }));
    if (!r.ok) {
      showSlideError(body.detail || `The server answered HTTP ${r.status}.`, body.error);
      $("slide-name").textContent = "Slide not available";
      return false;
    }
  } catch (err) {
    showSlideError(`The server could not be reached (${err.message}).`, "network");
    return false;
  }
  slide = body;
  document.title = `${slide.name} · wsi-server`;
  $("slide-name").textContent = slide.name;
  $("slide-sub").textContent = [describeFormat(slide), formatDimensions(slide.width, slide.height),
    formatMpp(slide.mpp)].filter((t) => t && t !== "–").join(" · ");
  if (slide.error || !slide.native_dzi) {
    const err = slide.error || {};
    showSlideError(err.detail || "The server cannot read this slide.", err.error || slide.status);
    return false;
  }
  power = scanPower(slide.objective_power, slide.mpp);
  renderMagnificationButtons();
  renderPanel(slide);
  if (typeof window.OpenSeadragon !== "function") {
    showSlideError("The viewer's OpenSeadragon script did not load; run `npm ci` on the server.", "assets_missing");
    return false;
  }
  await access;
  openViewer(slide);
  return true;
}

main();
