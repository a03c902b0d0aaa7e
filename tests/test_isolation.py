"""Crash isolation by default: a never-opened slide is checked in the validator's process
before the server opens it, so a decoder that aborts or hangs costs that process only; the
verdicts are remembered in the state folder, so a restart does not check again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import ROOT
from tests.test_fuzz import _free_port
from wsi_server.context import IsolatedProbe
from wsi_server.settings import Settings


def test_isolation_is_the_default() -> None:
    assert Settings().isolate_open is True


@contextmanager
def served(lib: Path, state: Path, fault: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m wsi_server serve LIB`` with default settings, the validator told to
    abort or hang on some names (``WSI_INGEST_FAULT``, as a crashing C decoder would)."""
    port = _free_port()
    env = {**os.environ, "WSI_INGEST_FAULT": fault, "WSI_INGEST_VALIDATE_TIMEOUT": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_server", "serve", str(lib), "--port", str(port),
         "--rescan-seconds", "0", "--state-dir", str(state), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server died at start"
            assert time.monotonic() < deadline, "the server did not get ready"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def _by_name(url: str) -> dict[str, dict[str, object]]:
    return {s["name"]: s for s in httpx.get(url + "/api/slides").json()["slides"]}


def test_a_crashing_or_hanging_decoder_does_not_take_the_default_server_down(
    tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    lib, state = tmp_path / "lib", tmp_path / "state"
    lib.mkdir()
    for name in ("good.svs", "crashes.svs", "hangs.svs"):
        shutil.copy(synthetic_slides["aperio-rgb"], lib / name)
    with served(lib, state, "validate-crash:crashes,validate-hang:hangs") as (url, proc):
        slides = _by_name(url)
        assert slides["good.svs"]["status"] == "ready"
        for name, why in (("crashes.svs", "died"), ("hangs.svs", "did not answer")):
            error = slides[name]["error"]
            assert isinstance(error, dict)
            assert error["error"] == "unreadable_slide" and why in error["detail"]
            r = httpx.get(f"{url}/slides/{slides[name]['id']}_files/10/0_0.jpeg")
            assert r.status_code == 422 and r.json()["error"] == "unreadable_slide"
        good = slides["good.svs"]["id"]
        assert httpx.get(f"{url}/slides/{good}_files/10/0_0.jpeg").status_code == 200
        assert proc.poll() is None
    ledger = [json.loads(line) for line in (state / IsolatedProbe.LEDGER).read_text().splitlines()]
    assert [row["code"] for row in ledger] == ["ok"]  # crashes and timeouts are not kept

    # A restart checks only what it has not checked: the good slide is not probed again
    # (the validator would now abort on it), the crashing one is.
    with served(lib, state, "validate-crash:good,validate-crash:crashes") as (url, proc):
        slides = _by_name(url)
        assert slides["good.svs"]["status"] == "ready"
        assert slides["crashes.svs"]["status"] == "error"
        assert slides["hangs.svs"]["status"] == "ready"  # no longer hangs: checked, served
        assert proc.poll() is None


def test_a_changed_slide_is_checked_again(
    tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    slide = tmp_path / "a.tiff"
    shutil.copy(synthetic_slides["generic"], slide)
    probe = IsolatedProbe(30, state_dir=tmp_path)
    try:
        assert probe(slide) is None
        slide.write_bytes(slide.read_bytes()[:5000])  # replaced in place by a broken file
        refused = probe(slide)
        assert refused is not None and refused.code == "unreadable_slide"
    finally:
        probe.close()
    again = IsolatedProbe(30, state_dir=tmp_path)  # a restart reads the verdicts back
    try:
        refused = again(slide)
        assert refused is not None and refused.code == "unreadable_slide"
        assert again._validator._proc is None  # answered from the ledger, no process
    finally:
        again.close()


def test_verdicts_of_files_gone_or_changed_are_dropped_after_a_scan(
    tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    """The ledger follows the library: once a scan has seen every current slide, the
    verdicts of files deleted or replaced since are dropped (when they are most of it)."""
    from wsi_server.library import fingerprint

    slide = tmp_path / "a.tiff"
    shutil.copy(synthetic_slides["generic"], slide)
    probe = IsolatedProbe(30, state_dir=tmp_path)
    try:
        assert probe(slide) is None
    finally:
        probe.close()
    ledger = tmp_path / IsolatedProbe.LEDGER
    stale = [json.dumps({"fp": f"gone-{i}", "code": "ok", "detail": ""}) for i in range(50)]
    with open(ledger, "a") as fh:
        fh.write("\n".join(stale) + "\n")

    current = [fingerprint(slide)[0]]
    probe = IsolatedProbe(30, state_dir=tmp_path)
    try:
        assert probe.compact(current) == 0  # 50 outdated lines: not yet worth a rewrite
        with open(ledger, "a") as fh:
            fh.write("\n".join(stale * 2) + "\n{\"fp\": \"cut sh")  # a line cut by a crash
    finally:
        probe.close()
    probe = IsolatedProbe(30, state_dir=tmp_path)
    try:
        assert probe.compact(current) == 150  # whole lines: the cut one is not read
        rows = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert [r["fp"] for r in rows] == current and rows[0]["code"] == "ok"
        assert probe(slide) is None and probe._validator._proc is None  # still known
    finally:
        probe.close()
    assert not list(tmp_path.glob(".*.tmp"))
