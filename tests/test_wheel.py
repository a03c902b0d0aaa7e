"""Packaging as a new user meets it: the built wheel, installed with plain ``pip install``
into a fresh virtualenv, serves slides in a working viewer (it carries the pinned
OpenSeadragon build, installed from npm by the build hook when the wheel is built).

Slow by nature (~40 s: the wheel build with its npm install, a fresh virtualenv and the
dependencies from pip's cache), so it is one test that checks everything on one install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.test_fuzz import _free_port
from tests.test_viewer import PINK, open_viewer


def _run(*argv: str | Path, cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.mark.browser
def test_pip_installed_wheel_serves_slides_in_the_viewer(
    page: Any, tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to build the wheel (Debian package npm)")
    # a clean environment: nothing of the source tree or of the test run leaks in
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WSI_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # built from a copy of the sources: nothing is written into the tree (setuptools keeps
    # build/ and *.egg-info beside the sources), and no stale build/ gets into the wheel
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "node_modules", "build", "dist", "out", "*.egg-info", "__pycache__",
        ".*_cache", ".hypothesis", "osd"))
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "-w", dist, "-q",
         cwd=tmp_path, env=env)
    (wheel,) = dist.glob("wsi_server-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        script = zf.read("wsi_server/viewer/osd/openseadragon.min.js").decode()
    pinned = json.loads((ROOT / "package.json").read_text())["dependencies"]["openseadragon"]
    assert script.startswith(f"//! openseadragon {pinned}\n"), script[:200]
    assert "wsi_server/viewer/osd/images/zoomin_rest.png" in names
    assert "wsi_server/viewer/static/viewer.js" in names
    assert not [n for n in names if "node_modules" in n or n.startswith(("tests/", "sample"))]

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", wheel,
         cwd=tmp_path, env=env)

    lib = tmp_path / "slides"
    lib.mkdir()
    shutil.copy(synthetic_slides["aperio-rgb"], lib / "tissue.svs")
    port = _free_port()
    server = subprocess.Popen(
        [str(venv / "bin" / "wsi-server"), "serve", str(lib), "--port", str(port),
         "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "the installed server did not start"
            assert time.monotonic() < deadline, "the installed server did not get ready"
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        osd = httpx.get(base + "/viewer/osd/openseadragon.min.js")
        assert osd.status_code == 200 and osd.text == script
        (slide,) = httpx.get(base + "/api/slides").json()["slides"]
        open_viewer(page, f"{base}/view/{slide['id']}")
        sample = page.evaluate(PINK)
        assert sample["pink"] > 0.15, sample  # stained tissue drawn by OpenSeadragon
        assert not [m for m in page.wsi_console if "openseadragon" in m.lower()]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)


@pytest.mark.parametrize(("args", "env", "address"), [
    ([], {}, "http://127.0.0.1:8000/"),
    (["--port", "9001"], {}, "http://127.0.0.1:9001/"),
    (["--cache-size", "0", "--port=9002", "--host", "0.0.0.0"], {}, "http://0.0.0.0:9002/"),
    (["--port", "1", "--port", "2"], {}, "http://127.0.0.1:2/"),
    ([], {"WSI_PORT": "7000", "WSI_HOST": "::1"}, "http://[::1]:7000/"),
    (["--port", "9003"], {"WSI_PORT": "7000"}, "http://127.0.0.1:9003/"),
])
def test_dev_serve_says_the_address_it_serves(
    args: list[str], env: dict[str, str], address: str
) -> None:
    """``./dev serve --port N`` logs the address the server binds (not always 8000)."""
    dev = (ROOT / "dev").read_text()
    assert 'log "serving ${paths[*]} on $(serve_address "$@")"' in dev
    script = 'eval "$(sed -n "/^serve_address()/,/^}/p" dev)"; serve_address "$@"'
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WSI_")}
    out = subprocess.run(["bash", "-c", script, "serve", *args], cwd=ROOT,
                         env={**clean, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == address
