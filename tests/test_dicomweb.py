"""The DICOMweb front through the app (TestClient): QIDO-RS, WADO-RS metadata, frames,
instances, rendered images; frames byte for byte; bad requests; access."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.encaps import generate_frames
from starlette.testclient import TestClient

from tests.authkit import BHAM, LEEDS, Kit, make_library, oidc_settings, running
from tests.conftest import real_slide
from tests.plugins.jwks_server import JwksServer
from wsi_server import codecs

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG = "1.2.840.10008.1.2.4.50"
LE = "1.2.840.10008.1.2.1"
D = "/dicomweb"
JPEG_FRAMES = f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG}'


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def multipart_parts(response: Any) -> list[bytes]:
    ctype = response.headers["content-type"]
    boundary = re.search(r"boundary=\"?([^\";]+)", ctype)
    assert boundary, ctype
    marker = b"--" + boundary.group(1).encode()
    parts = []
    for chunk in response.content.split(marker)[1:]:
        if chunk.startswith(b"--"):
            break
        _head, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body[:-2])  # the CRLF before the next boundary
    return parts


@pytest.fixture
def lib(tmp_path: Path, synthetic_slides: dict[str, Path]) -> Path:
    root = tmp_path / "lib"
    root.mkdir()
    for name in ("aperio-rgb", "aperio-ycbcr", "aperio-j2k-ycbcr"):
        shutil.copy(synthetic_slides[name], root / f"{name}.svs")
    return root


@pytest.fixture
def client(make_client: Callable[..., TestClient], lib: Path) -> TestClient:
    return make_client(paths=(lib,))


def studies(client: TestClient, **params: str) -> list[dict[str, Any]]:
    r = client.get(f"{D}/studies", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    out: list[dict[str, Any]] = r.json()
    return out


def slide_study(client: TestClient, slide_name: str) -> dict[str, Any]:
    """The QIDO study of a slide, found through the slide's id (its ContainerIdentifier)."""
    ids = {s["name"]: s["id"] for s in client.get("/api/slides").json()["slides"]}
    r = client.get(f"{D}/instances", params={"ContainerIdentifier": ids[slide_name],
                                             "limit": "1"})
    assert r.status_code == 200 and r.json(), r.text
    uid = value(r.json()[0], "0020000D")
    return next(s for s in studies(client) if value(s, "0020000D") == uid)


def instances(client: TestClient, study: dict[str, Any]) -> list[dict[str, Any]]:
    uid = value(study, "0020000D")
    r = client.get(f"{D}/studies/{uid}/instances",
                   params={"includefield": "all"})
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()
    return out


def instance_url(inst: dict[str, Any]) -> str:
    return (f"{D}/studies/{value(inst, '0020000D')}/series/{value(inst, '0020000E')}"
            f"/instances/{value(inst, '00080018')}")


def test_every_slide_is_a_study_with_one_series(client: TestClient) -> None:
    found = studies(client)
    assert len(found) == 3
    for study in found:
        assert value(study, "00080061") == "SM"
        assert value(study, "00201206") == 1
        uid = value(study, "0020000D")
        series = client.get(f"{D}/studies/{uid}/series").json()
        assert len(series) == 1 and value(series[0], "00080060") == "SM"
        assert value(series[0], "00201209") == value(study, "00201208")
    # /series and /instances at the root see the same tree
    assert len(client.get(f"{D}/series").json()) == 3
    every = client.get(f"{D}/instances").json()
    assert len(every) == sum(value(s, "00201208") for s in found)
    assert {value(i, "00080016") for i in every} == {WSI}


def test_instances_of_a_slide(client: TestClient) -> None:
    insts = instances(client, slide_study(client, "aperio-rgb.svs"))
    kinds = [i["00080008"]["Value"][2] for i in insts]
    assert kinds == ["VOLUME", "VOLUME", "VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL"]
    sizes = [(value(i, "00480006"), value(i, "00480007")) for i in insts[:3]]
    assert sizes == [(3000, 2100), (750, 525), (187, 131)]
    assert all(value(i, "00200052") == value(insts[0], "00200052") for i in insts)
    assert all(value(i, "00400512") == value(insts[0], "00400512") for i in insts)
    assert value(insts[0], "00209311") == "TILED_FULL"
    assert insts[0]["00083002"]["Value"] == [JPEG, LE]
    for inst in insts:  # each its own RetrieveURL (instance_url builds the same)
        assert value(inst, "00081190").endswith(instance_url(inst))


def test_wsidicom_style_instance_search(client: TestClient) -> None:
    """The search wsidicom sends: SOP class, modality, repeated series UIDs, with
    AvailableTransferSyntaxUID; and searches for what we do not hold are empty."""
    study = slide_study(client, "aperio-ycbcr.svs")
    uid = value(study, "0020000D")
    series = value(client.get(f"{D}/studies/{uid}/series").json()[0], "0020000E")
    url = (f"{D}/studies/{uid}/instances?00080016={WSI}&0020000E={series}"
           f"&0020000E=1.2.3&00080060=SM&includefield=AvailableTransferSyntaxUID")
    r = client.get(url)
    assert r.status_code == 200 and len(r.json()) == 5
    assert r.json()[0]["00083002"]["Value"] == [JPEG, LE]
    for empty in ("00080060=ANN", "SOPClassUID=1.2.840.10008.5.1.4.1.1.91.1",
                  "Modality=SEG", "SeriesInstanceUID=9.9.9"):
        r = client.get(f"{D}/studies/{uid}/instances?{empty}")
        assert (r.status_code, r.json()) == (200, []), empty
    assert client.get(f"{D}/studies", params={"ModalitiesInStudy": "SR"}).json() == []


def test_uids_are_stable_and_follow_the_content(
    make_client: Callable[..., TestClient], lib: Path
) -> None:
    first = sorted(value(s, "0020000D") for s in studies(make_client(paths=(lib,))))
    again = sorted(value(s, "0020000D") for s in studies(make_client(paths=(lib,))))
    assert first == again  # another process (replica, restart): the same UIDs
    for uid in first:
        assert uid.startswith("2.25.") and len(uid) <= 64
    path = lib / "aperio-rgb.svs"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = sorted(value(s, "0020000D") for s in studies(make_client(paths=(lib,))))
    assert len(set(first) & set(changed)) == 2


def test_metadata_has_absolute_bulkdata_uris(
    make_client: Callable[..., TestClient], lib: Path
) -> None:
    client = make_client(paths=(lib,), public_url="https://slides.example.org")
    study = slide_study(client, "aperio-rgb.svs")
    uid = value(study, "0020000D")
    r = client.get(f"{D}/studies/{uid}/metadata")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+json")
    meta = r.json()
    assert len(meta) == 6
    level0 = meta[0]
    assert level0["7FE00010"]["BulkDataURI"].startswith(
        f"https://slides.example.org/dicomweb/studies/{uid}/series/")
    assert value(level0, "00280004") == "YBR_FULL_422"
    spacing = level0["52009229"]["Value"][0]["00289110"]["Value"][0]["00280030"]["Value"]
    assert spacing == [0.00025, 0.00025]
    path = level0["00480105"]["Value"][0]
    assert "00282000" in path  # the ICC profile, inline
    bulk = client.get(level0["7FE00010"]["BulkDataURI"].replace(
        "https://slides.example.org", ""), headers={"Accept": JPEG_FRAMES})
    assert bulk.status_code == 200
    assert len(multipart_parts(bulk)) == value(level0, "00280008")


def test_frames_are_the_stored_tiles_byte_for_byte(client: TestClient, lib: Path) -> None:
    for name in ("aperio-rgb.svs", "aperio-ycbcr.svs"):
        insts = instances(client, slide_study(client, name))
        with tifffile.TiffFile(lib / name) as tif:
            page = tif.pages[0]
            rgb = int(page.photometric) == 2
            fh = tif.filehandle
            cols = -(-int(page.imagewidth) // int(page.tilewidth))
            count = int(value(insts[0], "00280008"))
            numbers = [1, 2, cols + 1, count]  # includes the padded last (edge) tile
            r = client.get(f"{instance_url(insts[0])}/frames/{','.join(map(str, numbers))}",
                           headers={"Accept": JPEG_FRAMES})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
            parts = multipart_parts(r)
            assert len(parts) == 4
            for number, part in zip(numbers, parts, strict=True):
                fh.seek(page.dataoffsets[number - 1])
                stored = fh.read(page.databytecounts[number - 1])
                assert part == codecs.complete_jpeg(stored, page.jpegtables, rgb), name
        # single frame, and colour: the frame decodes to what our reader shows
        r = client.get(f"{instance_url(insts[0])}/frames/1", headers={"Accept": "image/jpeg"})
        assert r.headers["content-type"] == "image/jpeg"
        tile = int(value(insts[0], "00280011"))
        assert codecs.decode_jpeg(r.content).shape[:2] == (tile, tile)


def test_uncompressed_frames_on_request(client: TestClient) -> None:
    insts = instances(client, slide_study(client, "aperio-rgb.svs"))
    url = f"{instance_url(insts[0])}/frames/1"
    jpeg = multipart_parts(client.get(url, headers={"Accept": JPEG_FRAMES}))[0]
    r = client.get(url, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 200
    raw = multipart_parts(r)[0]
    tile = int(value(insts[0], "00280011"))
    assert raw == codecs.decode_jpeg(jpeg).tobytes()
    assert len(raw) == tile * tile * 3


def test_rendered_levels_and_associated_images(client: TestClient) -> None:
    insts = instances(client, slide_study(client, "aperio-j2k-ycbcr.svs"))
    level0 = insts[0]
    r = client.get(f"{instance_url(level0)}/frames/1", headers={"Accept": JPEG_FRAMES})
    assert r.status_code == 200
    frame = codecs.decode_jpeg(multipart_parts(r)[0])
    assert frame.shape == (256, 256, 3)
    assert value(level0, "00280004") == "RGB"  # encoded once, RGB components
    label = next(i for i in insts if i["00080008"]["Value"][2] == "LABEL")
    r = client.get(f"{instance_url(label)}/frames/1", headers={"Accept": JPEG_FRAMES})
    assert codecs.decode_jpeg(multipart_parts(r)[0]).shape[:2] == (
        value(label, "00280010"), value(label, "00280011"))


def test_whole_instances_are_part10_files(client: TestClient) -> None:
    insts = instances(client, slide_study(client, "aperio-rgb.svs"))
    r = client.get(instance_url(insts[1]), headers={"Accept": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.file_meta.TransferSyntaxUID == JPEG
    assert ds.SOPInstanceUID == value(insts[1], "00080018")
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert len(frames) == int(ds.NumberOfFrames) == 9
    url = f"{instance_url(insts[1])}/frames/9"
    assert frames[8].rstrip(b"\x00") == multipart_parts(
        client.get(url, headers={"Accept": JPEG_FRAMES}))[0].rstrip(b"\x00")
    # series retrieval: one Part 10 per instance, multipart
    series_url = instance_url(insts[0]).rsplit("/instances/", 1)[0]
    r = client.get(series_url, headers={
        "Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    assert len(multipart_parts(r)) == 6


def test_rendered_and_thumbnails(client: TestClient) -> None:
    insts = instances(client, slide_study(client, "aperio-rgb.svs"))
    url = instance_url(insts[1])
    r = client.get(f"{url}/rendered", params={"viewport": "300,300"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert codecs.decode_jpeg(r.content).shape == (210, 300, 3)
    r = client.get(f"{url}/rendered", headers={"Accept": "image/png"})
    assert r.content.startswith(b"\x89PNG")
    r = client.get(f"{url}/frames/1/rendered", params={"viewport": "64,64"})
    assert codecs.decode_jpeg(r.content).shape == (64, 64, 3)
    r = client.get(f"{url}/thumbnail")
    assert r.status_code == 200
    study = url.split("/series/")[0]
    assert client.get(f"{study}/thumbnail").status_code == 200
    assert client.get(f"{url}/rendered", headers={"Accept": "image/gif"}).status_code == 406


def test_bad_requests_are_precise(client: TestClient) -> None:
    insts = instances(client, slide_study(client, "aperio-rgb.svs"))
    url = instance_url(insts[0])
    count = int(value(insts[0], "00280008"))
    cases = {
        f"{url}/frames/0": 400,
        f"{url}/frames/{count + 1}": 400,
        f"{url}/frames/99999999999999": 400,
        f"{url}/frames/1,x": 400,
        f"{url}/frames/" + ",".join(["1"] * 5000): 400,
        f"{url}/rendered?viewport=0,0": 400,
        f"{D}/studies?limit=-3": 400,
        f"{D}/studies?NoSuchAttribute=1": 400,
        f"{D}/studies?StudyDate=yesterday": 400,
        f"{D}/studies/1.2.3/metadata": 404,
        f"{D}/studies/1.2.3/series/1.2.3/instances/1.2.3/frames/1": 404,
        url.replace(url.rsplit("/", 1)[1], "1.2.3") + "/metadata": 404,
    }
    for target, status in cases.items():
        r = client.get(target)
        assert r.status_code == status, (target[:120], r.text)
        assert set(r.json()) == {"error", "detail"}
    r = client.get(f"{url}/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert r.status_code == 406 and r.json()["error"] == "not_acceptable"
    r = client.get(f"{D}/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406


def test_hidden_associated_images_are_not_instances(
    make_client: Callable[..., TestClient], lib: Path
) -> None:
    client = make_client(paths=(lib,), hide_associated=True)
    study = slide_study(client, "aperio-rgb.svs")
    assert value(study, "00201208") == 4  # 3 levels + thumbnail
    kinds = [i["00080008"]["Value"][2] for i in instances(client, study)]
    assert kinds == ["VOLUME", "VOLUME", "VOLUME", "THUMBNAIL"]
    shown = make_client(paths=(lib,))
    label = next(i for i in instances(shown, slide_study(shown, "aperio-rgb.svs"))
                 if i["00080008"]["Value"][2] == "LABEL")
    assert client.get(f"{instance_url(label)}/metadata").status_code == 404
    assert client.get(f"{instance_url(label)}/frames/1").status_code == 404


def test_real_dicom_keeps_its_own_uids(make_client: Callable[..., TestClient]) -> None:
    folder = real_slide("dicom")
    client = make_client(paths=(folder,))
    files = sorted(folder.glob("*.dcm"))
    original = pydicom.dcmread(files[0])
    found = studies(client)
    assert [value(s, "0020000D") for s in found] == [original.StudyInstanceUID]
    insts = instances(client, found[0])
    assert value(insts[0], "00080018") == original.SOPInstanceUID
    url = instance_url(insts[0])
    frames = list(generate_frames(original.PixelData,
                                  number_of_frames=int(original.NumberOfFrames)))
    r = client.get(f"{url}/frames/1,{len(frames)}", headers={"Accept": JPEG_FRAMES})
    got = multipart_parts(r)
    assert got[0].rstrip(b"\x00") == frames[0].rstrip(b"\x00")
    assert got[1].rstrip(b"\x00") == frames[-1].rstrip(b"\x00")


def test_dicomweb_follows_access_rules(
    tmp_path: Path, synthetic_slides: dict[str, Path], jwks_server: JwksServer
) -> None:
    lib = make_library(tmp_path / "lib", synthetic_slides)
    with running(oidc_settings(tmp_path, lib, jwks_server), jwks_server) as kit:
        _access_checks(kit)


def _access_checks(kit: Kit) -> None:
    bea = kit.bearer("bea", [BHAM])
    bob = kit.bearer("bob", [LEEDS])
    seen_by_bea = kit.get(f"{D}/studies", bea).json()
    seen_by_bob = kit.get(f"{D}/studies", bob).json()
    assert len(seen_by_bea) == 2 and len(seen_by_bob) == 1
    assert kit.get(f"{D}/instances", bob).status_code == 200
    hidden = value(seen_by_bea[0], "0020000D")
    assert hidden not in {value(s, "0020000D") for s in seen_by_bob}
    insts = kit.get(f"{D}/studies/{hidden}/instances", bea).json()
    url = instance_url(insts[0])
    for suffix in ("/metadata", "/frames/1", "", "/rendered"):
        denied = kit.get(url + suffix, bob)
        missing = kit.get(url.replace(hidden, "1.2.826.0.1.999") + suffix, bob)
        assert denied.status_code == 404, suffix
        assert denied.content == missing.content, suffix
        assert kit.get(url + suffix, bea).status_code == 200, suffix
    assert kit.get(f"{D}/studies/{hidden}/instances", bob).json() == []
    assert kit.get(f"{D}/studies").status_code == 401  # anonymous, sign-in on


def test_frames_of_every_kind_decode_to_our_pixels(client: TestClient) -> None:
    """Frame 1 of each level matches our own reader's pixels (colour included)."""
    app: Any = client.app
    ctx = app.state.ctx
    for name in ("aperio-rgb.svs", "aperio-ycbcr.svs", "aperio-j2k-ycbcr.svs"):
        study = slide_study(client, name)
        entry = next(e for e in ctx.library.entries() if e.name == name)
        reader = ctx.library.reader(entry)
        for inst in instances(client, study):
            if inst["00080008"]["Value"][2] != "VOLUME":
                continue
            r = client.get(f"{instance_url(inst)}/frames/1", headers={"Accept": "image/jpeg"})
            frame = codecs.decode_jpeg(r.content).astype(int)
            level = next(i for i, lv in enumerate(reader.metadata.levels)
                     if lv.width == value(inst, "00480006"))
            h = min(frame.shape[0], reader.metadata.levels[level].height)
            w = min(frame.shape[1], reader.metadata.levels[level].width)
            ours = reader.read_region(level, 0, 0, w, h).astype(int)
            assert np.abs(frame[:h, :w] - ours).mean() <= 3, (name, level)
