"""The access policy as pure functions: the access file (the issue's TOML contract), what
a group is granted, and every decision made from a ``Principal`` and a slide."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from wsi_server.auth.policy import (
    AccessConfig,
    AccessConfigError,
    can_audit,
    can_see,
    can_share,
    can_share_slide,
    load_access_config,
    parse_access_config,
    withheld_associated,
)
from wsi_server.auth.principal import Principal, ShareGrant, anonymous

EXPIRES = datetime(2031, 1, 1, tzinfo=UTC)
LABEL_AND_MACRO = frozenset({"label", "macro"})

# The example of the issue, verbatim: this format is the contract.
CONTRACT = """
[[grant]]
group = "bham-histopathology"            # a value of the groups claim
collections = ["birmingham", "solihull"] # top-level folders of the library roots
[[grant]]
group = "pathology-admins"
role = "admin"                           # sees every collection and the audit trail
"""


def user(*collections: str, admin: bool = False, shares: tuple[ShareGrant, ...] = ()
         ) -> Principal:
    return Principal(
        kind="user", subject="u1", name="U One",
        collections=None if admin else frozenset(collections),
        roles=frozenset({"admin"}) if admin else frozenset(), shares=shares, via="session",
    )


def grant(slide: str, allow: bool = False, share_id: str = "sh1") -> ShareGrant:
    return ShareGrant(share_id, slide, EXPIRES, "Dr Creator", allow_associated=allow)


def link_viewer(*grants: ShareGrant) -> Principal:
    return anonymous("client-hash", everything=False).with_shares(grants)


# -- the access file ------------------------------------------------------------------


def test_the_issues_example_parses_to_its_meaning() -> None:
    config = parse_access_config(CONTRACT)
    assert config.resolve({"bham-histopathology"}) == (
        frozenset({"birmingham", "solihull"}), frozenset())
    assert config.resolve({"pathology-admins"}) == (None, frozenset({"admin"}))
    assert config.resolve({"someone-else"}) == (frozenset(), frozenset())


def test_empty_file_grants_nothing() -> None:
    config = parse_access_config("")
    assert config.resolve({"bham-histopathology"}) == (frozenset(), frozenset())


def test_grants_of_several_groups_add_up() -> None:
    config = parse_access_config("""
[[grant]]
group = "a"
collections = ["one"]
[[grant]]
group = "b"
collections = ["two", "three"]
[[grant]]
group = "a"
collections = ["four"]
""")
    assert config.resolve(["a"])[0] == {"one", "four"}
    assert config.resolve(["a", "b"])[0] == {"one", "two", "three", "four"}
    assert config.resolve(["b", "unrelated"])[0] == {"two", "three"}
    assert config.resolve([])[0] == frozenset()


def test_admin_role_means_every_collection_whatever_else_is_granted() -> None:
    config = parse_access_config("""
[[grant]]
group = "staff"
collections = ["one"]
[[grant]]
group = "boss"
collections = ["two"]
role = "admin"
""")
    assert config.resolve(["staff", "boss"]) == (None, frozenset({"admin"}))
    assert config.resolve(["staff"]) == (frozenset({"one"}), frozenset())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[grant]\ngroup = 'x'", "not valid TOML"),
        ("group = 'x'\ncollections = ['a']", "unknown table"),
        ("[settings]\nx = 1", "unknown table"),
        ("grant = 'everyone'", "array of tables"),
        ("[[grant]]\ngroup = 'x'\ncollections = ['a']\ncolour = 'red'", "unknown key"),
        ("[[grant]]\ngroup = 'x'\nrole = 'superuser'", "unknown role"),
        ("[[grant]]\ngroup = 'x'\nrole = 'Admin'", "unknown role"),
        ("[[grant]]\ncollections = ['a']", "'group'"),
        ("[[grant]]\ngroup = ''\ncollections = ['a']", "'group'"),
        ("[[grant]]\ngroup = 7\ncollections = ['a']", "'group'"),
        ("[[grant]]\ngroup = 'x'\ncollections = ['birmingham/cases']", "'/'"),
        ("[[grant]]\ngroup = 'x'\ncollections = ['..']", "'/'"),
        ("[[grant]]\ngroup = 'x'\ncollections = 'birmingham'", "list of folder names"),
        ("[[grant]]\ngroup = 'x'\ncollections = ['']", "list of folder names"),
        ("[[grant]]\ngroup = 'x'", "neither"),
        ("[[grant]]\ngroup = 'x'\ncollections = []", "neither"),
    ],
)
def test_bad_access_files_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(AccessConfigError) as info:
        parse_access_config(text, "access.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("access.toml")


def test_the_error_names_the_faulty_grant() -> None:
    text = "[[grant]]\ngroup = 'ok'\ncollections = ['a']\n[[grant]]\ngroup = 'bad'\n"
    with pytest.raises(AccessConfigError, match="grant #2"):
        parse_access_config(text)


def test_load_access_config(tmp_path: Path) -> None:
    assert load_access_config(None).resolve(["anything"]) == (frozenset(), frozenset())
    path = tmp_path / "access.toml"
    path.write_text(CONTRACT)
    assert load_access_config(path).resolve(["bham-histopathology"])[0] == {
        "birmingham", "solihull"}
    with pytest.raises(AccessConfigError, match="cannot read"):
        load_access_config(tmp_path / "missing.toml")


# -- can_see ----------------------------------------------------------------------------


def test_a_user_sees_the_slides_of_their_collections_only() -> None:
    who = user("birmingham", "solihull")
    assert can_see(who, "s1", "birmingham")
    assert can_see(who, "s2", "solihull")
    assert not can_see(who, "s3", "leeds")
    assert not can_see(who, "s4", "Birmingham")  # folder names are exact


def test_a_slide_without_a_collection_is_for_admins_only() -> None:
    assert not can_see(user("birmingham"), "top", None)
    assert not can_see(user(), "top", None)
    assert can_see(user(admin=True), "top", None)


def test_admins_see_every_collection() -> None:
    admin = user(admin=True)
    assert admin.collections is None
    for collection in ("birmingham", "leeds", "anything", None):
        assert can_see(admin, "x", collection)


def test_a_user_without_grants_sees_nothing() -> None:
    for collection in ("birmingham", None):
        assert not can_see(user(), "x", collection)


def test_a_share_grant_opens_exactly_its_slide() -> None:
    viewer = link_viewer(grant("s1"))
    assert can_see(viewer, "s1", "leeds")
    assert can_see(viewer, "s1", None)
    assert not can_see(viewer, "s2", "leeds")
    assert not can_see(viewer, "s2", None)
    # a user holding a link sees that slide besides their own collections
    holder = user("birmingham", shares=(grant("s9"),))
    assert can_see(holder, "s9", "leeds")
    assert can_see(holder, "s1", "birmingham")
    assert not can_see(holder, "s2", "leeds")


def test_sign_in_on_anonymous_sees_nothing_auth_none_anonymous_everything() -> None:
    nobody = anonymous(everything=False)
    local = anonymous(everything=True)
    for collection in ("birmingham", None):
        assert not can_see(nobody, "x", collection)
        assert can_see(local, "x", collection)
    assert not nobody.is_authenticated
    assert local.is_admin and not nobody.is_admin


# -- withheld associated images ---------------------------------------------------------


def test_server_wide_hiding_applies_to_everyone() -> None:
    for who in (user(admin=True), user("leeds"), link_viewer(grant("s1", allow=True))):
        assert withheld_associated(who, "s1", "leeds", server_hides=True) == LABEL_AND_MACRO


def test_link_viewer_without_permission_gets_no_label_or_macro() -> None:
    viewer = link_viewer(grant("s1", allow=False))
    assert withheld_associated(viewer, "s1", "leeds", server_hides=False) == LABEL_AND_MACRO


def test_link_viewer_with_permission_gets_them() -> None:
    viewer = link_viewer(grant("s1", allow=True))
    assert withheld_associated(viewer, "s1", "leeds", server_hides=False) == frozenset()


def test_own_collection_and_admins_get_them() -> None:
    assert withheld_associated(user("leeds"), "s1", "leeds", False) == frozenset()
    assert withheld_associated(user(admin=True), "s1", None, False) == frozenset()
    # a user who also holds a restrictive link to a slide of their own collection
    holder = user("leeds", shares=(grant("s1", allow=False),))
    assert withheld_associated(holder, "s1", "leeds", False) == frozenset()
    # ... but through a restrictive link to another collection's slide, not
    holder = user("birmingham", shares=(grant("s1", allow=False),))
    assert withheld_associated(holder, "s1", "leeds", False) == LABEL_AND_MACRO


# -- other decisions and the principal ---------------------------------------------------


def test_who_may_audit_and_share() -> None:
    assert can_audit(user(admin=True))
    assert not can_audit(user("leeds"))
    assert not can_audit(link_viewer(grant("s1")))
    assert can_share(user("leeds"))
    assert not can_share(link_viewer(grant("s1")))


def test_only_own_access_allows_sharing_a_slide() -> None:
    assert can_share_slide(user("leeds"), "leeds")
    assert can_share_slide(user(admin=True), None)
    assert not can_share_slide(user("leeds"), "birmingham")
    assert not can_share_slide(user("leeds"), None)
    # a slide seen only through someone else's link cannot be passed on
    holder = user("birmingham", shares=(grant("s1", allow=False),))
    assert can_see(holder, "s1", "leeds")
    assert not can_share_slide(holder, "leeds")
    assert not can_share_slide(link_viewer(grant("s1")), "leeds")


def test_with_shares_on_anonymous_makes_a_read_only_link_viewer() -> None:
    g1, g2 = grant("s1", share_id="first"), grant("s2", share_id="second")
    viewer = anonymous("key", everything=False).with_shares((g1, g2))
    assert viewer.kind == "share"
    assert viewer.is_authenticated
    assert not viewer.is_admin
    assert viewer.collections == frozenset()
    assert viewer.share_for("s2") is g2
    assert viewer.share_for("s3") is None
    assert viewer.actor == "share:first"
    assert "Dr Creator" in viewer.name
    assert viewer.session_key == "key"
    assert viewer.via == "share"


def test_with_shares_keeps_a_users_identity_and_rights() -> None:
    holder = user("birmingham").with_shares((grant("s1"),))
    assert holder.kind == "user"
    assert holder.subject == "u1" and holder.actor == "u1"
    assert holder.collections == {"birmingham"}
    assert holder.share_for("s1") is not None
    admin = user(admin=True).with_shares((grant("s1"),))
    assert admin.is_admin and admin.collections is None


def test_with_no_shares_changes_nothing() -> None:
    nobody = anonymous(everything=False)
    assert nobody.with_shares(()) is nobody


def test_with_shares_on_the_local_anonymous_admin_keeps_its_access() -> None:
    """With --auth none the anonymous principal sees everything; opening a share link
    (e.g. to check one just made) must not shrink it to that one slide."""
    local = anonymous("key", everything=True).with_shares((grant("s1"),))
    assert local.collections is None
    assert local.is_admin
    assert can_see(local, "s2", "birmingham")
    assert can_see(local, "s3", None)
    assert can_share(local)
    assert withheld_associated(local, "s1", "leeds", server_hides=False) == frozenset()


def test_access_config_is_immutable_data() -> None:
    config = AccessConfig()
    assert config.resolve(["x"]) == (frozenset(), frozenset())
