"""The viewer with access control, in real headless Chromium (tests/plugins/browser.py).

- ``--auth none`` on loopback: the Share dialog creates a link, which a browser without
  cookies opens read-only (banner, no label), and the creator revokes.
- ``--auth oidc`` against the real provider (tests/plugins/oidc_provider.py): the sign-in
  round trip back to the page asked for, the user's name and "Sign out" in the header, a
  share link naming its creator, and the audit page for an administrator.

Every page is watched for Content-Security-Policy violations (the server allows no inline
script). With ``WSI_SHOTS=<folder>`` the tests also save screenshots of the Share dialog
and the audit page there.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from sample_slides import write_svs_like
from tests.plugins.browser import VIEWPORT
from tests.plugins.oidc_provider import CLIENT_ID, OidcProvider, sign_in_with_browser
from tests.test_viewer import open_viewer, osd_installed, viewport_state
from wsi_server.viewer import STATIC_DIR as STATIC

ADMIN_GROUP = "pathology-admins"
BHAM_GROUP = "bham-histopathology"
ACCESS_TOML = f"""
[[grant]]
group = "{BHAM_GROUP}"
collections = ["birmingham"]
[[grant]]
group = "{ADMIN_GROUP}"
role = "admin"
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two collections (top-level folders), one slide each, both with label and macro."""
    root = tmp_path_factory.mktemp("library")
    for collection, name, seed in (("birmingham", "tissue.svs", 0), ("solihull", "other.svs", 1)):
        (root / collection).mkdir()
        write_svs_like(root / collection / name, 1600, 1200, tile=256, downsamples=(1, 4),
                       mpp=0.5, seed=seed)
    return root


def slide_ids(base: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    body = httpx.get(f"{base}/api/slides", headers=headers, timeout=30).json()
    return {s["name"]: s["id"] for s in body["slides"]}


def watch_csp(page: Any) -> list[str]:
    """Console messages about the Content-Security-Policy (a blocked inline script or
    handler, a refused form target...), collected for the whole life of the page."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(m.text)
            if "Content Security Policy" in m.text else None)
    return seen


@pytest.fixture
def new_page(chromium: Any) -> Iterator[Any]:
    """Pages in new browser contexts (no cookies: another person's browser)."""
    contexts: list[Any] = []

    def make() -> Any:
        context = chromium.new_context(viewport=VIEWPORT, device_scale_factor=1)
        context.set_default_timeout(15_000)
        contexts.append(context)
        pg = context.new_page()
        pg.wsi_csp = watch_csp(pg)
        return pg

    yield make
    for c in contexts:
        c.close()


def shot(page: Any, name: str) -> None:
    folder = os.environ.get("WSI_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def create_share_in_dialog(page: Any, *, days: str = "3", note: str = "") -> str:
    """Open the Share dialog of the viewer in ``page``, create a link, return its URL."""
    page.click("#share-button")
    page.wait_for_selector("#share-dialog[open]")
    page.fill("#share-days", days)
    if note:
        page.fill("#share-note", note)
    page.click("#share-create")
    page.wait_for_selector("#share-result:not([hidden])")
    url: str = page.input_value("#share-url")
    return url


def assert_read_only_share_view(
    guest: Any, base: str, sid: str, other: str, share: dict[str, Any], creator: str
) -> None:
    """``guest`` shows slide ``sid`` through share link ``share``: the banner names the
    creator, the expiry and the note; no Share button, no account; label and macro are
    neither offered nor served; the library lists only the shared slide."""
    banner = guest.inner_text("#share-banner")
    assert f"Shared by {creator}" in banner and "read-only" in banner
    assert guest.get_attribute("#share-banner time", "datetime") == share["expires_at"]
    if share["note"]:
        assert share["note"] in banner
    assert guest.is_hidden("#share-button") and guest.is_hidden("#account")
    assert guest.is_hidden("#associated")
    assert not guest.eval_on_selector_all(
        "img", "is => is.filter(i => (i.getAttribute('src') || '').includes('/associated/'))"
               ".length")
    meta = guest.context.request.get(f"{base}/api/slides/{sid}").json()
    assert not {"label", "macro"} & set(meta["associated"])
    assert guest.context.request.get(f"{base}/api/slides/{sid}/associated/label").status == 404
    guest.goto(f"{base}/")
    guest.wait_for_selector("#rows tr[data-id]")
    rows = guest.eval_on_selector_all("#rows tr[data-id]", "rs => rs.map(r => r.dataset.id)")
    assert rows == [sid] and other not in rows
    assert f"Shared by {creator}" in guest.inner_text("#share-banner")
    shot(guest, "shared-library.png")


# -- pages (no browser) ----------------------------------------------------------------------
def test_audit_page_and_no_inline_script(make_client: Any, library: Path) -> None:
    """/audit is served like the other pages, and no page or module carries inline script
    or an inline event handler (the server's CSP has script-src 'self')."""
    client = make_client(paths=(library,))
    page = client.get("/audit")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assets = re.findall(r'(?:src|href)="(/viewer/static/[^"]+)"', page.text)
    assert {a.split("?")[0] for a in assets} >= {
        "/viewer/static/audit.js", "/viewer/static/auth.js", "/viewer/static/audit.css"}
    for url in assets:
        r = client.get(url)
        assert r.status_code == 200 and "immutable" in r.headers["cache-control"], url
    for name in ("auth.js", "share.js", "audit.js"):
        assert client.get(f"/viewer/static/{name}").status_code == 200
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    for html in (client.get("/").text, client.get(f"/view/{sid}").text, page.text):
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
        assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    for path in STATIC.glob("*.js"):
        assert not re.search(r"\son[a-z]+\s*=\s*[\"']", path.read_text()), path.name


# -- --auth none ---------------------------------------------------------------------------
@pytest.mark.browser
def test_share_dialog_link_opens_read_only_view(
    page: Any, new_page: Any, live_server: Any, library: Path, tmp_path: Path
) -> None:
    osd_installed()
    csp = watch_csp(page)
    base = live_server(library, state_dir=tmp_path / "state")
    sid = slide_ids(base)["tissue.svs"]
    open_viewer(page, f"{base}/view/{sid}?x=600&y=450&z=1")
    # The local anonymous user: no name, no sign-out, no banner (today's look).
    assert page.is_hidden("#account") and page.is_hidden("#share-banner")

    # The dialog: keyboard first, Escape closes and gives the focus back.
    page.focus("#share-button")
    page.keyboard.press("Enter")
    page.wait_for_selector("#share-dialog[open]")
    assert page.evaluate("document.activeElement.id") == "share-days"
    assert page.input_value("#share-days") == "7"
    assert page.is_checked("#share-viewport") and not page.is_checked("#share-associated")
    for control in ("share-days", "share-note", "share-viewport", "share-associated"):
        label = page.evaluate(f"document.getElementById('{control}').labels[0].innerText")
        assert label.strip(), control  # every control has a label
    page.keyboard.press("Escape")
    page.wait_for_selector("#share-dialog:not([open])", state="attached")
    assert page.evaluate("document.activeElement.id") == "share-button"

    # Beyond the server's longest lifetime: its 400 reason is shown, nothing is created.
    page.click("#share-button")
    page.fill("#share-days", "400")
    page.click("#share-create")
    error = page.wait_for_selector("#share-error:not([hidden])")
    assert "at most 30" in error.inner_text()
    assert httpx.get(f"{base}/api/shares").json()["shares"] == []
    page.keyboard.press("Escape")

    url = create_share_in_dialog(page, days="3", note="Deep margin, please")
    assert url.startswith(f"{base}/s/")
    shares = httpx.get(f"{base}/api/shares").json()["shares"]
    assert len(shares) == 1
    share = shares[0]
    assert share["slide_id"] == sid and share["note"] == "Deep margin, please"
    assert share["allow_associated"] is False and share["state"] == "active"
    assert share["viewport"]["x"] == pytest.approx(600, abs=2)
    assert share["viewport"]["z"] == pytest.approx(1, rel=0.01)
    assert page.get_attribute("#share-expires", "datetime") == share["expires_at"]
    page.wait_for_selector(f"#share-list li[data-share-id='{share['id']}']")
    # Copy: to the clipboard, confirmed in the live region.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page.click("#share-copy")
    page.wait_for_function(
        "() => /copied/i.test(document.getElementById('share-status').textContent)")
    assert page.get_attribute("#share-status", "aria-live") == "polite"
    assert page.evaluate("navigator.clipboard.readText()") == url
    shot(page, "share-dialog.png")
    page.keyboard.press("Escape")

    # Another browser, without cookies, opens the link: the slide, at the shared view.
    guest = new_page()
    open_viewer(guest, url)
    assert urlsplit(guest.url).path == f"/view/{sid}"
    assert viewport_state(guest)["x"] == pytest.approx(600, abs=8)
    # With --auth none a loopback visitor is the local administrator, share cookie or
    # not (the server says so in /api/me), so the page is not a read-only shared view:
    # the banner and the withheld label are checked with --auth oidc below.
    me = guest.context.request.get(f"{base}/api/me").json()
    assert me["kind"] == "anonymous" and [g["id"] for g in me["shares"]] == [share["id"]]
    assert guest.is_hidden("#share-banner") and guest.is_hidden("#account")

    # The creator revokes it from the dialog: the link no longer opens.
    page.click("#share-button")
    page.click(f"#share-list li[data-share-id='{share['id']}'] button")
    page.wait_for_function(
        "() => /revoked/i.test(document.getElementById('share-status').textContent)")
    assert page.locator("#share-list li").count() == 0
    assert httpx.get(f"{base}/api/shares").json()["shares"][0]["state"] == "revoked"
    gone = guest.goto(url)
    assert gone is not None and gone.status == 410
    assert "no longer valid" in guest.inner_text("body")
    assert csp == [] and guest.wsi_csp == [], csp + guest.wsi_csp
    assert not [m for m in page.wsi_console if "pageerror" in m], page.wsi_console


# -- --auth oidc ---------------------------------------------------------------------------
@pytest.fixture
def oidc_server(
    live_server: Any, oidc_provider: OidcProvider, library: Path, tmp_path: Path
) -> str:
    access = tmp_path / "access.toml"
    access.write_text(ACCESS_TOML, encoding="utf-8")
    base: str = live_server(
        library, auth="oidc", oidc_issuer=oidc_provider.issuer, oidc_client_id=CLIENT_ID,
        oidc_client_secret="any-secret", access_config=access, state_dir=tmp_path / "state",
    )
    return base


def subject(role: str) -> str:
    return f"{role}-{secrets.token_hex(4)}"


@pytest.mark.browser
def test_sign_in_round_trip_share_and_sign_out(
    page: Any, new_page: Any, oidc_provider: OidcProvider, oidc_server: str
) -> None:
    osd_installed()
    base = oidc_server
    csp = watch_csp(page)
    admin = oidc_provider.access_token(subject("admin"), {"name": "Admin", "groups": [ADMIN_GROUP]})
    ids = slide_ids(base, {"Authorization": f"Bearer {admin}"})
    sid, other = ids["tissue.svs"], ids["other.svs"]

    # Opening a viewer link signs in first, then lands on that very view (`next`).
    response = page.goto(f"{base}/view/{sid}?x=600&y=450&z=1")
    assert response is not None and page.url.startswith(oidc_provider.authorization_endpoint)
    hops, request = [], response.request
    while request is not None:
        hops.append(urlsplit(request.url))
        request = request.redirected_from
    login = [h for h in hops if h.path == "/auth/login"]
    assert login and parse_qs(login[0].query)["next"] == [f"/view/{sid}?x=600&y=450&z=1"]
    sign_in_with_browser(page, oidc_provider, subject("ada"),
                         {"name": "Dr Ada Lovelace", "groups": [BHAM_GROUP]})
    page.wait_for_url(re.compile(rf"/view/{re.escape(sid)}\?"))
    open_viewer(page, page.url)
    assert viewport_state(page)["x"] == pytest.approx(600, abs=8)
    assert page.inner_text("#account .account-name") == "Dr Ada Lovelace"
    assert page.is_visible("#account button:has-text('Sign out')")
    assert page.locator("#account a[href='/audit']").count() == 0  # not an admin
    assert page.is_visible("#share-button") and page.is_hidden("#share-banner")
    shot(page, "viewer-signed-in.png")

    # A slide of another collection is "not found"; the audit page says why it is refused.
    page.goto(f"{base}/view/{other}")
    page.wait_for_selector("#slide-error:not([hidden])")
    page.goto(f"{base}/audit")
    refused = page.wait_for_selector("#load-error:not([hidden])")
    assert "for administrators" in refused.inner_text()
    shot(page, "audit-refused.png")
    assert page.is_hidden("#events")

    # A share link names its creator for the recipient (no account, no cookies).
    open_viewer(page, f"{base}/view/{sid}")
    url = create_share_in_dialog(page, note="Second opinion")
    page.keyboard.press("Escape")
    share = next(s for s in page.context.request.get(f"{base}/api/shares").json()["shares"]
                 if s["state"] == "active")
    guest = new_page()
    open_viewer(guest, url)
    assert urlsplit(guest.url).path == f"/view/{sid}"
    shot(guest, "shared-view.png")
    assert_read_only_share_view(guest, base, sid, other, share, "Dr Ada Lovelace")

    # Sign out (a POST form): afterwards the session no longer opens the API.
    assert page.context.request.get(f"{base}/api/slides").status == 200
    page.click("#account button:has-text('Sign out')")
    page.wait_for_url(lambda u: "/view/" not in u)
    assert page.context.request.get(f"{base}/api/slides").status == 401
    me = page.context.request.get(f"{base}/api/me").json()
    assert me["kind"] == "anonymous" and me["authenticated"] is False
    assert csp == [] and guest.wsi_csp == [], csp + guest.wsi_csp


@pytest.mark.browser
def test_admin_reads_the_audit_trail(
    page: Any, new_page: Any, oidc_provider: OidcProvider, oidc_server: str
) -> None:
    osd_installed()
    base = oidc_server
    csp = watch_csp(page)
    # A pathologist views a slide (slide.view) after signing in (auth.login).
    reader = new_page()
    reader.goto(f"{base}/")
    sign_in_with_browser(reader, oidc_provider, subject("reader"),
                         {"name": "Dr Reader", "groups": [BHAM_GROUP]})
    reader.wait_for_selector("#rows tr[data-id]")
    sid = reader.get_attribute("#rows tr[data-id]", "data-id")
    open_viewer(reader, f"{base}/view/{sid}")

    # The administrator opens the audit page: sign-in, then back to /audit.
    page.goto(f"{base}/audit")
    sign_in_with_browser(page, oidc_provider, subject("admin"),
                         {"name": "Dr Admin", "groups": [ADMIN_GROUP]})
    page.wait_for_url(f"{base}/audit")
    page.wait_for_selector("#events:not([hidden]) #rows tr[data-action]")
    assert page.inner_text("#account .account-name") == "Dr Admin"
    assert page.get_attribute("#account a[href='/audit']", "aria-current") == "page"
    rows = page.eval_on_selector_all(
        "#rows tr[data-action]", "rs => rs.map(r => ({action: r.dataset.action, "
        "cells: [...r.cells].map(c => c.innerText.trim())}))")
    actions = {r["action"] for r in rows}
    assert {"auth.login", "slide.view"} <= actions, actions
    views = [r for r in rows if r["action"] == "slide.view"]
    assert any(r["cells"][1] == "Dr Reader" and r["cells"][3] == sid for r in views), views
    assert all(len(r["cells"]) == 8 for r in rows)  # time, actor, action, slide, outcome...
    shot(page, "audit.png")

    # A filter reloads through the API and is carried by both exports.
    page.select_option("select[name=action]", "slide.view")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#rows tr[data-action]')]"
        ".every(r => r.dataset.action === 'slide.view')")
    assert "action=slide.view" in page.url
    csv_href = page.get_attribute("#csv", "href")
    fhir_href = page.get_attribute("#fhir", "href")
    assert csv_href and "format=csv" in csv_href and "action=slide.view" in csv_href
    assert fhir_href and fhir_href.startswith("/api/audit/fhir?")
    assert "action=slide.view" in fhir_href
    csv = page.context.request.get(base + csv_href)
    assert csv.status == 200 and csv.headers["content-type"].startswith("text/csv")
    lines = csv.text().strip().splitlines()
    assert lines[0].startswith("time,") and len(lines) >= 2
    assert all(",slide.view," in line for line in lines[1:])
    fhir = page.context.request.get(base + fhir_href).json()
    assert fhir["resourceType"] == "Bundle" and fhir["entry"]

    # Paging: one event per page steps through them, newest first.
    page.goto(f"{base}/audit?limit=1")
    page.wait_for_selector("#rows tr[data-action]")
    first = page.inner_text("#rows tr[data-action]")
    assert page.locator("#rows tr[data-action]").count() == 1
    assert page.is_disabled("#prev") and page.is_enabled("#next")
    page.click("#next")
    page.wait_for_function("() => new URLSearchParams(location.search).get('offset') === '1'")
    page.wait_for_function(
        "t => document.querySelector('#rows tr[data-action]').innerText !== t", arg=first)
    assert page.is_enabled("#prev")
    # The administrator's header links the audit trail from the library too.
    page.goto(f"{base}/")
    page.wait_for_selector("#account a[href='/audit']")
    page.wait_for_selector("#rows tr[data-id]")
    shot(page, "library-admin.png")
    assert csp == [] and reader.wsi_csp == [], csp + reader.wsi_csp
