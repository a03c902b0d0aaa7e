// The audit trail page (administrators): GET /api/audit with filters and paging, newest
// first; the same filters give the CSV download and the FHIR export. The filters are kept
// in the page's URL so that a filtered view can be reloaded or bookmarked.
import { escapeHtml } from "./format.js?v={{v}}";
import { formatDateTime, loadMe, renderAccount } from "./auth.js?v={{v}}";

const $ = (id) => document.getElementById(id);
const FILTERS = ["user", "slide", "action", "since", "until"];
const EXPORT_LIMIT = 10000; // the API's largest page
const form = $("filters");

function readState() {
  const p = new URLSearchParams(location.search);
  const state = { limit: Number(p.get("limit")) || 100, offset: Math.max(0, Number(p.get("offset")) || 0) };
  for (const k of FILTERS) state[k] = p.get(k) || "";
  return state;
}

let state = readState();

function fillForm() {
  for (const k of [...FILTERS, "limit"]) form.elements[k].value = String(state[k]);
  if (!form.elements.limit.value) form.elements.limit.value = "100";
}

/** A datetime-local value is the reader's local time; the API wants an instant. */
function instant(local) {
  if (!local) return "";
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? local : d.toISOString();
}

function apiFilters() {
  const p = new URLSearchParams();
  for (const k of ["user", "slide", "action"]) if (state[k]) p.set(k, state[k]);
  for (const k of ["since", "until"]) if (state[k]) p.set(k, instant(state[k]));
  return p;
}

function keepInUrl() {
  const p = new URLSearchParams();
  for (const k of FILTERS) if (state[k]) p.set(k, state[k]);
  if (state.limit !== 100) p.set("limit", String(state.limit));
  if (state.offset) p.set("offset", String(state.offset));
  const qs = p.toString();
  history.replaceState(null, "", qs ? `?${qs}` : location.pathname);
}

function updateExports() {
  const csv = apiFilters();
  csv.set("format", "csv");
  csv.set("limit", String(EXPORT_LIMIT));
  $("csv").href = `/api/audit?${csv}`;
  const fhir = apiFilters();
  fhir.set("limit", String(EXPORT_LIMIT));
  $("fhir").href = `/api/audit/fhir?${fhir}`;
}

function detailText(detail) {
  if (detail == null || detail === "") return "";
  if (typeof detail !== "object") return String(detail);
  return Object.entries(detail).map(([k, v]) =>
    `${k}: ${typeof v === "object" && v !== null ? JSON.stringify(v) : v}`).join(" · ");
}

function filterButton(field, value, label, title) {
  return `<button type="button" class="cell-filter" data-field="${field}" data-value="${escapeHtml(value)}"
    title="${escapeHtml(title)}">${escapeHtml(label)}</button>`;
}

function row(e) {
  const lastText = e.count > 1 && e.last_time ? formatDateTime(e.last_time) : "";
  const last = lastText && lastText !== formatDateTime(e.time)
    ? `<div class="sub">last ${escapeHtml(lastText)}</div>` : "";
  const actor = e.actor
    ? filterButton("user", e.actor, e.actor_name || e.actor, `${e.actor} — show only this actor`) : "–";
  const slide = e.slide
    ? filterButton("slide", e.slide, e.slide, "Show only this slide") : "–";
  const outcome = e.outcome || "";
  return `<tr data-action="${escapeHtml(e.action)}">
    <td class="time"><time datetime="${escapeHtml(e.time)}" title="${escapeHtml(e.time)}">${escapeHtml(formatDateTime(e.time))}</time>${last}</td>
    <td>${actor}</td>
    <td><code class="action">${escapeHtml(e.action)}</code></td>
    <td class="slide">${slide}</td>
    <td><span class="badge ${outcome === "success" ? "ready" : "error"}">${escapeHtml(outcome)}</span></td>
    <td class="num">${escapeHtml(e.count ?? 1)}</td>
    <td class="dim">${escapeHtml(e.client || "–")}</td>
    <td class="detail">${escapeHtml(detailText(e.detail))}</td>
  </tr>`;
}

function showError(text) {
  $("summary").textContent = "";
  $("events").hidden = true;
  $("load-error").textContent = text;
  $("load-error").hidden = false;
}

let loading = 0;
async function load() {
  const ticket = ++loading;
  keepInUrl();
  updateExports();
  const p = apiFilters();
  p.set("limit", String(state.limit + 1)); // one more tells whether an older page exists
  p.set("offset", String(state.offset));
  let body;
  try {
    const r = await fetch(`/api/audit?${p}`, { headers: { Accept: "application/json" } });
    body = await r.json().catch(() => ({ detail: `HTTP ${r.status}` }));
    if (ticket !== loading) return;
    if (!r.ok) {
      const forbidden = r.status === 403 || r.status === 401;
      document.body.classList.toggle("forbidden", forbidden);
      showError(forbidden ? `Access refused: ${body.detail || `HTTP ${r.status}`}.`
        : `The audit trail could not be loaded: ${body.detail || `HTTP ${r.status}`}`);
      return;
    }
  } catch (err) {
    if (ticket === loading) showError(`The server could not be reached (${err.message}).`);
    return;
  }
  $("load-error").hidden = true;
  const events = body.events || [];
  const more = events.length > state.limit;
  const shown = events.slice(0, state.limit);
  $("rows").innerHTML = shown.length ? shown.map(row).join("")
    : '<tr class="empty"><td colspan="8">No audit events match these filters.</td></tr>';
  $("events").hidden = false;
  const first = shown.length ? state.offset + 1 : 0;
  const lastN = state.offset + shown.length;
  const filtered = FILTERS.some((k) => state[k]);
  $("summary").textContent = shown.length
    ? `Events ${first}–${lastN}${filtered ? " matching the filters" : ""}, newest first`
    : "No events";
  $("page").textContent = shown.length ? `${first}–${lastN}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = !more;
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  for (const k of FILTERS) state[k] = form.elements[k].value.trim();
  state.limit = Number(form.elements.limit.value) || 100;
  state.offset = 0;
  load();
});
form.addEventListener("reset", () => {
  // After the browser has reset the fields: an unfiltered first page.
  setTimeout(() => {
    for (const k of FILTERS) state[k] = "";
    state.limit = Number(form.elements.limit.value) || 100;
    state.offset = 0;
    load();
  });
});
form.elements.action.addEventListener("change", () => form.requestSubmit());
form.elements.limit.addEventListener("change", () => form.requestSubmit());
$("prev").addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - state.limit);
  load();
});
$("next").addEventListener("click", () => {
  state.offset += state.limit;
  load();
});
$("rows").addEventListener("click", (e) => {
  const b = e.target.closest("button.cell-filter");
  if (!b) return;
  state[b.dataset.field] = b.dataset.value;
  state.offset = 0;
  fillForm();
  load();
});

fillForm();
load();
loadMe().then((me) => renderAccount(me, $("account"), { current: "audit" }));
