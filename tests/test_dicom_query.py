"""QIDO-RS / WADO-RS grammar and JPEG inspection: pure functions, no files, no server."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
from pydicom.dataset import Dataset

from wsi_server import codecs
from wsi_server.dicom import frames as fr
from wsi_server.dicom import query as q
from wsi_server.errors import BadRequest

JPEG = q.JPEG_BASELINE
LE = q.EXPLICIT_LE


def record(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


STUDIES = [
    record(StudyInstanceUID="1.2.3", PatientName="Smith^John", PatientID="P1",
           StudyDate="20200115", ModalitiesInStudy=["SM"], AccessionNumber="A7",
           SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.6", Modality="SM"),
    record(StudyInstanceUID="1.2.4", PatientName="Smythe^Jane", PatientID="P2",
           StudyDate="20210301", ModalitiesInStudy=["SM"], AccessionNumber="",
           SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.6", Modality="SM"),
    record(StudyInstanceUID="1.2.5", PatientName="", PatientID="", StudyDate="",
           ModalitiesInStudy=["SM"], SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.6",
           Modality="SM"),
]


def uids(params: list[tuple[str, str]]) -> list[str]:
    return [r.StudyInstanceUID for r in q.search(STUDIES, q.parse_qido(params))]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([], ["1.2.3", "1.2.4", "1.2.5"]),
        ([("StudyInstanceUID", "1.2.4")], ["1.2.4"]),
        ([("0020000D", "1.2.4")], ["1.2.4"]),
        ([("StudyInstanceUID", "1.2.3,1.2.5")], ["1.2.3", "1.2.5"]),
        ([("StudyInstanceUID", "1.2.3"), ("StudyInstanceUID", "1.2.4")], ["1.2.3", "1.2.4"]),
        ([("StudyInstanceUID", "1.2")], []),  # UIDs match whole, never as prefixes
        ([("PatientID", "P2")], ["1.2.4"]),
        ([("PatientID", "P*")], ["1.2.3", "1.2.4"]),
        ([("PatientName", "sm*")], ["1.2.3", "1.2.4"]),  # PN: case-insensitive
        ([("PatientName", "Sm?th^John")], ["1.2.3"]),
        ([("PatientName", "jane")], []),
        ([("PatientName", "jane"), ("fuzzymatching", "true")], ["1.2.4"]),
        ([("PatientName", "")], ["1.2.3", "1.2.4", "1.2.5"]),  # universal
        ([("AccessionNumber", "A7")], ["1.2.3"]),
        ([("StudyDate", "20200101-20201231")], ["1.2.3"]),
        ([("StudyDate", "20210101-")], ["1.2.4"]),
        ([("StudyDate", "-20201231")], ["1.2.3"]),
        ([("StudyDate", "20210301")], ["1.2.4"]),
        ([("ModalitiesInStudy", "SM")], ["1.2.3", "1.2.4", "1.2.5"]),
        ([("ModalitiesInStudy", "ANN")], []),  # a modality we do not hold: empty
        ([("ModalitiesInStudy", "ANN,SM")], ["1.2.3", "1.2.4", "1.2.5"]),
        ([("Modality", "SEG")], []),
        ([("SOPClassUID", "1.2.840.10008.5.1.4.1.1.91.1")], []),  # annotations: empty
        ([("limit", "2")], ["1.2.3", "1.2.4"]),
        ([("offset", "1"), ("limit", "1")], ["1.2.4"]),
        ([("offset", "5")], []),
    ],
)
def test_matching(params: list[tuple[str, str]], expected: list[str]) -> None:
    assert uids(params) == expected


@pytest.mark.parametrize(
    "params",
    [
        [("NoSuchKeyword", "1")],
        [("FFFF0000", "1")],
        [("limit", "-1")],
        [("limit", "ten")],
        [("limit", "0")],
        [("offset", "x")],
        [("fuzzymatching", "maybe")],
        [("StudyDate", "2020-01-01")],
        [("StudyDate", "20200101-20201231-20221231")],
        [("includefield", "NotAnAttribute")],
        [("ReferencedSeriesSequence", "1")],
        [("00400275.0040A123", "x")],
    ],
)
def test_malformed_queries_are_400(params: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequest):
        q.parse_qido(params)


def test_response_holds_defaults_matches_and_included_fields() -> None:
    rec = record(StudyInstanceUID="1.2.3", PatientID="P1", StudyDescription="x",
                 ContainerIdentifier="c1", Manufacturer="m")
    query = q.parse_qido([("Manufacturer", "m"), ("includefield", "00400512")])
    out = q.response(rec, query, "study")
    assert {e.keyword for e in out} == {
        "StudyInstanceUID", "PatientID", "Manufacturer", "ContainerIdentifier"}
    everything = q.response(rec, q.parse_qido([("includefield", "all")]), "study")
    assert "StudyDescription" in everything
    with_list = q.parse_qido([("includefield", "AvailableTransferSyntaxUID,PatientID")])
    assert 0x00083002 in with_list.include


def test_frame_lists() -> None:
    assert q.parse_frame_list("1", 4) == [0]
    assert q.parse_frame_list("3,1,3", 4) == [2, 0, 2]
    for bad in ("0", "5", "-1", "a", "1,,2", "1;2", "9" * 12, ",".join(["1"] * 513)):
        with pytest.raises(BadRequest):
            q.parse_frame_list(bad, 4)


@pytest.mark.parametrize(
    ("accept", "syntax", "part", "multipart"),
    [
        ("", JPEG, "application/octet-stream", True),
        ("*/*", JPEG, "image/jpeg", True),
        ('multipart/related; type="image/jpeg"', JPEG, "image/jpeg", True),
        (f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG}', JPEG,
         "image/jpeg", True),
        ('multipart/related; type="application/octet-stream"; transfer-syntax=*', JPEG,
         "application/octet-stream", True),
        ('multipart/related; type="application/octet-stream"', LE,
         "application/octet-stream", True),
        ('multipart/related; type="image/jp2", multipart/related; type="image/jpeg"', JPEG,
         "image/jpeg", True),
        ("image/jpeg", JPEG, "image/jpeg", False),
    ],
)
def test_frame_negotiation(accept: str, syntax: str, part: str, multipart: bool) -> None:
    answer = q.negotiate_frames(accept, JPEG, (JPEG, LE))
    assert answer is not None
    assert (answer.syntax, answer.part_type.split(";")[0], answer.multipart) == (
        syntax, part, multipart)
    assert f"transfer-syntax={syntax}" in answer.part_type


@pytest.mark.parametrize(
    "accept",
    [
        'multipart/related; type="image/jp2"',
        'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.70',
        'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2',
        "application/pdf",
    ],
)
def test_frame_negotiation_refuses_what_it_cannot_give(accept: str) -> None:
    assert q.negotiate_frames(accept, JPEG, (JPEG, LE)) is None


def test_viewport_and_rendered_format() -> None:
    assert q.parse_viewport(None) is None
    assert q.parse_viewport("256,128") == (256, 128)
    for bad in ("0,10", "10", "1,2,3,4,5,6", "a,b", "99999,1"):
        with pytest.raises(BadRequest):
            q.parse_viewport(bad)
    assert q.rendered_format("") == "jpeg"
    assert q.rendered_format("image/png") == "png"
    assert q.rendered_format("image/png;q=0.5, image/jpeg") == "jpeg"
    assert q.rendered_format("application/dicom") is None


def _pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)


def test_jpeg_photometric_follows_the_codestream() -> None:
    px = _pixels()
    assert fr.jpeg_photometric(simplejpeg.encode_jpeg(px, colorsubsampling="420")) == \
        "YBR_FULL_422"
    assert fr.jpeg_photometric(simplejpeg.encode_jpeg(px, colorsubsampling="444")) == \
        "YBR_FULL"
    rgb = fr.encode_frame(px, "RGB")
    assert fr.jpeg_photometric(rgb) == "RGB"
    assert fr.jpeg_photometric(fr.encode_frame(px, "YBR_FULL_422")) == "YBR_FULL_422"
    # an Aperio-style abbreviated tile completed with the Adobe marker reads as RGB
    assert fr.jpeg_photometric(codecs.complete_jpeg(rgb, None, True)) == "RGB"
    gray = simplejpeg.encode_jpeg(px[:, :, :1].copy(), colorspace="GRAY")
    assert fr.jpeg_photometric(gray) == "MONOCHROME2"
    assert fr.jpeg_photometric(b"not a jpeg") is None
    # every encoding decodes back to the same colours (a smooth pink/purple stain)
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[..., 0] = 200
    smooth[..., 1] = np.linspace(40, 160, 48, dtype=np.uint8)[None, :]
    smooth[..., 2] = 180
    for photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        back = fr.decode_frame(fr.encode_frame(smooth, photometric, 95)).astype(int)
        assert np.abs(back - smooth).mean() < 3, photometric


def test_multipart_framing_is_what_clients_parse() -> None:
    body = fr.multipart_body("b0", "image/jpeg", [b"one", b"\r\ntwo"])
    assert body.startswith(b"--b0\r\nContent-Type: image/jpeg\r\n\r\none\r\n--b0\r\n")
    assert body.endswith(b"\r\ntwo\r\n--b0--\r\n")
    assert len(fr.frame_item(b"abc")) == 8 + 4  # item header + even-padded value
