// The slide library page: GET /api/slides (and the ingest queue when ingest runs),
// searchable and sortable; search and sort are kept in the URL so a list can be shared.
import {
  describeFormat, escapeHtml, formatBytes, formatDimensions, formatMagnification, formatMpp,
} from "./format.js?v={{v}}";
import { loadMe, renderAccount, renderShareBanner } from "./auth.js?v={{v}}";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = {
  slides: [],
  q: params.get("q") || "",
  sort: params.get("sort") || "name",
  desc: params.get("order") === "desc",
};

const STATUS_ORDER = { error: 0, quarantined: 1, ingesting: 2, waiting: 3, ready: 4 };
const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

const sortKeys = {
  name: (s) => s.name,
  format: (s) => describeFormat(s),
  size: (s) => s.size_bytes ?? -1,
  pixels: (s) => (s.width || 0) * (s.height || 0),
  mpp: (s) => (s.mpp ? s.mpp[0] : Infinity),
  status: (s) => STATUS_ORDER[s.status] ?? 5,
};

function compare(a, b) {
  const key = sortKeys[state.sort] || sortKeys.name;
  const ka = key(a);
  const kb = key(b);
  const c = typeof ka === "string" ? collator.compare(ka, kb) : ka - kb;
  return (state.desc ? -c : c) || collator.compare(a.name, b.name);
}

function matches(slide, words) {
  const hay = [slide.name, slide.format, slide.vendor, slide.id, slide.status,
    slide.error?.detail].filter(Boolean).join(" ").toLowerCase();
  return words.every((w) => hay.includes(w));
}

function statusCell(s) {
  const label = { ready: "Ready", error: "Unreadable", ingesting: "Ingesting",
    waiting: "Waiting", quarantined: "Quarantined" }[s.status] || s.status;
  const reason = s.error ? `<div class="reason">${escapeHtml(s.error.detail || s.error.error)}</div>` : "";
  return `<span class="badge ${escapeHtml(s.status)}">${escapeHtml(label)}</span>${reason}`;
}

function resolutionCell(s) {
  if (!s.mpp) return "–";
  const mag = s.objective_power ? ` · ${formatMagnification(s.objective_power)}` : "";
  return `${formatMpp(s.mpp)}${mag}`;
}

function row(s) {
  const viewable = s.status === "ready";
  const href = `/view/${encodeURIComponent(s.id)}`;
  const thumb = viewable
    ? `<div class="thumb"><img loading="lazy" decoding="async" alt=""
         src="/api/slides/${encodeURIComponent(s.id)}/thumbnail?max_size=192&v=${escapeHtml(s.version)}"></div>`
    : `<div class="thumb none">${s.status === "error" ? "no image" : "…"}</div>`;
  const name = viewable
    ? `<a href="${href}">${escapeHtml(s.name)}</a>`
    : `<span>${escapeHtml(s.name)}</span>`;
  const levels = s.level_count ? `<div class="sub">${s.level_count} level${s.level_count > 1 ? "s" : ""}</div>` : "";
  return `<tr data-id="${escapeHtml(s.id)}" data-status="${escapeHtml(s.status)}"
      class="${viewable ? "" : "unavailable"}">
    <td>${thumb}</td>
    <td class="name">${name}${levels}</td>
    <td class="dim">${escapeHtml(describeFormat(s))}</td>
    <td class="dim">${formatDimensions(s.width, s.height)}</td>
    <td class="dim">${resolutionCell(s)}</td>
    <td class="num">${formatBytes(s.size_bytes)}</td>
    <td>${statusCell(s)}</td>
  </tr>`;
}

function render() {
  const words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = state.slides.filter((s) => matches(s, words)).sort(compare);
  $("rows").innerHTML = shown.length
    ? shown.map(row).join("")
    : `<tr class="empty"><td colspan="7">No slide matches “${escapeHtml(state.q)}”.</td></tr>`;
  const total = state.slides.length;
  const broken = state.slides.filter((s) => s.status === "error").length;
  const slides = `slide${total === 1 ? "" : "s"}`;
  $("summary").textContent = (words.length ? `${shown.length} of ${total} ${slides}` : `${total} ${slides}`)
    + (broken ? ` · ${broken} unreadable` : "");
  for (const th of document.querySelectorAll("th[data-sort]")) {
    if (th.dataset.sort === state.sort) th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
    else th.removeAttribute("aria-sort");
  }
  $("sort").value = state.sort;
  $("order").textContent = state.desc ? "↓" : "↑";
  $("slides").hidden = false;
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.sort !== "name") p.set("sort", state.sort);
  if (state.desc) p.set("order", "desc");
  const qs = p.toString();
  history.replaceState(null, "", qs ? `?${qs}` : location.pathname);
}

/** Scans the ingest pipeline has not finished yet, shown as rows that cannot be opened. */
async function ingestRows() {
  try {
    const r = await fetch("/api/ingest");
    if (!r.ok) return [];
    const body = await r.json();
    if (!body.enabled) return [];
    const pending = [...(body.queue?.waiting || []), ...(body.queue?.in_progress || [])].map((it) => ({
      id: `ingest-${it.scan}`, name: it.name, size_bytes: it.size_bytes,
      status: (body.queue?.in_progress || []).includes(it) ? "ingesting" : "waiting",
      level_count: 0,
    }));
    const failed = (body.failures || []).map((it) => ({
      id: `ingest-${it.scan}`, name: it.name, size_bytes: it.size_bytes, status: "quarantined",
      error: it.error ? { detail: it.error } : null, level_count: 0,
    }));
    return [...pending, ...failed];
  } catch {
    return [];
  }
}

async function load() {
  try {
    const [r, extra] = await Promise.all([fetch("/api/slides"), ingestRows()]);
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || `HTTP ${r.status}`);
    state.slides = [...body.slides, ...extra];
    render();
  } catch (err) {
    $("summary").textContent = "";
    const box = $("load-error");
    box.hidden = false;
    box.textContent = `The slide list could not be loaded: ${err.message}`;
  }
}

$("search").value = state.q;
$("search").addEventListener("input", (e) => { state.q = e.target.value; render(); });
$("sort").addEventListener("change", (e) => { state.sort = e.target.value; render(); });
$("order").addEventListener("click", () => { state.desc = !state.desc; render(); });
for (const th of document.querySelectorAll("th[data-sort]")) {
  th.addEventListener("click", () => {
    if (state.sort === th.dataset.sort) state.desc = !state.desc;
    else { state.sort = th.dataset.sort; state.desc = false; }
    render();
  });
}
$("rows").addEventListener("click", (e) => {
  const tr = e.target.closest("tr[data-id]");
  if (!tr || tr.dataset.status !== "ready" || e.target.closest("a")) return;
  const url = `/view/${encodeURIComponent(tr.dataset.id)}`;
  if (e.ctrlKey || e.metaKey) window.open(url, "_blank");
  else location.href = url;
});
load();
loadMe().then((me) => {
  renderAccount(me, $("account"));
  renderShareBanner(me, $("share-banner"));
});
