"""The command line, run as a user would: a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import real_slide
from wsi_server import settings as settings_mod
from wsi_server.cli import build_parser


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_server", *args], capture_output=True, text=True, timeout=120
    )


def test_info_prints_metadata_json() -> None:
    r = _run("info", str(real_slide("ndpi")))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["vendor"] == "hamamatsu"
    assert (info["width"], info["height"], info["level_count"]) == (3968, 4864, 7)
    assert info["mpp"][0] == pytest.approx(0.228175, rel=1e-4)


def test_info_on_a_bad_file_fails_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00garbage")
    r = _run("info", str(bad))
    assert r.returncode == 1
    assert json.loads(r.stderr)["error"] == "unreadable_slide"
    assert "Traceback" not in r.stderr


def test_every_setting_has_a_flag_and_an_env_variable() -> None:
    help_text = build_parser().parse_args(["serve"]).__dict__
    for f in settings_mod.fields():
        assert f.name in help_text
    serve_help = subprocess.run(
        [sys.executable, "-m", "wsi_server", "serve", "--help"], capture_output=True,
        text=True, timeout=60,
    ).stdout
    for f in settings_mod.fields():
        assert settings_mod.env_name(f.name) in serve_help
        if f.name != "paths":
            assert settings_mod.flag_name(f.name) in serve_help


def test_flags_override_environment_over_defaults() -> None:
    args = build_parser().parse_args(["serve", "x", "--port", "9001", "--limit-bounds"])
    env = {"WSI_PORT": "9000", "WSI_JPEG_QUALITY": "88", "WSI_CORS_ORIGINS": "a, b"}
    s = settings_mod.from_sources(args, env)
    assert s.port == 9001 and s.jpeg_quality == 88 and s.limit_bounds is True
    assert s.cors_origins == ("a", "b") and s.paths == (Path("x"),)
    assert settings_mod.from_sources(None, {}).port == 8000


def test_invalid_settings_are_refused() -> None:
    r = _run("serve", "x", "--jpeg-quality", "0")
    assert r.returncode == 2 and "jpeg_quality" in r.stderr
