"""A slide as DICOM: one study, one series, one VL Whole Slide Microscopy instance per
stored pyramid level (TILED_FULL) plus label, overview and thumbnail instances.

Slides in other formats get UIDs derived from their content identity (slide id and
fingerprint: the same on every replica and after restarts, new when a file changes) and a
dataset built with pydicom from what the reader knows. Real DICOM-WSI folders keep their
own instances, UIDs and attributes; only what cannot stay true is changed (a Photometric
Interpretation that contradicts the JPEG codestream, offset tables of a layout we do not
send).

Decisions on debatable points of the standard (see the README's conformance note):

- a converted slide's patient is unknown to the server: Patient Name and ID are empty
  (Type 2); the Container Identifier is the slide id (file names may hold identifiers);
- ``YBR_FULL_422`` for subsampled YCbCr JPEG (4:2:2 and 4:2:0 alike, as PS3.5 8.2.1 and
  every WSI converter do), ``RGB`` for Aperio's RGB-component JPEG (Adobe marker,
  transform 0); stored 4:4:4 YCbCr tiles (``YBR_FULL``, which the WSI IOD does not allow)
  and every other level are encoded once as RGB-component JPEG;
- without an ICC profile in the file the optical path carries sRGB (the ICC Profile is
  Type 1C for colour images), with Color Space ``SRGB``;
- level 0 is ``ORIGINAL\\PRIMARY\\VOLUME\\NONE``, other levels ``DERIVED\\PRIMARY\\VOLUME\\
  RESAMPLED``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import struct
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.tag import Tag
from pydicom.uid import VLWholeSlideMicroscopyImageStorage
from pydicom.valuerep import DSfloat

import wsi_server
from wsi_server.dicom.frames import (
    EXPLICIT_LE,
    JPEG_BASELINE,
    encode_frame,
    jpeg_photometric,
    pad_frame,
    trim_jpeg,
)
from wsi_server.library import SlideEntry
from wsi_server.readers import RawTile, SlideMetadata, SlideReader

log = logging.getLogger(__name__)

WSI_SOP_CLASS = str(VLWholeSlideMicroscopyImageStorage)
FrameSource = Literal["stored", "rendered", "associated", "file"]
ImageKind = Literal["VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL"]
ASSOCIATED_KINDS: dict[str, ImageKind] = {
    "label": "LABEL", "macro": "OVERVIEW", "thumbnail": "THUMBNAIL",
}
WITHHELD_BY: dict[str, str] = {"LABEL": "label", "OVERVIEW": "macro"}
"""Image type → the associated-image name whose withholding also withholds it."""
DEFAULT_FRAME = 256
ENCODED_PHOTOMETRIC = "RGB"
"""Frames the server encodes are RGB-component JPEG (Adobe marker, no colour transform,
no chroma subsampling): a fluorescence or finely stained level keeps its colour detail
(4:2:0 loses it), and the WSI IOD does not allow YBR_FULL."""
_PIXEL_DATA = Tag(0x7FE00010)
_DROPPED_FROM_FILES = (
    Tag(0x7FE00001), Tag(0x7FE00002), Tag(0x7FE00003),  # offset tables of the file's layout
    Tag(0xFFFCFFFC),  # trailing padding
)
_LABEL_TEXT = (Tag(0x22000002), Tag(0x22000005))  # Label Text, Barcode Value
_JPEG_FAMILY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


@runtime_checkable
class StoredTiles(Protocol):
    """A reader that gives stored tiles at the edges of a level too (full-size, padded)."""

    def read_stored_tile(self, level: int, col: int, row: int) -> RawTile | None: ...


@dataclass(frozen=True)
class FileFrames:
    """Where each frame of a DICOM file lies: (offset, length) of its fragments."""

    path: Path
    frames: tuple[tuple[tuple[int, int], ...], ...]
    encapsulated: bool


@dataclass(frozen=True, eq=False)
class InstanceModel:
    uid: str
    number: int
    kind: ImageKind
    source: FrameSource
    level: int
    """Slide level the frames come from (-1 for associated images)."""
    associated: str | None
    width: int
    height: int
    tile_w: int
    tile_h: int
    transfer_syntax: str
    photometric: str
    dataset: Dataset
    """Every attribute but the Pixel Data; no file meta."""
    file: FileFrames | None = None

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)

    @property
    def frame_count(self) -> int:
        return self.cols * self.rows

    def address(self, index: int) -> tuple[int, int]:
        """(col, row) of the 0-based frame ``index`` (TILED_FULL: row-major)."""
        return index % self.cols, index // self.cols

    @property
    def transfer_syntaxes(self) -> tuple[str, ...]:
        """Transfer syntaxes frames can be had in: the stored one, and uncompressed when
        the stored one is JPEG baseline (decoded on request)."""
        if self.transfer_syntax in _JPEG_FAMILY:
            return (self.transfer_syntax, EXPLICIT_LE)
        return (self.transfer_syntax,)


@dataclass(frozen=True, eq=False)
class SlideModel:
    slide_id: str
    fingerprint: str
    study_uid: str
    series_uid: str
    instances: tuple[InstanceModel, ...]

    def visible(self, hidden: frozenset[str]) -> tuple[InstanceModel, ...]:
        """The instances a requester may see: label and overview withheld with their
        associated images."""
        if not hidden:
            return self.instances
        return tuple(
            i for i in self.instances if WITHHELD_BY.get(i.kind, "") not in hidden
        )

    def instance(self, uid: str) -> InstanceModel | None:
        return next((i for i in self.instances if i.uid == uid), None)

    @property
    def base(self) -> InstanceModel:
        return self.instances[0]


def redacted(ds: Dataset, hidden: frozenset[str]) -> Dataset:
    """``ds`` without label text and barcode when labels are withheld from the requester."""
    if "label" not in hidden or not any(t in ds for t in _LABEL_TEXT):
        return ds
    out = copy.copy(ds)
    for t in _LABEL_TEXT:
        if t in out:
            out[t].value = ""  # Type 2 in the Slide Label module: present, empty
    return out


# -- UIDs ------------------------------------------------------------------------------
_UID_NAMESPACE = uuid.UUID("6f0b6a4e-4c1e-5d7a-9f4e-77a1d5c3b2e1")


def name_uid(*parts: str) -> str:
    """A ``2.25.<uuid>`` UID (PS3.5 B.2) of a name-based (SHA-1, version 5) UUID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


def derived_uid(entry: SlideEntry, role: str) -> str:
    """A UID from the slide's content identity (id and fingerprint) and the UID's role:
    the same on every replica and after restarts, new when a file of the slide changes."""
    return name_uid(entry.id, entry.fingerprint, role)


def ds_number(value: float) -> DSfloat:
    return DSfloat(value, auto_format=True)


# -- converted slides ------------------------------------------------------------------
def _scan_datetime(props: dict[str, str]) -> datetime | None:
    date, time = props.get("aperio.Date"), props.get("aperio.Time")
    candidates = []
    if date:
        candidates += [(f"{date} {time or '00:00:00'}", fmt)
                       for fmt in ("%m/%d/%y %H:%M:%S", "%m/%d/%Y %H:%M:%S")]
    for key in ("tiff.DateTime", "hamamatsu.Created"):
        if props.get(key):
            candidates += [(props[key], "%Y:%m:%d %H:%M:%S"), (props[key], "%Y/%m/%d")]
    for text, fmt in candidates:
        with contextlib.suppress(ValueError):
            return datetime.strptime(text.strip(), fmt)
    return None


def file_icc_profile(path: Path) -> bytes | None:
    """The ICC profile a slide file embeds (TIFF tag 34675, as OpenSlide reports it)."""
    if not path.is_file():
        return None
    try:
        import openslide

        with openslide.OpenSlide(str(path)) as osr:
            profile = osr.color_profile
            return bytes(profile.tobytes()) if profile is not None else None
    except Exception:
        return None


@functools.cache
def srgb_profile() -> bytes:
    """LittleCMS's sRGB profile with a fixed creation date (ICC header bytes 24-35): the
    same bytes on every replica and after restarts, so instances stay byte-identical."""
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
    return bytes(data)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def optical_path(icc: bytes | None) -> Dataset:
    """The one optical path of a brightfield slide, with the file's ICC profile (sRGB
    when the file has none)."""
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = [
        _code("111744", "DCM", "Brightfield illumination")
    ]
    path.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
    if icc is None:
        path.ICCProfile = srgb_profile()
        path.ColorSpace = "SRGB"
    else:
        path.ICCProfile = icc
    return path


def _base_dataset(entry: SlideEntry, meta: SlideMetadata, icc: bytes | None,
                  scanned: datetime | None) -> Dataset:
    """The attributes every instance of a converted slide shares."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    # Patient: unknown to the server (file names are never used)
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = derived_uid(entry, "study")
    ds.StudyDate = scanned.strftime("%Y%m%d") if scanned else ""
    ds.StudyTime = scanned.strftime("%H%M%S") if scanned else ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = entry.id[:16]
    ds.AccessionNumber = ""
    # General Series, Whole Slide Microscopy Series
    ds.Modality = "SM"
    ds.SeriesInstanceUID = derived_uid(entry, "series")
    ds.SeriesNumber = 1
    # Frame of Reference: shared by every level
    ds.FrameOfReferenceUID = derived_uid(entry, "frame-of-reference")
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    # General and Enhanced General Equipment
    props = meta.properties
    ds.Manufacturer = meta.vendor or "unknown"
    ds.ManufacturerModelName = meta.format or "unknown"
    ds.DeviceSerialNumber = (props.get("aperio.ScanScope ID") or "unknown")[:64]
    ds.SoftwareVersions = f"wsi-server {wsi_server.__version__}"
    # Specimen: the slide itself is the container
    ds.ContainerIdentifier = entry.id
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    specimen = Dataset()
    specimen.SpecimenIdentifier = entry.id
    specimen.SpecimenUID = derived_uid(entry, "specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]
    # Acquisition Context
    ds.AcquisitionContextSequence = []
    # Optical Path
    path = optical_path(icc)
    if meta.objective_power:
        path.ObjectiveLensPower = ds_number(meta.objective_power)
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = [path]
    return ds


def _image_dataset(
    base: Dataset, entry: SlideEntry, *, uid: str, number: int, kind: ImageKind,
    image_type: list[str], size: tuple[int, int], tile: tuple[int, int], photometric: str,
    spacing_mm: tuple[float, float] | None, scanned: datetime | None,
    compression_ratio: float,
) -> Dataset:
    ds = copy.deepcopy(base)
    width, height = size
    ds.SOPInstanceUID = uid
    ds.InstanceNumber = number
    ds.ImageType = image_type
    when = scanned or datetime(1970, 1, 1)
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.Rows = tile[1]
    ds.Columns = tile[0]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = (-(-width // tile[0])) * (-(-height // tile[1]))
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = ds_number(0)
    origin.YOffsetInSlideCoordinateSystem = ds_number(0)
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = [ds_number(v) for v in (0, -1, 0, -1, 0, 0)]
    ds.DimensionOrganizationType = "TILED_FULL"
    dim = Dataset()
    dim.DimensionOrganizationUID = derived_uid(entry, "dimension-organization")
    ds.DimensionOrganizationSequence = [dim]
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    label_like = kind in ("LABEL", "OVERVIEW")
    ds.SpecimenLabelInImage = "YES" if label_like else "NO"
    ds.BurnedInAnnotation = "YES" if label_like else "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = ds_number(round(compression_ratio, 2))
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    if kind == "LABEL":  # Slide Label module: the text is not known to the server
        ds.LabelText = ""
        ds.BarcodeValue = ""
    shared = Dataset()
    frame_type = Dataset()
    frame_type.FrameType = image_type
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    shared.OpticalPathIdentificationSequence = [optical]
    if spacing_mm is not None:
        sx, sy = spacing_mm
        measures = Dataset()
        measures.PixelSpacing = [ds_number(sy), ds_number(sx)]  # row spacing, column spacing
        measures.SliceThickness = ds_number(0.001)
        shared.PixelMeasuresSequence = [measures]
        ds.ImagedVolumeWidth = width * sx
        ds.ImagedVolumeHeight = height * sy
        ds.ImagedVolumeDepth = 0.001
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _level_frames(reader: SlideReader, level: int) -> tuple[FrameSource, str | None, bytes]:
    """Whether a level's stored tiles can be its frames, their photometric, and the first
    stored tile (for the compression ratio)."""
    probe: RawTile | None = None
    if isinstance(reader, StoredTiles):
        probe = reader.read_stored_tile(level, 0, 0)
    if probe is None:
        probe = reader.read_raw_tile(level, 0, 0)
    if probe is None or probe.media_type != "image/jpeg":
        return "rendered", None, b""
    photometric = jpeg_photometric(probe.data)
    if photometric not in ("RGB", "YBR_FULL_422"):  # the values the WSI IOD allows
        return "rendered", None, b""
    return "stored", photometric, probe.data


def _first_frame(reader: SlideReader, level: int, tile: tuple[int, int]) -> bytes:
    """Frame 1 of a level the server encodes (to state its compression ratio)."""
    lv = reader.metadata.levels[level]
    w, h = min(tile[0], lv.width), min(tile[1], lv.height)
    pixels = pad_frame(reader.read_region(level, 0, 0, w, h), tile, reader.metadata.background)
    return encode_frame(pixels, ENCODED_PHOTOMETRIC)


def _ratio(tile: tuple[int, int], frame: bytes) -> float:
    return tile[0] * tile[1] * 3 / max(len(frame), 1)


def build_converted(entry: SlideEntry, reader: SlideReader) -> SlideModel:
    """The DICOM model of a slide in a non-DICOM format (runs in a worker thread)."""
    meta = entry.metadata
    assert meta is not None
    scanned = _scan_datetime(meta.properties)
    base = _base_dataset(entry, meta, file_icc_profile(entry.path), scanned)
    mpp = meta.mpp
    instances: list[InstanceModel] = []
    number = 1
    for level, lv in enumerate(meta.levels):
        source, photometric, first = _level_frames(reader, level)
        tile = lv.tile_size if source == "stored" and lv.tile_size else None
        if tile is None:
            tile = (DEFAULT_FRAME, DEFAULT_FRAME)
            if lv.tile_size and lv.tile_size[0] == lv.tile_size[1] and (
                64 <= lv.tile_size[0] <= 2048
            ):
                tile = lv.tile_size
        photometric = photometric or ENCODED_PHOTOMETRIC
        if source == "rendered":
            first = _first_frame(reader, level, tile)
        spacing = None
        if mpp:
            spacing = (mpp[0] / 1000 * meta.width / lv.width,
                       mpp[1] / 1000 * meta.height / lv.height)
        image_type = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0
                      else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
        uid = derived_uid(entry, f"level:{level}")
        ds = _image_dataset(
            base, entry, uid=uid, number=number, kind="VOLUME", image_type=image_type,
            size=(lv.width, lv.height), tile=tile, photometric=photometric,
            spacing_mm=spacing, scanned=scanned, compression_ratio=_ratio(tile, first),
        )
        instances.append(InstanceModel(
            uid, number, "VOLUME", source, level, None, lv.width, lv.height, tile[0],
            tile[1], JPEG_BASELINE, photometric, ds,
        ))
        number += 1
    for name, kind in ASSOCIATED_KINDS.items():
        if name not in meta.associated:
            continue
        try:
            pixels: np.ndarray = reader.associated_image(name)
        except Exception as exc:
            log.warning("slide %s: associated image %s unreadable: %r", entry.id, name, exc)
            continue
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        if kind == "THUMBNAIL" and mpp:
            spacing = (mpp[0] / 1000 * meta.width / width, mpp[1] / 1000 * meta.height / height)
        else:  # nominal: the overview spans a 76 mm slide, the label its 26 mm width
            nominal = (76.0 / width) if kind == "OVERVIEW" else (26.0 / height)
            spacing = (nominal, nominal)
        image_type = (["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"] if kind == "THUMBNAIL"
                      else ["ORIGINAL", "PRIMARY", kind, "NONE"])
        uid = derived_uid(entry, f"associated:{name}")
        ds = _image_dataset(
            base, entry, uid=uid, number=number, kind=kind, image_type=image_type,
            size=(width, height), tile=(width, height), photometric="YBR_FULL_422",
            spacing_mm=spacing, scanned=scanned,
            compression_ratio=_ratio((width, height), encode_frame(pixels, "YBR_FULL_422")),
        )
        instances.append(InstanceModel(
            uid, number, kind, "associated", -1, name, width, height, width, height,
            JPEG_BASELINE, "YBR_FULL_422", ds,
        ))
        number += 1
    return SlideModel(entry.id, entry.fingerprint, str(base.StudyInstanceUID),
                      str(base.SeriesInstanceUID), tuple(instances))


# -- real DICOM files ----------------------------------------------------------------
def _file_frames(path: Path, ds: Dataset, value_tell: int, count: int,
                 encapsulated: bool) -> FileFrames | None:
    if not encapsulated:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * (
            int(ds.BitsAllocated) // 8)
        return FileFrames(path, tuple(((value_tell + i * size, size),) for i in range(count)),
                          False)
    with open(path, "rb") as f:
        f.seek(value_tell)
        bot = parse_basic_offsets(f)
        n, offsets = parse_fragments(f)
        spans = []
        for off in offsets:
            f.seek(off + 4)
            spans.append((off + 8, struct.unpack("<I", f.read(4))[0]))
    if n == count:
        return FileFrames(path, tuple((s,) for s in spans), True)
    if bot and len(bot) == count and spans:
        first = offsets[0]
        starts = [*bot, offsets[-1] - first + 1]
        frames = tuple(
            tuple(s for o, s in zip(offsets, spans, strict=True)
                  if starts[i] <= o - first < starts[i + 1])
            for i in range(count)
        )
        return FileFrames(path, frames, True)
    return None  # several fragments per frame and no offset table: not supported


def _read_instance(path: Path) -> tuple[Dataset, str, FileFrames] | None:
    ds = pydicom.dcmread(path, defer_size=1024)
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
        return None
    if str(ds.get("DimensionOrganizationType", "TILED_FULL")) != "TILED_FULL":
        return None  # TILED_SPARSE: frames would need their positions; not served
    if int(ds.get("TotalPixelMatrixFocalPlanes", 1)) != 1 or int(
        ds.get("NumberOfOpticalPaths", 1)
    ) != 1:
        return None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    raw = ds._dict.get(_PIXEL_DATA)
    value_tell = getattr(raw, "value_tell", None)
    if value_tell is None:
        return None
    count = int(ds.get("NumberOfFrames", 1))
    encapsulated = pydicom.uid.UID(syntax).is_compressed
    frames = _file_frames(path, ds, value_tell, count, encapsulated)
    if frames is None:
        return None
    for tag in (_PIXEL_DATA, *_DROPPED_FROM_FILES):
        if tag in ds:
            del ds[tag]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    return ds, syntax, frames


def _true_photometric(ds: Dataset, syntax: str, frames: FileFrames) -> str:
    """The Photometric Interpretation the JPEG codestream states (some converters write
    RGB over YCbCr data, or the reverse); the file's value for other syntaxes."""
    stated = str(ds.get("PhotometricInterpretation", ""))
    if syntax not in _JPEG_FAMILY or not frames.frames or not frames.frames[0]:
        return stated
    off, length = frames.frames[0][0]
    fd = os.open(frames.path, os.O_RDONLY)
    try:
        first = trim_jpeg(os.pread(fd, length, off))
    finally:
        os.close(fd)
    found = jpeg_photometric(first)
    if found is None or found == stated or (found.startswith("YBR") and stated.startswith("YBR")):
        return stated
    log.info("%s: Photometric Interpretation %s contradicts the JPEG codestream (%s); "
             "served as the codestream says", frames.path.name, stated, found)
    return found


# Attributes of the VL WSI IOD a real file may lack: added (empty where Type 2, derived or
# "unknown" where Type 1), never replacing what the file has.
_TYPE2_EMPTY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber",
    "PositionReferenceIndicator", "IssuerOfTheContainerIdentifierSequence",
    "ContainerTypeCodeSequence", "AcquisitionContextSequence",
)
_TYPE1_UNKNOWN = ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber",
                  "SoftwareVersions")


def complete(ds: Dataset, entry: SlideEntry) -> None:
    """Add the mandatory attributes a real DICOM file lacks (its own values all stay)."""
    for keyword in _TYPE2_EMPTY:
        if keyword not in ds:
            setattr(ds, keyword, [] if keyword.endswith("Sequence") else "")
    for keyword in _TYPE1_UNKNOWN:
        if not ds.get(keyword):
            setattr(ds, keyword, "unknown")
    if "ContainerIdentifier" not in ds:
        ds.ContainerIdentifier = entry.id
    if "SpecimenDescriptionSequence" not in ds:
        specimen = Dataset()
        specimen.SpecimenIdentifier = entry.id
        specimen.SpecimenUID = derived_uid(entry, "specimen")
        specimen.IssuerOfTheSpecimenIdentifierSequence = []
        specimen.SpecimenPreparationSequence = []
        ds.SpecimenDescriptionSequence = [specimen]
    image_type = [str(v) for v in ds.get("ImageType", [])]
    label_like = "YES" if {"LABEL", "OVERVIEW"} & set(image_type) else "NO"
    defaults: dict[str, Any] = {
        "VolumetricProperties": "VOLUME", "SpecimenLabelInImage": label_like,
        "BurnedInAnnotation": label_like, "FocusMethod": "AUTO",
        "ExtendedDepthOfField": "NO", "NumberOfOpticalPaths": 1,
    }
    if "AcquisitionDateTime" not in ds:
        defaults["AcquisitionDateTime"] = (
            str(ds.get("ContentDate", "19700101")) + str(ds.get("ContentTime", "000000")))
    if "ImagedVolumeWidth" in ds and "ImagedVolumeDepth" not in ds:
        defaults["ImagedVolumeDepth"] = 0.001  # nominal 1 µm: the file does not say
    for keyword, value in defaults.items():
        if keyword not in ds:
            setattr(ds, keyword, value)
    if "OpticalPathSequence" not in ds:
        ds.OpticalPathSequence = [optical_path(None)]
    if "TotalPixelMatrixFocalPlanes" not in ds:
        ds.TotalPixelMatrixFocalPlanes = 1
    if "TotalPixelMatrixOriginSequence" not in ds:
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = ds_number(0)
        origin.YOffsetInSlideCoordinateSystem = ds_number(0)
        ds.TotalPixelMatrixOriginSequence = [origin]
    if "SharedFunctionalGroupsSequence" not in ds:
        ds.SharedFunctionalGroupsSequence = [Dataset()]
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "WholeSlideMicroscopyImageFrameTypeSequence" not in shared and "ImageType" in ds:
        frame_type = Dataset()
        frame_type.FrameType = list(ds.ImageType)
        shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    for measures in shared.get("PixelMeasuresSequence", []):
        if "SliceThickness" not in measures:
            measures.SliceThickness = ds_number(0.001)  # nominal, as ImagedVolumeDepth


def build_dicom(entry: SlideEntry) -> SlideModel | None:
    """The model of a DICOM-WSI folder: its own instances of its (largest) series."""
    files = sorted(p for p in entry.path.iterdir() if p.suffix.lower() == ".dcm") if (
        entry.path.is_dir()) else [entry.path]
    found: list[tuple[Dataset, str, FileFrames]] = []
    for path in files:
        try:
            got = _read_instance(path)
        except Exception as exc:
            log.warning("slide %s: %s unreadable as DICOM: %r", entry.id, path.name, exc)
            continue
        if got is not None:
            found.append(got)
    volumes = [f for f in found if "VOLUME" in list(f[0].get("ImageType", []))]
    if not volumes:
        return None
    base = max(volumes, key=lambda f: int(f[0].TotalPixelMatrixColumns))[0]
    study, series = str(base.StudyInstanceUID), str(base.SeriesInstanceUID)
    meta = entry.metadata
    levels = {(lv.width, lv.height): i for i, lv in enumerate(meta.levels)} if meta else {}
    instances: list[InstanceModel] = []
    order = {"VOLUME": 0, "LABEL": 1, "OVERVIEW": 2, "THUMBNAIL": 3}
    for ds, syntax, frames in found:
        if str(ds.SeriesInstanceUID) != series:
            continue
        image_type = [str(v) for v in ds.get("ImageType", [])]
        kind: Any = next((t for t in order if t in image_type), None)
        if kind is None:
            continue
        width = int(ds.get("TotalPixelMatrixColumns", ds.Columns))
        height = int(ds.get("TotalPixelMatrixRows", ds.Rows))
        complete(ds, entry)
        photometric = _true_photometric(ds, syntax, frames)
        if photometric != ds.get("PhotometricInterpretation"):
            ds.PhotometricInterpretation = photometric
        instances.append(InstanceModel(
            str(ds.SOPInstanceUID), int(ds.get("InstanceNumber", 0) or 0), kind, "file",
            levels.get((width, height), -1) if kind == "VOLUME" else -1, None, width,
            height, int(ds.Columns), int(ds.Rows), syntax, photometric, ds, frames,
        ))
    instances.sort(key=lambda i: (order[i.kind], -i.width))
    return SlideModel(entry.id, entry.fingerprint, study, series, tuple(instances))


def build_model(entry: SlideEntry, reader: SlideReader) -> SlideModel | None:
    """The DICOM model of any slide (runs in a worker thread)."""
    if entry.metadata is not None and entry.metadata.format == "dicom":
        return build_dicom(entry)
    return build_converted(entry, reader)
