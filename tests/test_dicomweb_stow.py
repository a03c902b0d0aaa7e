"""STOW-RS: pushed instances enter the ingest pipeline (one slide per series, urgent on
request); the answer is the PS3.18 status document; garbage, oversized, non-DICOM and
non-WSI bodies are precise refusals that leave nothing behind; one audit record per
request; administrators only."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from starlette.testclient import TestClient

from tests.authkit import BHAM, make_library, oidc_settings, running
from tests.plugins.jwks_server import JwksServer
from wsi_server.dicom import stow
from wsi_server.dicom.export import export_slide

D = "/dicomweb"
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
CT = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> list[Path]:
    """A slide exported as DICOM (real Part 10 WSI instances of one series)."""
    dest = tmp_path_factory.mktemp("stow-src") / "slide"
    result = export_slide(synthetic_dir / "aperio-ycbcr.svs", dest)
    return list(result.files)


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for ctype, data in parts:
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


CTYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def post(client: TestClient, body: bytes, url: str = f"{D}/studies", **kw: Any) -> Any:
    headers = {"Content-Type": CTYPE, "Accept": "application/dicom+json"}
    headers.update(kw.pop("headers", {}))
    return client.post(url, content=body, headers=headers, **kw)


def dicom_parts(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [("application/dicom", p.read_bytes()) for p in paths]


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    folder = tmp_path / "watch"
    folder.mkdir()
    return folder


@pytest.fixture
def client(make_client: Callable[..., TestClient], tmp_path: Path, watch: Path) -> TestClient:
    lib = tmp_path / "lib"
    lib.mkdir()
    return make_client(paths=(lib,), ingest=watch, ingest_settle_seconds=0.2,
                       ingest_poll=True, stow_max_mb=8)


def in_watch(watch: Path) -> list[Path]:
    """What the ingest scanner would see (the staging area is hidden from it)."""
    return sorted(p for p in watch.rglob("*") if p.is_file() and ".stow" not in p.parts)


def wait_for(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def reasons(doc: dict[str, Any]) -> list[int]:
    return [i["00081197"]["Value"][0] for i in doc.get("00081198", {}).get("Value", [])]


def test_stored_instances_become_a_slide(client: TestClient, instances: list[Path],
                                         watch: Path) -> None:
    first = pydicom.dcmread(instances[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    r = post(client, multipart(dicom_parts(instances)))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    doc = r.json()
    refs = doc["00081199"]["Value"]
    assert len(refs) == len(instances) and "00081198" not in doc
    assert doc["00081190"]["Value"][0].endswith(f"{D}/studies/{study}")
    sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in instances}
    assert {i["00081155"]["Value"][0] for i in refs} == sops
    assert all(i["00081150"]["Value"][0] == WSI for i in refs)
    url = refs[0]["00081190"]["Value"][0]
    assert f"/studies/{study}/series/{series}/instances/" in url
    # ingest takes the series folder: settle, validate, move into the library
    slides = wait_for(lambda: client.get("/api/slides").json()["slides"])
    assert len(slides) == 1 and slides[0]["format"] == "dicom"
    assert not (watch / ".stow").exists() or not any((watch / ".stow").iterdir())
    found = client.get(f"{D}/studies", params={"StudyInstanceUID": study}).json()
    assert len(found) == 1  # a real DICOM slide keeps its UIDs
    path = url.split("testserver", 1)[1]
    back = client.get(path, headers={"Accept": "application/dicom"})
    assert back.status_code == 200
    events = client.get("/api/audit", params={"action": "dicom.store"}).json()["events"]
    assert len(events) == 1 and events[0]["outcome"] == "success"
    assert events[0]["detail"]["stored"] == len(instances)


def test_mixed_bodies_store_what_is_wsi(client: TestClient, instances: list[Path],
                                        watch: Path) -> None:
    body = multipart([
        ("application/dicom", instances[0].read_bytes()),
        ("application/dicom", Path(CT).read_bytes()),  # a CT: not a WSI SOP class
        ("application/dicom", b"this is not DICOM at all" * 10),
        ("image/jpeg", b"\xff\xd8\xff\xd9"),
        ("application/dicom", instances[0].read_bytes()),  # the same instance again
    ])
    r = post(client, body, params={"urgent": "true"})
    assert r.status_code == 202, r.text
    doc = r.json()
    assert reasons(doc) == [stow.SOP_CLASS_NOT_SUPPORTED, stow.CANNOT_UNDERSTAND,
                            stow.CANNOT_UNDERSTAND, stow.DUPLICATE]
    ct = doc["00081198"]["Value"][0]
    assert ct["00081150"]["Value"][0] == pydicom.dcmread(CT).SOPClassUID
    assert len(doc["00081199"]["Value"]) == 1
    files = in_watch(watch)
    assert len(files) == 1 and files[0].parent.parent.name == "urgent"  # ?urgent=true
    assert files[0].parent.name.startswith("stow-")


def test_all_failed_is_409_and_nothing_is_kept(client: TestClient, instances: list[Path],
                                               watch: Path) -> None:
    r = post(client, multipart([("application/dicom", Path(CT).read_bytes())]))
    assert r.status_code == 409
    assert reasons(r.json()) == [stow.SOP_CLASS_NOT_SUPPORTED]
    other = "1.2.826.0.1.3680043.8.498.1"
    r = post(client, multipart(dicom_parts(instances[:2])), url=f"{D}/studies/{other}")
    assert r.status_code == 409
    assert reasons(r.json()) == [stow.DOES_NOT_MATCH_SOP_CLASS] * 2
    assert in_watch(watch) == []


def test_bad_requests_are_precise_and_leave_nothing(
    client: TestClient, instances: list[Path], watch: Path
) -> None:
    good = multipart(dicom_parts(instances[:1]))
    cases: list[tuple[Any, int, str]] = [
        (post(client, b"garbage, no boundary anywhere"), 400, "bad_request"),
        (post(client, good[:-40]), 400, "bad_request"),  # truncated: no closing boundary
        (post(client, b""), 400, "bad_request"),
        (post(client, multipart([])), 400, "bad_request"),
        (post(client, good, headers={"Content-Type": "application/dicom"}), 415,
         "unsupported_media_type"),
        (post(client, good, headers={"Content-Type": "multipart/related; "
                                     "type=\"application/dicom+xml\"; boundary=b0undary"}),
         415, "unsupported_media_type"),
        (post(client, good, params={"urgent": "maybe"}), 400, "bad_request"),
        (post(client, good, url=f"{D}/studies/not-a-uid"), 400, "bad_request"),
        (post(client, b"x" * (9 * 2**20)), 413, "payload_too_large"),
    ]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        for _ in range(10):
            yield b"y" * 2**20

    cases.append((post(client, chunks()), 413, "payload_too_large"))  # type: ignore[arg-type]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        assert r.json()["error"] == code
    assert in_watch(watch) == []
    assert not any((watch / ".stow").iterdir())
    events = client.get("/api/audit", params={"action": "dicom.store"}).json()["events"]
    assert len(events) == len(cases)
    assert {e["outcome"] for e in events} == {"failure"}


def test_stow_needs_ingest(make_client: Callable[..., TestClient], tmp_path: Path,
                           instances: list[Path]) -> None:
    client = make_client(paths=(tmp_path,))
    r = post(client, multipart(dicom_parts(instances[:1])))
    assert r.status_code == 503
    assert "--ingest" in r.json()["detail"]


def test_series_pushed_in_two_requests_is_one_slide(
    client: TestClient, instances: list[Path], watch: Path
) -> None:
    client.app.state.ingest.stop()  # type: ignore[attr-defined]  # keep them waiting
    assert post(client, multipart(dicom_parts(instances[:2]))).status_code == 200
    assert post(client, multipart(dicom_parts(instances[2:]))).status_code == 200
    folders = {p.parent for p in in_watch(watch)}
    assert len(folders) == 1 and len(in_watch(watch)) == len(instances)


def test_only_administrators_store(tmp_path: Path, synthetic_slides: dict[str, Path],
                                   jwks_server: JwksServer, instances: list[Path]) -> None:
    lib = make_library(tmp_path / "lib", synthetic_slides)
    watch = tmp_path / "watch"
    watch.mkdir()
    settings = oidc_settings(tmp_path, lib, jwks_server, ingest=watch,
                             ingest_settle_seconds=30.0)
    with running(settings, jwks_server) as kit:
        body = multipart(dicom_parts(instances[:1]))
        headers = {"Content-Type": CTYPE}
        r = kit.post(f"{D}/studies", kit.bearer("bea", [BHAM]), content=body,
                     headers=headers)
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert kit.post(f"{D}/studies", content=body, headers=headers).status_code == 401
        admin = kit.bearer("ada", ["pathology-admins"], jti=uuid.uuid4().hex)
        r = kit.post(f"{D}/studies", admin, content=body, headers=headers)
        assert r.status_code == 200, r.text
    assert len(in_watch(watch)) == 1


def test_dicomweb_client_stores_instances(live_server: Callable[..., str], tmp_path: Path,
                                          instances: list[Path]) -> None:
    """A real client (dicomweb-client's ``store_instances``) over HTTP on loopback."""
    dicomweb_client = pytest.importorskip("dicomweb_client")
    lib, watch = tmp_path / "lib", tmp_path / "watch"
    lib.mkdir()
    watch.mkdir()
    url = live_server(lib, ingest=watch, ingest_settle_seconds=0.2, ingest_poll=True,
                      state_dir=tmp_path / "state")
    client = dicomweb_client.DICOMwebClient(f"{url}/dicomweb")
    datasets = [pydicom.dcmread(p) for p in instances]
    doc = client.store_instances(datasets)
    assert len(doc.ReferencedSOPSequence) == len(instances)
    assert "FailedSOPSequence" not in doc
    study = str(datasets[0].StudyInstanceUID)
    found = wait_for(lambda: client.search_for_studies(
        search_filters={"StudyInstanceUID": study}))
    assert len(found) == 1
    assert len(client.retrieve_study(study)) == len(instances)
