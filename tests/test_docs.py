"""The README stays true: every setting documented, the CI command is the test command."""

from __future__ import annotations

from pathlib import Path

from wsi_server import settings as settings_mod

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for f in settings_mod.fields():
        assert f"`{settings_mod.env_name(f.name)}`" in readme, f.name
        if f.name != "paths":
            assert f"`{settings_mod.flag_name(f.name)}`" in readme, f.name


def test_ci_runs_the_readme_test_command() -> None:
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == ["./dev test"]
    assert "./dev test" in (ROOT / "README.md").read_text()


def test_public_names() -> None:
    import wsi_server

    assert set(wsi_server.__all__) == {"Settings", "WsiServerError", "__version__", "create_app"}
