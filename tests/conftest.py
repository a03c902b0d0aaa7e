"""Shared fixtures: generated slides, the real scanner slides, and apps built per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from sample_slides import write_generic_tiff, write_svs_like
from wsi_server.app import create_app
from wsi_server.settings import Settings

pytest_plugins = [
    "tests.plugins.redis_server",
    "tests.plugins.browser",
    "tests.plugins.postgres_server",
    "tests.plugins.oidc_provider",
    "tests.plugins.jwks_server",
    "tests.plugins.orthanc_server",
]

# Apps built by tests keep their state (SQLite store, session key) in a folder of the
# test run, never in the user's ~/.local/state.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="wsi-test-state-")

ROOT = Path(__file__).resolve().parent.parent
SHARED_SLIDES = Path(os.environ.get("WSI_TEST_SLIDES", ROOT.parent / "shared" / "slides"))
REAL_SLIDES = {
    "svs": SHARED_SLIDES / "svs" / "CMU-1-Small-Region.svs",
    "ndpi": SHARED_SLIDES / "ndpi" / "test3-DAPI-2-(387).ndpi",
    "dicom": SHARED_SLIDES / "dicom" / "wsi2dcm-jpeg",
}


def real_slide(name: str) -> Path:
    """A real scanner slide; skipped when absent, except in CI where absence fails."""
    path = REAL_SLIDES[name]
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"real test slide {path} is missing in CI")
        pytest.skip(f"real test slide {path} not present")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic slides of the shapes the tests need."""
    d = tmp_path_factory.mktemp("synthetic")
    write_svs_like(d / "aperio-rgb.svs", 3000, 2100, tile=256, downsamples=(1, 4, 16))
    write_svs_like(
        d / "aperio-ycbcr.svs", 1333, 777, tile=240, downsamples=(1, 4), photometric="ycbcr"
    )
    write_svs_like(d / "aperio-j2k-ycbcr.svs", 1100, 900, tile=256, downsamples=(1, 4),
                   codec="j2k-ycbcr")
    write_svs_like(d / "aperio-j2k-rgb.svs", 700, 500, tile=256, downsamples=(1,),
                   codec="j2k-rgb", associated=False)
    write_generic_tiff(d / "generic.tiff", 2000, 1500)
    write_generic_tiff(
        d / "odd.tiff", 1001, 517, tile=128, downsamples=(1, 3), compression="zlib",
        photometric="rgb",
    )
    return d


@pytest.fixture(scope="session")
def synthetic_slides(synthetic_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in synthetic_dir.iterdir()}


@pytest.fixture
def make_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Build an app from settings and return an entered TestClient (each app with a
    state folder of its own)."""
    clients: list[TestClient] = []

    def make(**kw: object) -> TestClient:
        kw.setdefault("rescan_seconds", 0)
        kw.setdefault("state_dir", tmp_path_factory.mktemp("state"))
        # The suite builds hundreds of apps: each would start its own validator process
        # (~1 s). The isolated check, on by default, is tested where it is the subject
        # (test_isolation.py, test_app.py, test_fuzz.py and the live-process tests).
        kw.setdefault("isolate_open", False)
        client = TestClient(create_app(Settings(**kw)))  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)
