// Who is looking (GET /api/me), shared by every page: the account area of the header
// (name, "Audit trail" for admins, "Sign out") and the banner of a share-link view.
//
// With --auth none the visitor is the local anonymous user: nothing is added to the
// header. A share-link viewer (kind "share") gets the banner instead of an account.

const ANONYMOUS = {
  auth: "none", kind: "anonymous", authenticated: false, name: "anonymous", admin: false,
  can_share: false, sign_out: false, shares: [],
};

let mePromise = null;

/** /api/me, fetched once per page; a failure reads as an anonymous visitor. */
export function loadMe() {
  if (!mePromise) {
    mePromise = fetch("/api/me", { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : ANONYMOUS))
      .then((body) => ({ ...ANONYMOUS, ...body, shares: body.shares || [] }))
      .catch(() => ANONYMOUS);
  }
  return mePromise;
}

/** "12 Jun 2025, 14:05" in the reader's own time zone and language. */
export function formatDateTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

/**
 * Sign out: the POST ends the session here (fetch sends the page's Origin, which the
 * server checks, and does not follow the answer's redirect); the page then goes to
 * /auth/logout, whose redirect to the identity provider's end-session endpoint is a
 * navigation. A plain form submission would be stopped there, at the provider's origin,
 * by the Content-Security-Policy's form-action 'self'.
 */
async function signOut(event) {
  event.preventDefault();
  const button = event.target.querySelector("button");
  if (button) button.disabled = true;
  try {
    await fetch("/auth/logout", { method: "POST", redirect: "manual", credentials: "same-origin" });
  } catch {
    // The navigation below signs out too.
  }
  location.assign("/auth/logout");
}

/**
 * Fill the header's account area (`<nav id="account" hidden>`): the user's name, a link to
 * the audit trail for administrators, and a sign-out button (a POST form, so that a link
 * elsewhere cannot sign the user out). `current` names the page ("audit") to mark it.
 */
export function renderAccount(me, container, { current = "" } = {}) {
  if (!container || me.kind !== "user") return;
  container.replaceChildren();
  container.append(el("span", { class: "account-name", title: me.subject || me.name, text: me.name }));
  if (me.admin) {
    const link = el("a", { class: "btn link", href: "/audit", text: "Audit trail" });
    if (current === "audit") link.setAttribute("aria-current", "page");
    container.append(link);
  }
  if (me.sign_out) {
    const form = el("form", { class: "signout", method: "post", action: "/auth/logout" },
      el("button", { class: "btn", type: "submit", title: `Signed in as ${me.name}`, text: "Sign out" }));
    form.addEventListener("submit", signOut);
    container.append(form);
  }
  container.hidden = false;
}

/**
 * For a share-link viewer: "Shared by … · read-only · expires …" (and the creator's note)
 * for the link of `slideId`, or for every link opened when no slide is given (library).
 * Returns true when a banner is shown.
 */
export function renderShareBanner(me, container, slideId = null) {
  if (!container || me.kind !== "share") return false;
  const grants = (me.shares || []).filter((g) => slideId === null || g.slide_id === slideId);
  if (!grants.length) return false;
  container.replaceChildren();
  for (const g of grants) {
    const line = el("p", { class: "share-line" },
      el("strong", { text: `Shared by ${g.created_by_name || "a colleague"}` }),
      ` · read-only · expires `,
      el("time", { datetime: g.expires_at || "", text: formatDateTime(g.expires_at) }));
    container.append(line);
    if (g.note) container.append(el("p", { class: "share-note", text: `“${g.note}”` }));
  }
  container.hidden = false;
  return true;
}
