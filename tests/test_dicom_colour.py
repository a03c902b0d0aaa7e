"""A DICOM-WSI whose Photometric Interpretation contradicts its JPEG codestream (JFIF vs
Adobe APP14 markers) is shown in the codestream's true colours by every route: Deep Zoom
tiles (default and native geometry, including stored frames passed through), thumbnails,
IIIF images and WADO-RS frames (decoded by Pillow, a browser-like decoder). OpenSlide
decodes such files in the wrong colours; the reader must not.

The fixture writes TILED_FULL VL WSI instances with pydicom from tiles of known pixels
(tissue texture with pure red, green and blue patches), each tile JPEG-encoded either as
YCbCr (JFIF) or as RGB components (Adobe APP14, transform 0), and labelled truthfully or
with the contradicting Photometric Interpretation.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid
from starlette.testclient import TestClient

from sample_slides.generate import tissue_tile
from wsi_server import codecs
from wsi_server.dicom.frames import encode_frame, jpeg_photometric
from wsi_server.readers.dicom import DicomBackend

WSI_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.77.1.6")
WIDTH, HEIGHT, TILE = 1024, 768, 256
DOWNSAMPLES = (1, 4)
RED = (slice(64, 192), slice(64, 192))  # rows, cols of level 0: pure red
GREEN = (slice(64, 192), slice(320, 448))
BLUE = (slice(320, 448), slice(576, 704))

# case: (codestream photometric written, PhotometricInterpretation stated)
CASES = {
    "ycbcr": ("YBR_FULL_422", "YBR_FULL_422"),
    "rgb": ("RGB", "RGB"),
    "ycbcr-as-rgb": ("YBR_FULL_422", "RGB"),
    "rgb-as-ybr": ("RGB", "YBR_FULL_422"),
}


def source_image() -> np.ndarray:
    img = tissue_tile(0, 0, WIDTH, HEIGHT)
    img[RED] = (255, 0, 0)
    img[GREEN] = (0, 255, 0)
    img[BLUE] = (0, 0, 255)
    return img


def _level_pixels(img: np.ndarray, downsample: int) -> np.ndarray:
    if downsample == 1:
        return img
    w, h = -(-WIDTH // downsample), -(-HEIGHT // downsample)
    return codecs.resize(img, (w, h))


def write_dicom_wsi(folder: Path, case: str, fragments_per_frame: int = 1
                    ) -> list[np.ndarray]:
    """Write the instances of one series (one per level) into ``folder``; return the true
    pixels of each level (the written codestreams decoded in their own colours)."""
    coded, stated = CASES[case]
    folder.mkdir(parents=True, exist_ok=True)
    img = source_image()
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    truth = []
    for number, downsample in enumerate(DOWNSAMPLES, 1):
        level = _level_pixels(img, downsample)
        h, w = level.shape[:2]
        cols, rows = -(-w // TILE), -(-h // TILE)
        frames = []
        decoded = np.empty((rows * TILE, cols * TILE, 3), np.uint8)
        for r in range(rows):
            for c in range(cols):
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                part = level[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
                tile[:part.shape[0], :part.shape[1]] = part
                data = encode_frame(tile, coded)
                assert jpeg_photometric(data) == coded
                frames.append(data)
                decoded[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = (
                    codecs.decode_jpeg(data))
        truth.append(decoded[:h, :w].copy())
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = WSI_SOP_CLASS
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality = "SM"
        ds.PatientName = "Colour^Test"
        ds.PatientID = "colour"
        ds.StudyDate = "20260101"
        ds.StudyTime = "000000"
        ds.ContentDate = "20260101"
        ds.ContentTime = "000000"
        ds.AcquisitionDateTime = "20260101000000"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "wsi-server tests"
        ds.ManufacturerModelName = "colour"
        ds.DeviceSerialNumber = "1"
        ds.SoftwareVersions = "1"
        ds.ContainerIdentifier = "colour"
        ds.ImageType = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if downsample == 1
                        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = stated
        ds.PlanarConfiguration = 0
        ds.Rows = TILE
        ds.Columns = TILE
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.NumberOfFrames = len(frames)
        ds.TotalPixelMatrixColumns = w
        ds.TotalPixelMatrixRows = h
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfOpticalPaths = 1
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = 0
        origin.YOffsetInSlideCoordinateSystem = 0
        ds.TotalPixelMatrixOriginSequence = [origin]
        ds.ImagedVolumeWidth = w * 0.0005 * downsample
        ds.ImagedVolumeHeight = h * 0.0005 * downsample
        ds.ImagedVolumeDepth = 0.001
        ds.VolumetricProperties = "VOLUME"
        ds.FocusMethod = "AUTO"
        ds.ExtendedDepthOfField = "NO"
        ds.SpecimenLabelInImage = "NO"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "01"
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        illum = Dataset()
        illum.CodeValue = "111744"
        illum.CodingSchemeDesignator = "DCM"
        illum.CodeMeaning = "Brightfield illumination"
        path.IlluminationTypeCodeSequence = [illum]
        path.IlluminationWaveLength = 400
        ds.OpticalPathSequence = [path]
        shared = Dataset()
        measures = Dataset()
        measures.PixelSpacing = [0.0005 * downsample, 0.0005 * downsample]
        measures.SliceThickness = 0.001
        shared.PixelMeasuresSequence = [measures]
        frame_type = Dataset()
        frame_type.FrameType = ds.ImageType
        shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame)
        ds["PixelData"].VR = "OB"
        pydicom.dcmwrite(folder / f"level{number}.dcm", ds, enforce_file_format=True)
    return truth


# -- tests ----------------------------------------------------------------------------
D = "/dicomweb"
JPEG_FRAMES = 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50'


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("dicom-colour")
    return {case: (root / case, write_dicom_wsi(root / case, case)) for case in CASES}


def decode(data: bytes) -> np.ndarray:
    """Pixels as a browser-like decoder (Pillow over libjpeg) shows the image."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_true_colours(got: np.ndarray, truth: np.ndarray, scale: int = 1,
                        limit: float = 3.0, origin: tuple[int, int] = (0, 0)) -> None:
    """``got`` shows ``truth`` (MAD), and the pure patches (at level-0 / ``scale``, minus
    the level-0 ``origin`` (y, x) of ``got``) keep their hue: red stays red, not cyan or
    green."""
    assert mad(got, truth) <= limit, mad(got, truth)
    for (rows, cols), channel in ((RED, 0), (GREEN, 1), (BLUE, 2)):
        y = ((rows.start + rows.stop) // 2 - origin[0]) // scale
        x = ((cols.start + cols.stop) // 2 - origin[1]) // scale
        if not (0 <= y < got.shape[0] and 0 <= x < got.shape[1]):
            continue
        pixel = got[y, x].astype(int)
        assert pixel[channel] >= 230, (channel, pixel)
        assert all(pixel[c] <= 25 for c in range(3) if c != channel), (channel, pixel)


@pytest.mark.parametrize("case", list(CASES))
def test_reader_decodes_the_codestream_colours(
    case: str, slides: dict[str, tuple[Path, list[np.ndarray]]]
) -> None:
    folder, truth = slides[case]
    reader = DicomBackend().open(folder)
    try:
        assert [(lv.width, lv.height) for lv in reader.metadata.levels] == [
            (t.shape[1], t.shape[0]) for t in truth]
        for level, scale in enumerate(DOWNSAMPLES):
            h, w = truth[level].shape[:2]
            assert_true_colours(reader.read_region(level, 0, 0, w, h), truth[level],
                                scale, limit=0.5)
        # an off-grid region, and one reaching past the level (background)
        got = reader.read_region(0, 100 + 4 * 0, 50, 300, 300)
        assert mad(got, truth[0][50:350, 100:400]) <= 0.5
        edge = reader.read_region(0, WIDTH - 10, 0, 20, 20)
        assert mad(edge[:, :10], truth[0][:20, WIDTH - 10:]) <= 0.5
        assert (edge[:, 10:] == reader.metadata.background).all()
        # stored frames pass through as they are: the codestream, no marker added
        raw = reader.read_raw_tile(0, 1, 1)
        assert raw is not None
        ds = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
        frame = list(pydicom.encaps.generate_frames(ds.PixelData,
                                                    number_of_frames=ds.NumberOfFrames))[5]
        assert raw.data == frame.rstrip(b"\x00")
        assert jpeg_photometric(raw.data) == CASES[case][0]
        assert mad(decode(raw.data), truth[0][256:512, 256:512]) <= 0.5
        scaled = reader.read_scaled(0, 0, 0, WIDTH, HEIGHT, 4)
        if scaled is not None:
            assert mad(scaled, truth[1]) <= 4
    finally:
        reader.close()


def test_the_fixture_reproduces_openslides_mistake(
    slides: dict[str, tuple[Path, list[np.ndarray]]]
) -> None:
    """OpenSlide follows the stated photometric: the contradicted files come out in wrong
    colours from it (else the tests above would prove nothing)."""
    import openslide

    for case in ("ycbcr-as-rgb", "rgb-as-ybr"):
        folder, truth = slides[case]
        with openslide.OpenSlide(sorted(folder.glob("*.dcm"))[0]) as osr:
            got = np.asarray(osr.read_region((0, 0), 0, (WIDTH, HEIGHT)).convert("RGB"))
        assert mad(got, truth[0]) > 20, case


def test_frames_in_several_fragments_keep_openslides_pixels_corrected(
    tmp_path: Path,
) -> None:
    """A level whose frames are split over fragments cannot be read frame by frame: its
    pixels are OpenSlide's with the transform OpenSlide skipped applied (exact for YCbCr
    data labelled RGB), or the one it wrongly applied inverted (approximate: OpenSlide
    clipped, but red is red again)."""
    for case, limit in (("ycbcr-as-rgb", 1.0), ("rgb-as-ybr", 60.0)):
        truth = write_dicom_wsi(tmp_path / case, case, fragments_per_frame=2)
        reader = DicomBackend().open(tmp_path / case)
        try:
            assert reader.read_raw_tile(0, 0, 0) is None
            got = reader.read_region(0, 0, 0, WIDTH, HEIGHT)
            assert mad(got, truth[0]) <= limit, (case, mad(got, truth[0]))
            red = got[128, 128].astype(int)
            assert red[0] > 150 and red[0] > 2 * max(red[1], red[2]), (case, red)
        finally:
            reader.close()


def test_a_damaged_frame_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    from wsi_server.errors import UnreadableSlide

    truth = write_dicom_wsi(tmp_path / "bad", "ycbcr-as-rgb")
    path = tmp_path / "bad" / "level1.dcm"
    ds = pydicom.dcmread(path)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData,
                                                 number_of_frames=ds.NumberOfFrames))
    frames[0] = frames[0][:200] + b"\x00" * 64 + b"\xff\xd9"
    ds.PixelData = encapsulate(frames)
    pydicom.dcmwrite(path, ds)
    reader = DicomBackend().open(tmp_path / "bad")
    try:
        with pytest.raises(UnreadableSlide):
            reader.read_region(0, 0, 0, 256, 256)
        got = reader.read_region(0, 512, 256, 256, 256)  # other frames still read
        assert mad(got, truth[0][256:512, 512:768]) <= 0.5
    finally:
        reader.close()


@pytest.fixture(scope="module")
def clients(slides: dict[str, tuple[Path, list[np.ndarray]]],
            tmp_path_factory: pytest.TempPathFactory) -> Any:
    from wsi_server.app import create_app
    from wsi_server.settings import Settings

    out: dict[str, tuple[TestClient, str]] = {}
    entered = []
    for case, (folder, _truth) in slides.items():
        client = TestClient(create_app(Settings(
            paths=(folder,), rescan_seconds=0, isolate_open=False,
            state_dir=tmp_path_factory.mktemp("state"),
        )))
        client.__enter__()
        entered.append(client)
        slide_id = client.get("/api/slides").json()["slides"][0]["id"]
        out[case] = (client, slide_id)
    yield out
    for client in entered:
        client.__exit__(None, None, None)


def _get(client: TestClient, url: str, **kw: Any) -> bytes:
    r = client.get(url, **kw)
    assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return r.content


@pytest.mark.parametrize("case", list(CASES))
def test_every_route_shows_the_codestream_colours(
    case: str, slides: dict[str, tuple[Path, list[np.ndarray]]], clients: Any
) -> None:
    _folder, truth = slides[case]
    client, sid = clients[case]
    top = 10  # 1024 px wide: Deep Zoom level 10 is level 0
    # Deep Zoom, default geometry (254 + 1 overlap): rendered and re-encoded
    tile = decode(_get(client, f"/slides/{sid}_files/{top}/0_0.jpeg"))
    assert_true_colours(tile, truth[0][:255, :255], limit=4.0)
    tile = decode(_get(client, f"/slides/{sid}_files/{top}/1_1.jpeg"))
    assert mad(tile, truth[0][253:509, 253:509]) <= 4.0
    tile = decode(_get(client, f"/slides/{sid}_files/{top - 2}/0_0.jpeg"))
    assert_true_colours(tile, truth[1][:192, :255], scale=4, limit=4.0)
    # Deep Zoom, native geometry: full stored frames pass through, edge ones render
    native = client.get(f"/slides/{sid}/native_files/{top}/0_0.jpeg")
    assert native.status_code == 200
    assert_true_colours(decode(native.content), truth[0][:256, :256], limit=0.5)
    tile = decode(_get(client, f"/slides/{sid}/native_files/{top}/2_1.jpeg"))
    assert_true_colours(tile, truth[0][256:512, 512:768], limit=0.5, origin=(256, 512))
    tile = decode(_get(client, f"/slides/{sid}/native_files/{top - 2}/0_0.jpeg"))
    assert_true_colours(tile, truth[1], scale=4, limit=4.0)
    # thumbnail
    thumb = decode(_get(client, f"/api/slides/{sid}/thumbnail", params={"max_size": "256"}))
    assert_true_colours(thumb, truth[1], scale=4, limit=4.0)
    # IIIF, when the front is mounted
    r = client.get(f"/iiif/3/{sid}/full/256,/0/default.jpg")
    if r.status_code != 404:
        assert r.status_code == 200, r.text[:300]
        assert_true_colours(decode(r.content), truth[1], scale=4, limit=4.0)
    # WADO-RS frames, decoded by a browser-like decoder
    found = client.get(f"{D}/instances", params={"includefield": "all"}).json()
    level0 = next(i for i in found if i["00480006"]["Value"][0] == WIDTH)
    assert level0["00280004"]["Value"][0] in (CASES[case][0], "YBR_FULL")  # the true one
    url = (f"{D}/studies/{level0['0020000D']['Value'][0]}/series/"
           f"{level0['0020000E']['Value'][0]}/instances/{level0['00080018']['Value'][0]}")
    frame = _get(client, f"{url}/frames/1", headers={"Accept": JPEG_FRAMES})
    body = frame[frame.index(b"\xff\xd8"):]
    assert_true_colours(decode(body), truth[0][:256, :256], limit=0.5)
