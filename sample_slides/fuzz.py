"""A deterministic corpus of damaged slides, for the robustness tests (``tests/test_fuzz.py``).

``write_corpus(out, seeds, count, seed)`` copies each seed slide (a file, a DICOM folder
or a zarr store) many times, each copy damaged in one way chosen by a seeded generator, so
the same arguments always give the same bytes:

- ``bitflip``: a few random bits flipped, mostly in the first 64 kB (headers, IFDs);
- ``header``: the file header, or one IFD (TIFF) / the file meta (DICOM), overwritten with
  random bytes;
- ``chunk``: a random run of bytes anywhere overwritten;
- ``truncate``: the file cut short;
- ``swap_ifd``: two IFD offsets swapped (the header's first-IFD pointer, or two next-IFD
  pointers, or a next-IFD pointer looping back);
- ``huge_dims``: the declared width and height (ImageWidth/ImageLength; DICOM Rows,
  Columns and TotalPixelMatrix*; a zarr level's shape) set to huge or zero values;
- ``tile_offsets``: tile or strip offsets and byte counts (TIFF), fragment lengths (DICOM)
  or shard index entries (zarr, with a valid checksum) pointing past the end of the file;
- zarr only: ``json`` (a ``zarr.json`` damaged) and ``shard`` (a shard or associated
  image damaged or removed).

Families: ``svs``, ``ndpi``, ``tiff``, ``dicom`` (a folder whose undamaged instances are
symbolic links to the seed's) and ``zarr`` (a ``.zarr`` folder).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Rng = np.random.Generator
FILE_MUTATIONS = ("bitflip", "header", "chunk", "truncate", "swap_ifd", "huge_dims",
                  "tile_offsets")
DICOM_MUTATIONS = ("bitflip", "header", "chunk", "truncate", "huge_dims", "tile_offsets")
ZARR_MUTATIONS = ("json", "huge_dims", "tile_offsets", "shard", "bitflip", "truncate")
_SUFFIX = {"svs": ".svs", "ndpi": ".ndpi", "tiff": ".tiff"}
_HUGE = (0, 1, 2**16 - 1, 2**31 - 1, 2**32 - 1, 10**6, 3 * 10**5)


@dataclass(frozen=True)
class Seed:
    """A good slide to damage: its family and where it is."""

    family: str
    path: Path


@dataclass(frozen=True)
class FuzzCase:
    path: Path
    family: str
    seed: str
    mutation: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path.name, "family": self.family, "seed": self.seed,
                "mutation": self.mutation}


# -- byte-level damage ---------------------------------------------------------------
def _random_bytes(rng: Rng, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def bitflip(data: bytearray, rng: Rng) -> None:
    for _ in range(int(rng.integers(1, 48))):
        head = rng.random() < 0.7
        limit = min(len(data), 65536) if head else len(data)
        i = int(rng.integers(0, max(limit, 1)))
        if i < len(data):
            data[i] ^= 1 << int(rng.integers(0, 8))


def chunk(data: bytearray, rng: Rng) -> None:
    n = int(rng.integers(16, 8192))
    at = int(rng.integers(0, max(len(data) - n, 1)))
    data[at:at + n] = _random_bytes(rng, min(n, len(data) - at))


def truncate(data: bytearray, rng: Rng) -> None:
    # half the cuts in the first 10% (headers, first IFDs), half anywhere
    frac = rng.random() * (0.1 if rng.random() < 0.5 else 1.0)
    del data[int(len(data) * frac):]


# -- TIFF structure --------------------------------------------------------------------
@dataclass(frozen=True)
class _Tag:
    code: int
    dtype: int
    count: int
    valueoffset: int


@dataclass(frozen=True)
class _Ifd:
    offset: int
    tags: tuple[_Tag, ...]
    next_pointer: int
    """File position of this IFD's next-IFD pointer."""


@dataclass(frozen=True)
class _TiffLayout:
    byteorder: str
    offsetsize: int
    first_pointer: int
    ifds: tuple[_Ifd, ...]


def _tiff_layout(path: Path) -> _TiffLayout | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            t = tif.tiff
            ifds = []
            with open(path, "rb") as fh:
                for page in tif.pages:
                    fh.seek(page.offset)
                    raw = fh.read(t.tagnosize)
                    (n,) = struct.unpack(tif.byteorder + t.tagnoformat, raw)
                    tags = tuple(
                        _Tag(int(tag.code), int(tag.dtype), int(tag.count), int(tag.valueoffset))
                        for tag in page.tags.values()  # type: ignore[union-attr]
                    )
                    ifds.append(_Ifd(int(page.offset), tags,
                                     int(page.offset) + t.tagnosize + n * t.tagsize))
            # NDPI: 8-byte offsets only in tifffile's view; its IFD pointers are 4 bytes
            offsetsize = 8 if tif.is_bigtiff else 4
            return _TiffLayout(tif.byteorder, offsetsize, 8 if tif.is_bigtiff else 4,
                               tuple(ifds))
    except Exception:
        return None


_FORMATS = {3: "H", 4: "L", 8: "h", 9: "l", 16: "Q", 17: "q", 13: "L", 18: "Q"}


def _put(data: bytearray, at: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if at >= 0 and at + size <= len(data):
        bits = size * 8
        struct.pack_into(fmt, data, at, value % (1 << bits))


def _write_tag(data: bytearray, lay: _TiffLayout, tag: _Tag, values: list[int]) -> None:
    code = _FORMATS.get(tag.dtype)
    if code is None:
        return
    size = struct.calcsize(code)
    for i, v in enumerate(values[: tag.count]):
        _put(data, tag.valueoffset + i * size, lay.byteorder + code, v)


def swap_ifd(data: bytearray, rng: Rng, lay: _TiffLayout) -> None:
    ptr = lay.byteorder + ("Q" if lay.offsetsize == 8 else "L")
    ifds = lay.ifds
    how = int(rng.integers(0, 3)) if len(ifds) > 1 else 2
    if how == 0:  # the file starts at another IFD
        _put(data, lay.first_pointer, ptr, ifds[int(rng.integers(1, len(ifds)))].offset)
    elif how == 1:  # two next-IFD pointers swapped
        a, b = (int(i) for i in rng.choice(len(ifds), 2, replace=False))
        pa = struct.unpack_from(ptr, data, ifds[a].next_pointer)[0]
        pb = struct.unpack_from(ptr, data, ifds[b].next_pointer)[0]
        _put(data, ifds[a].next_pointer, ptr, pb)
        _put(data, ifds[b].next_pointer, ptr, pa)
    else:  # a loop: an IFD's next pointer back to an earlier (or the same) IFD
        k = int(rng.integers(0, len(ifds)))
        _put(data, ifds[k].next_pointer, ptr, ifds[int(rng.integers(0, k + 1))].offset)


def huge_dims(data: bytearray, rng: Rng, lay: _TiffLayout) -> None:
    ifd = lay.ifds[int(rng.integers(0, len(lay.ifds)))]
    for tag in ifd.tags:
        if tag.code in (256, 257) and rng.random() < 0.8:  # ImageWidth, ImageLength
            _write_tag(data, lay, tag, [int(rng.choice(_HUGE))])
        elif tag.code in (322, 323) and rng.random() < 0.3:  # TileWidth, TileLength
            _write_tag(data, lay, tag, [int(rng.choice((0, 1, 16, 2**16 - 1)))])


def tile_offsets(data: bytearray, rng: Rng, lay: _TiffLayout) -> None:
    ifd = lay.ifds[int(rng.integers(0, len(lay.ifds)))]
    size = len(data)
    for tag in ifd.tags:
        if tag.code in (324, 273):  # TileOffsets, StripOffsets
            values = [size + int(rng.integers(0, 2**20)) if rng.random() < 0.3 else -1
                      for _ in range(tag.count)]
            _patch(data, lay, tag, values)
        elif tag.code in (325, 279) and rng.random() < 0.5:  # byte counts
            values = [int(rng.choice((0, 2**31 - 1, 2**32 - 1, size))) if rng.random() < 0.3
                      else -1 for _ in range(tag.count)]
            _patch(data, lay, tag, values)


def _patch(data: bytearray, lay: _TiffLayout, tag: _Tag, values: list[int]) -> None:
    """Write the values of ``values`` that are not -1 (keep the others)."""
    code = _FORMATS.get(tag.dtype)
    if code is None:
        return
    size = struct.calcsize(code)
    for i, v in enumerate(values):
        if v >= 0:
            _put(data, tag.valueoffset + i * size, lay.byteorder + code, v)


def overwrite_header(data: bytearray, rng: Rng, lay: _TiffLayout | None) -> None:
    if lay is not None and rng.random() < 0.6:
        ifd = lay.ifds[int(rng.integers(0, len(lay.ifds)))]
        n = ifd.next_pointer - ifd.offset
        start = ifd.offset + int(rng.integers(0, max(n // 2, 1)))
        length = int(rng.integers(4, max(n, 5)))
    else:
        start, length = 0, int(rng.integers(2, 64))
    end = min(start + length, len(data))
    data[start:end] = _random_bytes(rng, end - start)


def damage_tiff(src: Path, dest: Path, mutation: str, rng: Rng) -> None:
    data = bytearray(src.read_bytes())
    lay = _tiff_layout(src) if mutation in ("header", "swap_ifd", "huge_dims",
                                            "tile_offsets") else None
    if mutation == "bitflip":
        bitflip(data, rng)
    elif mutation == "chunk":
        chunk(data, rng)
    elif mutation == "truncate":
        truncate(data, rng)
    elif mutation == "header":
        overwrite_header(data, rng, lay)
    elif lay is None:
        chunk(data, rng)
    elif mutation == "swap_ifd":
        swap_ifd(data, rng, lay)
    elif mutation == "huge_dims":
        huge_dims(data, rng, lay)
    elif mutation == "tile_offsets":
        tile_offsets(data, rng, lay)
    dest.write_bytes(bytes(data))


# -- DICOM -------------------------------------------------------------------------------
_ITEM = b"\xfe\xff\x00\xe0"


def damage_dicom_file(src: Path, dest: Path, mutation: str, rng: Rng) -> None:
    if mutation == "huge_dims":
        import pydicom

        ds = pydicom.dcmread(src)
        for name, top in (("Rows", 2**16 - 1), ("Columns", 2**16 - 1),
                          ("TotalPixelMatrixColumns", 2**32 - 1),
                          ("TotalPixelMatrixRows", 2**32 - 1)):
            if name in ds and rng.random() < 0.6:
                setattr(ds, name, int(rng.choice([v for v in _HUGE if v <= top])))
        if rng.random() < 0.3:
            ds.NumberOfFrames = int(rng.choice((0, 1, 10**6)))
        ds.save_as(dest)
        return
    data = bytearray(src.read_bytes())
    if mutation == "bitflip":
        bitflip(data, rng)
    elif mutation == "chunk":
        chunk(data, rng)
    elif mutation == "truncate":
        truncate(data, rng)
    elif mutation == "header":  # preamble, DICM and the file meta group
        start = int(rng.integers(100, 300))
        length = int(rng.integers(4, 200))
        data[start:start + length] = _random_bytes(rng, len(data[start:start + length]))
    elif mutation == "tile_offsets":  # fragment lengths past the end of the file
        items = [i for i in range(len(data) - 8) if data[i:i + 4] == _ITEM][:4096]
        for i in items:
            if rng.random() < 0.3:
                struct.pack_into("<L", data, i + 4,
                                 int(rng.choice((len(data), 2**31 - 1, 0xFFFFFFF0))))
    dest.write_bytes(bytes(data))


def damage_dicom(src: Path, dest: Path, mutation: str, rng: Rng) -> None:
    """A DICOM folder: one instance damaged, the others linked to the seed's."""
    dest.mkdir()
    instances = sorted(p for p in src.iterdir() if p.suffix.lower() == ".dcm")
    victim = instances[int(rng.integers(0, len(instances)))]
    for inst in instances:
        if inst == victim:
            damage_dicom_file(inst, dest / inst.name, mutation, rng)
        else:
            (dest / inst.name).symlink_to(inst.resolve())


# -- zarr ----------------------------------------------------------------------------------
def damage_zarr(src: Path, dest: Path, mutation: str, rng: Rng) -> None:
    shutil.copytree(src, dest)
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    jsons = [p for p in files if p.name == "zarr.json"]
    shards = [p for p in files if p.name != "zarr.json" and "associated" not in p.parts]
    assoc = [p for p in files if p.name != "zarr.json" and "associated" in p.parts]
    pick: Callable[[list[Path]], Path] = lambda ps: ps[int(rng.integers(0, len(ps)))]  # noqa: E731
    if mutation == "json":
        target = pick(jsons)
        data = bytearray(target.read_bytes())
        [bitflip, chunk, truncate][int(rng.integers(0, 3))](data, rng)
        target.write_bytes(bytes(data))
    elif mutation == "huge_dims":
        target = pick([p for p in jsons if p.parent != dest] or jsons)
        meta = json.loads(target.read_text())
        if "shape" in meta:
            h, w = (int(rng.choice(_HUGE)) for _ in range(2))
            meta["shape"] = [h, w, *meta["shape"][2:]]
            if rng.random() < 0.3:
                meta["chunk_grid"]["configuration"]["chunk_shape"] = [0, 0, 3]
        else:
            attrs = meta.get("attributes", {}).get("wsi_server", {})
            attrs["level_count"] = int(rng.choice((0, 99, 10**6)))
        target.write_text(json.dumps(meta))
    elif mutation == "tile_offsets":
        import google_crc32c

        target = pick(shards)
        data = bytearray(target.read_bytes())
        level = json.loads((target.parents[3] / "zarr.json").read_text())
        cfg = level["codecs"][0]["configuration"]
        s = level["chunk_grid"]["configuration"]["chunk_shape"][0] // cfg["chunk_shape"][0]
        n = s * s * 16
        index = np.frombuffer(bytes(data[:n]), "<u8").reshape(-1, 2).copy()
        for row in index:
            if rng.random() < 0.5:
                if rng.random() < 0.5:
                    row[0] = len(data) + int(rng.integers(0, 2**20))
                else:
                    row[1] = int(rng.choice((2**31, 2**40, 2**63 - 1, len(data) * 2)))
        encoded = index.astype("<u8").tobytes()
        data[:n + 4] = encoded + google_crc32c.value(encoded).to_bytes(4, "little")
        target.write_bytes(bytes(data))
    elif mutation == "shard":
        target = pick(assoc if assoc and rng.random() < 0.4 else shards)
        if rng.random() < 0.2:
            target.unlink()
        else:
            data = bytearray(target.read_bytes())
            # damage the chunks, not the checksummed index (that is "bitflip")
            skip = min(len(data) // 2, 4096)
            body = bytearray(data[skip:])
            chunk(body, rng)
            target.write_bytes(bytes(data[:skip] + body))
    else:
        target = pick(shards + assoc)
        data = bytearray(target.read_bytes())
        (bitflip if mutation == "bitflip" else truncate)(data, rng)
        target.write_bytes(bytes(data))


# -- the corpus ------------------------------------------------------------------------------
def mutations_of(family: str) -> tuple[str, ...]:
    if family == "dicom":
        return DICOM_MUTATIONS
    if family == "zarr":
        return ZARR_MUTATIONS
    return FILE_MUTATIONS


def write_corpus(
    out: Path, seeds: Mapping[str, Seed], per_seed: int | Mapping[str, int], seed: int = 0
) -> list[FuzzCase]:
    """``per_seed`` damaged copies of each seed slide in ``out`` (one folder per family),
    mutations in turn, their details drawn from a generator seeded by ``seed``, the seed's
    name and the copy's number: the same arguments always give the same corpus."""
    cases: list[FuzzCase] = []
    for name in sorted(seeds):
        s = seeds[name]
        n = per_seed if isinstance(per_seed, int) else per_seed[name]
        folder = out / s.family
        folder.mkdir(parents=True, exist_ok=True)
        kinds = mutations_of(s.family)
        for i in range(n):
            mutation = kinds[i % len(kinds)]
            key = [seed, i, *name.encode()]
            rng = np.random.default_rng(key)
            stem = f"{name}-{i:03d}-{mutation}"
            if s.family == "dicom":
                dest = folder / stem
                damage_dicom(s.path, dest, mutation, rng)
            elif s.family == "zarr":
                dest = folder / f"{stem}.zarr"
                damage_zarr(s.path, dest, mutation, rng)
            else:
                dest = folder / f"{stem}{_SUFFIX[s.family]}"
                damage_tiff(s.path, dest, mutation, rng)
            cases.append(FuzzCase(dest, s.family, name, mutation))
    return cases


def synthetic_seeds(work: Path) -> dict[str, Seed]:
    """Small synthetic seed slides: SVS-like with associated images, a generic zlib TIFF,
    and a zarr store converted from the SVS (``wsi_server.convert``)."""
    from sample_slides.generate import write_generic_tiff, write_svs_like
    from wsi_server.convert import ConvertOptions, convert_slide

    work.mkdir(parents=True, exist_ok=True)
    svs = write_svs_like(work / "synthetic.svs", 1100, 800, tile=256, downsamples=(1, 4))
    tiff = write_generic_tiff(work / "synthetic.tiff", 700, 500, tile=128, downsamples=(1, 2),
                              compression="zlib", photometric="rgb")
    zarr = work / "synthetic.zarr"
    if not zarr.exists():
        convert_slide(svs, zarr, ConvertOptions())
    return {
        "synth-svs": Seed("svs", svs),
        "synth-tiff": Seed("tiff", tiff),
        "synth-zarr": Seed("zarr", zarr),
    }
