// The viewer's "Share" dialog: create a share link for this slide (POST
// /api/slides/{id}/shares), copy it, and list or revoke this slide's links
// (GET /api/shares, DELETE /api/shares/{id}). The recipient needs no account; the server
// decides the longest lifetime and answers 400 with the reason beyond it.
import { formatDateTime } from "./auth.js?v={{v}}";

const $ = (id) => document.getElementById(id);

async function jsonOrError(r) {
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || body.error || `HTTP ${r.status}`);
  return body;
}

/**
 * Wire the dialog for slide `slideId`. `getView()` returns the current viewport
 * ({x, y, z, r}) or null when the viewer has not opened.
 */
export function initShare(slideId, getView) {
  const dialog = $("share-dialog");
  const button = $("share-button");
  const form = $("share-form");
  const error = $("share-error");
  const result = $("share-result");
  const url = $("share-url");
  const status = $("share-status");
  let createdId = null;

  function say(text) {
    status.textContent = "";
    // A change of text is what screen readers announce: clear first, then set.
    requestAnimationFrame(() => { status.textContent = text; });
  }

  let listTicket = 0;
  async function refreshList() {
    const list = $("share-list");
    const ticket = ++listTicket; // only the latest answer is shown
    try {
      const body = await jsonOrError(await fetch("/api/shares", { headers: { Accept: "application/json" } }));
      if (ticket !== listTicket) return;
      const mine = (body.shares || []).filter((s) => s.slide_id === slideId && s.state === "active");
      list.replaceChildren(...mine.map(listItem));
      $("share-list-empty").hidden = mine.length > 0;
      $("share-list-empty").textContent = "No active links to this slide.";
    } catch (err) {
      if (ticket !== listTicket) return;
      list.replaceChildren();
      $("share-list-empty").hidden = false;
      $("share-list-empty").textContent = `The links could not be listed: ${err.message}`;
    }
  }

  function listItem(s) {
    const li = document.createElement("li");
    li.dataset.shareId = s.id;
    const text = document.createElement("div");
    text.className = "share-item-text";
    const when = document.createElement("div");
    when.textContent = `Expires ${formatDateTime(s.expires_at)}`
      + (s.open_count ? ` · opened ${s.open_count}×` : " · not opened yet")
      + (s.allow_associated ? " · with label" : "");
    text.append(when);
    if (s.note) {
      const note = document.createElement("div");
      note.className = "share-item-note";
      note.textContent = s.note;
      text.append(note);
    }
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.className = "btn danger";
    revoke.textContent = "Revoke";
    revoke.setAttribute("aria-label", `Revoke the link created ${formatDateTime(s.created_at)}`);
    revoke.addEventListener("click", async () => {
      revoke.disabled = true;
      try {
        await jsonOrError(await fetch(`/api/shares/${encodeURIComponent(s.id)}`, { method: "DELETE" }));
        if (s.id === createdId) { result.hidden = true; createdId = null; }
        await refreshList();
        say("Link revoked: it no longer opens the slide.");
        // The button is gone with its row: keep the focus inside the dialog.
        if (dialog.open) $("share-close").focus();
      } catch (err) {
        revoke.disabled = false;
        say(`The link could not be revoked: ${err.message}`);
      }
    });
    li.append(text, revoke);
    return li;
  }

  async function create(e) {
    e.preventDefault();
    error.hidden = true;
    const payload = {
      expires_in_days: Number($("share-days").value),
      allow_associated: $("share-associated").checked,
    };
    const note = $("share-note").value.trim();
    if (note) payload.note = note;
    const view = $("share-viewport").checked ? getView() : null;
    if (view) payload.viewport = { x: view.x, y: view.y, z: view.z, r: view.r };
    const submit = $("share-create");
    submit.disabled = true;
    try {
      const r = await fetch(`/api/slides/${encodeURIComponent(slideId)}/shares`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(payload),
      });
      const share = await jsonOrError(r);
      createdId = share.id;
      url.value = share.url;
      const expires = $("share-expires");
      expires.dateTime = share.expires_at;
      expires.textContent = formatDateTime(share.expires_at);
      result.hidden = false;
      url.focus();
      url.select();
      await refreshList();
      say("Link created.");
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  }

  async function copy() {
    try {
      await navigator.clipboard.writeText(url.value);
      say("Link copied to the clipboard.");
    } catch {
      // No clipboard access (an http:// page, or permission refused): select the link so
      // that Ctrl+C / ⌘C copies it.
      url.focus();
      url.select();
      say("Press Ctrl+C (⌘C on a Mac) to copy the selected link.");
    }
  }

  function open() {
    error.hidden = true;
    result.hidden = true;
    createdId = null;
    status.textContent = "";
    $("share-viewport").disabled = getView() === null;
    dialog.showModal();
    $("share-days").focus();
    refreshList();
  }

  button.addEventListener("click", open);
  form.addEventListener("submit", create);
  $("share-copy").addEventListener("click", copy);
  $("share-close").addEventListener("click", () => dialog.close());
  // A click on the backdrop (outside the dialog's box) closes it; Escape does natively.
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => button.focus({ preventScroll: true }));
  button.hidden = false;
}
