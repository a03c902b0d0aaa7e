"""Outside judges of the DICOMweb front, against a live server on loopback:

- wsidicom (``WsiDicom.open_web`` over ``WsiDicomWebClient``) opens real and synthetic
  slides and its ``read_region`` at several levels matches our own reader (MAD ≤ 3);
- dicomweb-client runs a worklist's searches and retrievals;
- ``dciodvfy`` (Debian ``dicom3tools``) finds no error in any instance we produce. The
  only warnings left are "Missing attribute or value that would be needed to build
  DICOMDIR" for Patient ID and Study Date/Time: the server does not know a converted
  slide's patient, and a slide file without a scan date has none (Type 2, empty).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.conftest import REAL_SLIDES, real_slide
from wsi_server.library import Library
from wsi_server.pool import ReaderPool
from wsi_server.readers import default_registry

dicomweb_client = pytest.importorskip("dicomweb_client")
wsidicom = pytest.importorskip("wsidicom")

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """Synthetic slides of each kind of level, and the real slides when present."""
    root = tmp_path_factory.mktemp("dicomweb-lib")
    for name in ("aperio-rgb.svs", "aperio-ycbcr.svs", "aperio-j2k-ycbcr.svs", "generic.tiff",
                 "odd.tiff"):
        shutil.copy(synthetic_dir / name, root / name)
    for name, path in REAL_SLIDES.items():
        if path.exists():
            target = root / "real" / name / path.name
            target.parent.mkdir(parents=True)
            if path.is_dir():
                shutil.copytree(path, target)
            else:
                target.symlink_to(path)
    return root


@pytest.fixture
def server(live_server: Callable[..., str], library_dir: Path, tmp_path: Path) -> str:
    return live_server(library_dir, state_dir=tmp_path / "state")


def _reader_for(library_dir: Path, name: str) -> Any:
    lib = Library([library_dir], ReaderPool(default_registry()))
    lib.scan()
    entry = next(e for e in lib.entries() if e.name == name)
    return entry, lib.reader(entry)


def _client(server: str) -> Any:
    return dicomweb_client.DICOMwebClient(f"{server}/dicomweb")


def _study_of(client: Any, slide_id: str) -> tuple[str, str]:
    found = client.search_for_instances(search_filters={"ContainerIdentifier": slide_id},
                                        limit=1)
    assert found, slide_id
    return _value(found[0], "0020000D"), _value(found[0], "0020000E")


# odd.tiff (downsample 3) is served and passes dciodvfy, but wsidicom refuses a pyramid
# whose levels are not powers of two apart ("Levels needs to be integer"): not a judge here.
SLIDES = ["aperio-rgb.svs", "aperio-ycbcr.svs", "aperio-j2k-ycbcr.svs", "generic.tiff",
          "svs", "ndpi", "dicom"]


@pytest.mark.parametrize("name", SLIDES)
def test_wsidicom_reads_what_our_reader_reads(
    server: str, library_dir: Path, name: str
) -> None:
    if name in REAL_SLIDES:
        real_slide(name)
        name = REAL_SLIDES[name].name
    entry, reader = _reader_for(library_dir, name)
    client = _client(server)
    study, series = _study_of(client, entry.id)
    from wsidicom import WsiDicom, WsiDicomWebClient

    with WsiDicom.open_web(WsiDicomWebClient(client), study, [series]) as slide:
        meta = reader.metadata
        assert (slide.size.width, slide.size.height) == (meta.width, meta.height)
        assert len(slide.levels) == len(meta.levels)
        if meta.mpp:
            assert slide.mpp.width == pytest.approx(meta.mpp[0] / 1000 * 1000, rel=1e-3)
        for level in sorted({0, len(meta.levels) // 2, len(meta.levels) - 1}):
            lv = meta.levels[level]
            w, h = min(lv.width, 300), min(lv.height, 300)
            x, y = (lv.width - w) // 2, (lv.height - h) // 2
            group = slide.levels[level]  # wsidicom numbers levels by log2 of downsample
            assert (group.size.width, group.size.height) == (lv.width, lv.height)
            theirs = np.asarray(
                slide.read_region((x, y), group.level, (w, h)).convert("RGB")).astype(int)
            ours = reader.read_region(level, int(x * lv.downsample), int(y * lv.downsample),
                                      w, h).astype(int)
            mad = np.abs(theirs - ours).mean()
            assert mad <= 3, (name, level, mad)


def test_a_worklist_with_dicomweb_client(server: str, library_dir: Path) -> None:
    client = _client(server)
    studies = client.search_for_studies(fields=["StudyDescription"])
    assert len(studies) >= 4
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "SM"}, limit=2,
                                     offset=1)
    assert client.search_for_studies(search_filters={"PatientName": "nobody*"}) == []
    assert client.search_for_instances(search_filters={"Modality": "ANN"}) == []
    entry, _ = _reader_for(library_dir, "aperio-rgb.svs")
    study, series = _study_of(client, entry.id)
    assert len(client.search_for_series(study)) == 1
    insts = client.search_for_instances(study, series, fields=["AvailableTransferSyntaxUID"])
    assert len(insts) == 6
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == 6
    sop = _value(insts[0], "00080018")
    frames = client.retrieve_instance_frames(
        study, series, sop, frame_numbers=[1, 2],
        media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),))
    assert len(frames) == 2 and all(f.startswith(b"\xff\xd8") for f in frames)
    instance = client.retrieve_instance(study, series, sop)
    assert instance.SOPInstanceUID == sop and instance.SOPClassUID == WSI
    rendered = client.retrieve_instance_rendered(study, series, sop,
                                                 params={"viewport": "128,128"})
    assert rendered.startswith(b"\xff\xd8")
    assert len(client.retrieve_series(study, series)) == 6


def _dciodvfy() -> str:
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing in CI (Debian package dicom3tools)")
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    return tool


def test_every_instance_we_produce_passes_dciodvfy(
    server: str, library_dir: Path, tmp_path: Path
) -> None:
    tool = _dciodvfy()
    client = _client(server)
    checked = 0
    warnings: set[str] = set()
    for study in client.search_for_studies():
        uid = _value(study, "0020000D")
        for ds in client.retrieve_study(uid):
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert pydicom.dcmread(path).file_meta.TransferSyntaxUID
            out = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True,
                                 timeout=60)
            report = out.stdout + out.stderr
            errors = [line for line in report.splitlines() if line.startswith("Error")]
            assert not errors, (ds.ImageType, errors)
            warnings |= {line.split(" - ")[1] for line in report.splitlines()
                         if line.startswith("Warning")}
            checked += 1
    assert checked >= 20
    allowed = {"</PatientID(0010,0020)>", "</StudyDate(0008,0020)>",
               "</StudyTime(0008,0030)>", "</StudyID(0020,0010)>",
               "</SeriesNumber(0020,0011)>"}
    assert warnings <= allowed, warnings
