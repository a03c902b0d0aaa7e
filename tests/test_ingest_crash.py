"""kill -9 at each step of a move, then restart: every scan ends exactly once, nothing lost.

The pipeline runs as ``wsi-server ingest --once`` in a subprocess; ``WSI_INGEST_FAULT``
makes it SIGKILL itself at the named point (wsi_server/ingest/faults.py).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sample_slides import write_svs_like
from wsi_server.ingest.mover import STAGING_DIR
from wsi_server.ingest.state import IngestState


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_ingest(
    watch: Path, lib: Path, copy: bool, fault: str | None, extra: list[str] | None = None
) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_")}
    if fault:
        env["WSI_INGEST_FAULT"] = f"kill:{fault}"
    cmd = [sys.executable, "-m", "wsi_server", "ingest", str(watch), "--library", str(lib),
           "--once", "--ingest-settle-seconds", "0.2", "--ingest-poll", "--log-level", "warning"]
    if copy:
        cmd.append("--force-copy")
    cmd += extra or []
    return subprocess.run(cmd, env=env, timeout=60, capture_output=True).returncode


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("crash-src")
    return write_svs_like(d / "scan.svs", 900, 700, tile=256, downsamples=(1, 4), seed=3)


POINTS_RENAME = ["routed", "staged-one", "staged-before-commit", "staged", "published"]
POINTS_COPY = ["copy-mid", "staged-one", "staged", "source-removed-one", "published"]


@pytest.mark.parametrize(
    ("copy", "point"),
    [(False, p) for p in POINTS_RENAME] + [(True, p) for p in POINTS_COPY],
)
def test_kill_mid_ingest_then_restart_ends_exactly_once(
    copy: bool, point: str, tmp_path: Path, scan: Path
) -> None:
    watch, lib = tmp_path / "watch", tmp_path / "library"
    watch.mkdir()
    (watch / "scan.svs").write_bytes(scan.read_bytes())
    assert run_ingest(watch, lib, copy, point) == -signal.SIGKILL
    assert run_ingest(watch, lib, copy, None) == 0
    assert sha(lib / "scan.svs") == sha(scan)
    assert not (watch / "scan.svs").exists()
    assert sorted(p.name for p in lib.iterdir() if not p.name.startswith(".wsi-ingest.")) \
        == ["scan.svs"]
    assert not (lib / STAGING_DIR).exists()
    state = IngestState.in_library(lib)
    try:
        assert [r.state for r in state.all()] == ["done"]
    finally:
        state.close()


@pytest.mark.parametrize("point", ["staged-one", "published-one", "published"])
def test_kill_mid_quarantine_of_a_two_part_scan(point: str, tmp_path: Path) -> None:
    """An .mrxs file with its data folder: both parts end up in quarantine, once."""
    watch, lib = tmp_path / "watch", tmp_path / "library"
    watch.mkdir()
    (watch / "case.mrxs").write_text("[GENERAL]\nbroken\n")
    (watch / "case").mkdir()
    (watch / "case" / "Data0000.dat").write_bytes(os.urandom(5000))
    data = (watch / "case" / "Data0000.dat").read_bytes()
    assert run_ingest(watch, lib, False, point) == -signal.SIGKILL
    assert run_ingest(watch, lib, False, None) == 0
    q = watch / "quarantine"
    assert sorted(p.name for p in q.iterdir()) == ["case", "case.mrxs", "case.mrxs.error.json"]
    assert (q / "case" / "Data0000.dat").read_bytes() == data
    assert sorted(p.name for p in watch.iterdir()) == ["quarantine"]


def test_kill_mid_convert_then_restart_serves_the_converted_copy(
    tmp_path: Path, make_client: Any
) -> None:
    """--ingest-convert: killed with the zarr conversion half done, the restart resumes it;
    the library holds the scan once and the server serves the complete converted copy."""
    watch, lib, converted = tmp_path / "watch", tmp_path / "library", tmp_path / "converted"
    watch.mkdir()
    big = write_svs_like(tmp_path / "big.svs", 3000, 2200, tile=256, downsamples=(1, 4), seed=5)
    (watch / "case.svs").write_bytes(big.read_bytes())
    extra = ["--ingest-convert", "--convert-dir", str(converted)]
    assert run_ingest(watch, lib, False, "convert-mid", extra) == -signal.SIGKILL
    assert not (converted / "case.svs.zarr").exists()  # nothing servable half-written
    assert run_ingest(watch, lib, False, None, extra) == 0
    assert sha(lib / "case.svs") == sha(big)
    assert sorted(p.name for p in converted.iterdir()) == ["case.svs.zarr"]
    state = IngestState.in_library(lib)
    try:
        assert [r.state for r in state.all()] == ["done"]
    finally:
        state.close()
    client = make_client(paths=(lib,), convert_dir=converted)
    (slide,) = client.get("/api/slides").json()["slides"]
    assert slide["name"] == "case.svs" and slide["format"] == "zarr"
    top = client.get(f"/slides/{slide['id']}/native_files/12/1_1.jpeg")
    assert top.status_code == 200 and top.headers["x-tile-source"] == "passthrough"
