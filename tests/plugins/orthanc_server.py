"""A real Orthanc with its DICOMweb plugin (Debian packages ``orthanc`` and
``orthanc-dicomweb``), for the DICOMweb judges (see tests/test_dicomweb_orthanc.py).

``orthanc_server`` starts one Orthanc per test on free loopback ports (HTTP and DICOM)
with a generated JSON configuration: the DICOMweb plugin from the Debian package's plugin
folder, storage in a temporary folder, ``RemoteAccessAllowed`` false and no
authentication (only loopback can reach it). Run as the ``orthanc`` system user when the
suite runs as root. Without the binaries the tests are skipped locally and fail in CI
(env ``CI`` set).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.plugins.redis_server import free_port

BINARY = "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "orthanc: talks to a real Orthanc server")


def _dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")):
            return path
    return None


class OrthancServer:
    """An ``Orthanc`` child process; ``url`` is its REST API, ``dicomweb`` its DICOMweb
    root."""

    def __init__(self, binary: str, plugin: Path) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        # Not under pytest's tmp dir: its parents are private to root.
        self.workdir = Path(tempfile.mkdtemp(prefix="wsi-orthanc-"))
        self.log = self.workdir / "orthanc.log"
        self.binary = binary
        self.plugin = plugin
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("orthanc")
            except KeyError:
                account = None  # no system user: run as root (a test machine)
            if account is not None:
                os.chown(self.workdir, account.pw_uid, account.pw_gid)
                self._user = {"user": account.pw_uid, "group": account.pw_gid,
                              "extra_groups": []}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self, servers: dict[str, Any]) -> dict[str, Any]:
        storage = str(self.workdir / "storage")
        return {
            "Name": "wsi-test-orthanc",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": "WSITEST",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpTimeout": 60,
            "ConcurrentJobs": 2,
            "Plugins": [str(self.plugin)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                "Servers": servers,
            },
        }

    def start(self, servers: dict[str, Any] | None = None) -> OrthancServer:
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(servers or {}), indent=2))
        if self._user:
            os.chown(config, self._user["user"], self._user["group"])
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--logdir=" + str(self.workdir), str(config)],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, **self._user,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{self.url}/system", timeout=2)
                if r.status_code == 200:
                    plugins = httpx.get(f"{self.url}/plugins", timeout=2).json()
                    if "dicom-web" not in plugins:
                        raise RuntimeError(f"the DICOMweb plugin did not load: {plugins}")
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log*"))]
        return "\n".join(parts)

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a Part 10 file through the REST API (POST /instances)."""
        r = httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=60)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _binary_and_plugin() -> tuple[str, Path]:
    binary = BINARY if Path(BINARY).exists() else shutil.which("Orthanc")
    plugin = _dicomweb_plugin()
    if binary is None or plugin is None:
        missing = "orthanc" if binary is None else "orthanc-dicomweb"
        if os.environ.get("CI"):
            pytest.fail(f"Orthanc is not installed (required in CI): Debian package {missing}; "
                        "./dev installs it")
        pytest.skip(f"Orthanc is not installed (Debian package {missing})")
    return binary, plugin


@pytest.fixture
def orthanc_server() -> Iterator[Any]:
    """A factory: ``orthanc_server(servers={...})`` starts an Orthanc whose DICOMweb
    plugin knows those remote servers (name → {"Url": ...}); stopped after the test."""
    binary, plugin = _binary_and_plugin()
    started: list[OrthancServer] = []

    def start(servers: dict[str, Any] | None = None) -> OrthancServer:
        server = OrthancServer(binary, plugin).start(servers)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()
