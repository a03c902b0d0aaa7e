"""IIIF Image API 3.0 requests without any file: the grammar, the region and size arithmetic
against the Image API's reference implementation (the ``iiif`` package, its
``IIIFRequest`` parser and ``IIIFManipulator`` computations), the tile requests of the
Implementation Notes' algorithm against the native Deep Zoom grid at every scale factor
(odd sizes, 1-px slivers, 1×N and 100 000-px-wide slides), the read plan of a rendered
image, and the JSON documents.

Where this server differs from the reference implementation on purpose, the tests say so:
``square`` is centred on whole pixels (the reference offsets by half a pixel), a region
entirely outside the image is 400 (the reference returns a negative width), ``max`` under a
``maxArea`` rounds down as the Implementation Notes do (the reference rounds, and can
exceed the area), and ``^max`` upscales to the limits as §4.2 says (the reference never
upscales ``max``).
"""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction
from typing import Any

import pytest
from iiif.error import IIIFError
from iiif.manipulator import IIIFManipulator
from iiif.request import IIIFRequest

from wsi_server.errors import BadRequest
from wsi_server.geometry import GeometryParams, Pyramid, deep_zoom, level_downsamples
from wsi_server.iiif.documents import (
    EXTRA_FEATURES,
    IMAGE_CONTEXT,
    ImageService,
    SlideFacts,
    info_json,
    json_media_type,
    manifest,
    public_base,
)
from wsi_server.iiif.request import (
    Limits,
    Rotation,
    canonical,
    constrain,
    native_tile,
    parse_image_request,
    parse_region,
    parse_rotation,
    parse_size,
    preferred_sizes,
    resolve,
    resolve_region,
    resolve_tile_form,
    scale_factors,
    tile_request,
    upscaled_max,
)
from wsi_server.tiles import plan_read

UNLIMITED = Limits(10**9, 10**9, 10**18)
LIMITS = Limits(10_000, 10_000, 25_000_000)


# -- the reference implementation ------------------------------------------------------------
def reference(path: str, width: int, height: int) -> tuple[tuple[int, int, int, int],
                                                          tuple[int, int]]:
    """(region x, y, w, h) and (width, height) by the ``iiif`` reference implementation
    for ``region/size/rotation/quality.format`` on a ``width`` × ``height`` image."""
    req = IIIFRequest(api_version="3.0", identifier="id")
    req.parse_url(path)
    m = IIIFManipulator(api_version="3.0")
    m.request = req
    m.width, m.height = width, height
    x, y, w, h = m.region_to_apply()
    if x is None:
        x, y, w, h = 0, 0, width, height
    m.width, m.height = w, h
    sw, sh = m.size_to_apply()
    return (int(x), int(y), int(w), int(h)), (w, h) if sw is None else (sw, sh)


def ours(path: str, width: int, height: int, limits: Limits = UNLIMITED
         ) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    region, size, rotation, qf = path.split("/")
    resolved = resolve(parse_image_request(region, size, rotation, qf), (width, height), limits)
    return resolved.l0_region, resolved.out_size


def exact_tie(value: Fraction) -> bool:
    return (value - math.floor(value)) == Fraction(1, 2)


def size_tie(size: str, rw: int, rh: int) -> bool:
    """True when the size's exact value before rounding ends in .5: the reference computes
    it in floats, which round such values either way."""
    body = size.lstrip("^")
    if body.startswith("pct:"):
        pct = Fraction(body[4:])
        return exact_tie(rw * pct / 100) or exact_tie(rh * pct / 100)
    if body == "max":
        return False
    confined = body.startswith("!")
    w_text, _, h_text = body.lstrip("!").partition(",")
    if confined:
        scale = min(Fraction(int(w_text), rw), Fraction(int(h_text), rh))
        return exact_tie(rw * scale) or exact_tie(rh * scale)
    if w_text and not h_text:
        return exact_tie(Fraction(rh * int(w_text), rw))
    if h_text and not w_text:
        return exact_tie(Fraction(rw * int(h_text), rh))
    return False


SHAPES = [(1000, 1000), (1001, 517), (517, 1001), (3000, 2100), (1, 100_000), (100_000, 1),
          (100_003, 79_999), (7, 3), (256, 257)]


# -- grammar -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "full", "square", "0,0,1,1", "10,20,30,40", "pct:0,0,100,100", "pct:41.6,7.5,40,70",
    "pct:.5,0.25,99.999,1",
])
def test_valid_regions_parse(text: str) -> None:
    parse_region(text)


@pytest.mark.parametrize("text", [
    "", "ful", "FULL", "0,0,0,10", "0,0,10,0", "-1,0,10,10", "0,0,10", "0,0,10,10,10",
    "1.5,0,10,10", "+1,0,10,10", "1e3,0,10,10", "pct:0,0,0,10", "pct:-1,0,10,10",
    "pct:1e2,0,10,10", "pct:0,0,10", "pct:nan,0,1,1", "pct:inf,0,1,1", "0x10,0,1,1",
    "1_000,0,1,1", " 1,0,1,1", "99999999999,0,1,1", "pct:" + "1" * 70 + ",0,1,1",
    "1,2,3,4%2F",
])
def test_malformed_regions_are_400(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_region(text)


@pytest.mark.parametrize("text", [
    "max", "^max", "100,", ",100", "100,50", "!100,50", "pct:50", "pct:12.5", "^100,",
    "^,100", "^100,50", "^!100,50", "^pct:150",
])
def test_valid_sizes_parse(text: str) -> None:
    parse_size(text)


@pytest.mark.parametrize("text", [
    "", "full", "^full", "min", ",", "0,", ",0", "0,10", "10,0", "!10,", "!,10", "!0,10",
    "pct:0", "pct:", "pct:-5", "pct:1e2", "-10,", "10,10,10", "^^max", "!^10,10", "1.5,",
    "pct:" + "9" * 70, "10 ,", "^", "!",
])
def test_malformed_sizes_are_400(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_size(text)


@pytest.mark.parametrize(("text", "degrees", "mirror", "canonical"), [
    ("0", 0, False, "0"), ("90", 90, False, "90"), ("!180", 180, True, "!180"),
    ("360", 0, False, "0"), ("22.5", Fraction(45, 2), False, "22.5"),
    ("!0.50", Fraction(1, 2), True, "!0.5"), ("090", 90, False, "90"),
])
def test_rotations(text: str, degrees: Fraction, mirror: bool, canonical: str) -> None:
    rot = parse_rotation(text)
    assert (rot.degrees, rot.mirror, rot.canonical()) == (degrees, mirror, canonical)


@pytest.mark.parametrize("text", ["", "-90", "360.5", "400", "!!90", "90!", "1e2", "nan",
                                  "+90", "ninety", "9" * 70])
def test_malformed_rotations_are_400(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_rotation(text)


@pytest.mark.parametrize("text", ["default.gif", "default.tif", "default.jp2",
                                  "default.pdf", "default", "grey.jpg", "native.jpg",
                                  "default.JPG", ".jpg", "default.", "color.jpg.png"])
def test_unknown_qualities_and_formats_are_400(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_image_request("full", "max", "0", text)


def test_quarter_turns() -> None:
    assert Rotation(Fraction(270)).quarter_turns == 3
    assert Rotation(Fraction(45)).quarter_turns is None
    assert Rotation(Fraction(0), mirror=True).is_identity is False


# -- region and size against the reference implementation ----------------------------------
def random_region(rng: random.Random, width: int, height: int) -> str:
    kind = rng.choice(["full", "square", "px", "px", "pct", "pct"])
    if kind in ("full", "square"):
        return kind
    if kind == "px":
        x, y = rng.randrange(width), rng.randrange(height)
        return f"{x},{y},{rng.randint(1, width)},{rng.randint(1, height)}"
    values = [rng.choice([rng.randint(0, 99), round(rng.uniform(0, 99), rng.randint(1, 3))])
              for _ in range(2)]
    values += [rng.choice([rng.randint(1, 100), round(rng.uniform(0.5, 100), 2)])
               for _ in range(2)]
    return "pct:" + ",".join(str(v) for v in values)


def random_size(rng: random.Random, rw: int, rh: int) -> str:
    up = rng.choice(["", "", "^"])
    kind = rng.choice(["max", "w", "h", "wh", "confined", "pct"])
    top = 2 if up else 1
    w, h = rng.randint(1, max(1, rw * top)), rng.randint(1, max(1, rh * top))
    return up + {"max": "max", "w": f"{w},", "h": f",{h}", "wh": f"{w},{h}",
                 "confined": f"!{w},{h}",
                 "pct": f"pct:{rng.choice([rng.randint(1, 100 * top), 12.5, 33.3])}"}[kind]


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_region_and_size_agree_with_the_reference_implementation(width: int, height: int
                                                                  ) -> None:
    rng = random.Random(width * 7 + height)
    compared = 0
    for _ in range(400):
        region = random_region(rng, width, height)
        if region == "square":
            continue  # compared below: the reference offsets by half a pixel
        try:
            _, _, w, h = resolve_region(parse_region(region), (width, height))
        except BadRequest:
            with pytest.raises(IIIFError):
                reference(f"{region}/max/0/default.jpg", width, height)
            continue
        if region.startswith("pct:"):
            values = [Fraction(v) for v in region[4:].split(",")]
            dims = (width, height, width, height)
            if any(exact_tie(v * d / 100) for v, d in zip(values, dims, strict=True)):
                continue  # rounding of a .5 is implementation dependent (floats there)
        size = random_size(rng, w, h)
        if size_tie(size, w, h):
            continue
        path = f"{region}/{size}/0/default.jpg"
        try:
            mine = ours(path, width, height)
        except BadRequest:
            with pytest.raises(IIIFError) as err:
                reference(path, width, height)
            assert err.value.code == 400, path
            continue
        if size.endswith("^max"):
            assert mine[1] == upscaled_max((w, h), UNLIMITED), path
            continue  # the reference never upscales max
        assert mine == reference(path, width, height), path
        compared += 1
    assert compared > 150


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_the_tile_form_shortcut_is_resolve(width: int, height: int) -> None:
    """``resolve_tile_form`` (``x,y,w,h`` and ``w,h`` in one pass) answers exactly what
    ``resolve`` does, and None exactly where ``resolve`` refuses."""
    rng = random.Random(width + 3 * height)
    answered = 0
    for _ in range(2000):
        x, y = rng.randint(0, width + 2), rng.randint(0, height + 2)
        w, h = rng.randint(0, width + 2), rng.randint(0, height + 2)
        ow, oh = rng.randint(0, min(w, 11_000) + 2), rng.randint(0, min(h, 11_000) + 2)
        region, size = f"{x},{y},{w},{h}", f"{ow},{oh}"
        fast = resolve_tile_form(region, size, (width, height), LIMITS)
        try:
            slow = resolve(parse_image_request(region, size, "0", "default.jpg"),
                           (width, height), LIMITS)
        except BadRequest:
            assert fast is None, (region, size)
            continue
        assert fast == (slow.l0_region, slow.out_size), (region, size)
        assert canonical(*fast, (width, height), LIMITS, "0/default.jpg") == \
            slow.canonical((width, height), LIMITS)
        answered += 1
    assert answered > 30
    for other in [("full", "10,10"), ("pct:1,1,1,1", "1,1"), ("0,0,10,10", "10,"),
                  ("0,0,10,10", "^10,10"), ("0,0,10,10", "!10,10"), ("0,0,10,10", "max")]:
        assert resolve_tile_form(*other, (width, height), LIMITS) is None


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_square_is_centred_on_whole_pixels(width: int, height: int) -> None:
    (x, y, w, h), _ = ours("square/max/0/default.jpg", width, height)
    (rx, ry, _, _), _ = reference("square/max/0/default.jpg", width, height)
    assert w == h == min(width, height)
    assert (x, y) == (int(rx), int(ry))
    assert abs((width - w) - 2 * x) <= 1 and abs((height - h) - 2 * y) <= 1


@pytest.mark.parametrize(("path", "why"), [
    ("1000,0,10,10/max/0/default.jpg", "outside"),
    ("0,1000,10,10/max/0/default.jpg", "outside"),
    ("pct:100,0,10,10/max/0/default.jpg", "outside"),
    ("pct:0,0,0.01,10/max/0/default.jpg", "less than one pixel"),
    ("full/1001,/0/default.jpg", "upscaling needs the ^"),
    ("full/,1001/0/default.jpg", "upscaling needs the ^"),
    ("full/pct:100.1/0/default.jpg", "upscaling needs the ^"),
    ("full/!2000,3000/0/default.jpg", "upscaling needs the ^"),
    ("full/1000,1001/0/default.jpg", "upscaling needs the ^"),
    ("full/pct:0.01/0/default.jpg", "less than one pixel"),
    ("0,0,1000,1/400,/0/default.jpg", "less than one pixel"),
    ("full/^10001,/0/default.jpg", "over the server's limits"),
    ("full/^pct:1000000/0/default.jpg", "over the server's limits"),
    ("full/^5001,5001/0/default.jpg", "over the server's limits"),
])
def test_out_of_range_requests_are_400(path: str, why: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(why)):
        ours(path, 1000, 1000, LIMITS)


def test_regions_past_the_edge_are_cropped() -> None:
    assert ours("900,950,500,500/max/0/default.jpg", 1000, 1000) == ((900, 950, 100, 50),
                                                                      (100, 50))
    assert ours("pct:41.6,7.5,66.6,100/max/0/default.jpg", 300, 200)[0] == (125, 15, 175, 185)


def implementation_note_max(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """Implementation Notes §4, as printed there."""
    w, h = width, height
    if limits.max_area and limits.max_area < (w * h):
        scale = (float(limits.max_area) / float(w * h)) ** 0.5
        w = int(w * scale)
        h = int(h * scale)
    if limits.max_width:
        if limits.max_width < w:
            w = limits.max_width
            h = int(float(height * limits.max_width) / float(width) + 0.5)
        if limits.max_height < h:
            h = limits.max_height
            w = int(float(width * limits.max_height) / float(height) + 0.5)
    return w, h


@pytest.mark.parametrize(("width", "height"), [*SHAPES, (24000, 18000), (200_000, 90_000),
                                               (11_000, 3), (3, 11_000)])
def test_max_is_constrained_as_the_implementation_notes_say(width: int, height: int) -> None:
    for limits in (LIMITS, Limits(2048, 2048, 2048 * 2048), Limits(10_000, 5_000, 10**7)):
        w, h = constrain((width, height), limits)
        assert (w, h) == tuple(max(v, 1) for v in implementation_note_max(width, height,
                                                                           limits))
        assert limits.allow((w, h))
        if limits.allow((width, height)):
            assert (w, h) == (width, height)
        up_w, up_h = upscaled_max((width, height), limits)
        assert limits.allow((up_w, up_h)) and up_w >= w and up_h >= h
        # ^max reaches a limit, give or take the pixel the area's rounding down takes
        assert not limits.allow((up_w + 2, round((up_w + 2) * height / width))) or \
            up_h >= limits.max_height - 1


def test_max_and_caret_max_on_the_validator_image() -> None:
    assert ours("full/max/0/default.jpg", 1000, 1000, LIMITS)[1] == (1000, 1000)
    assert ours("full/^max/0/default.jpg", 1000, 1000, LIMITS)[1] == (5000, 5000)
    assert ours("full/max/0/default.jpg", 24000, 18000, LIMITS)[1] == (5773, 4330)


@pytest.mark.parametrize(("size", "expected"), [
    ("^1500,", (1500, 1500)), ("^,1500", (1500, 1500)), ("^1500,1200", (1500, 1200)),
    ("^pct:200", (2000, 2000)), ("^!2000,500", (500, 500)), ("^!2000,3000", (2000, 2000)),
    ("!600,400", (400, 400)), ("pct:33.3", (333, 333)), ("500,", (500, 500)),
])
def test_sizes_of_the_validator_image(size: str, expected: tuple[int, int]) -> None:
    assert ours(f"full/{size}/0/default.jpg", 1000, 1000, LIMITS)[1] == expected


def test_canonical_forms() -> None:
    def canonical(path: str, width: int = 1000, height: int = 800) -> str:
        region, size, rotation, qf = path.split("/")
        return resolve(parse_image_request(region, size, rotation, qf), (width, height),
                       LIMITS).canonical((width, height), LIMITS)

    assert canonical("full/max/0/default.jpg") == "full/max/0/default.jpg"
    assert canonical("0,0,1000,800/1000,/360/default.jpg") == "full/max/0/default.jpg"
    assert canonical("pct:10,10,50,50/250,/!90.0/gray.png") == "100,80,500,400/250,200/!90/gray.png"
    assert canonical("full/^2000,/22.50/color.webp") == "full/^2000,1600/22.5/color.webp"
    assert canonical("full/^max/0/bitonal.jpg") == "full/^max/0/bitonal.jpg"
    assert canonical("square/!100,100/0/default.jpg") == "100,0,800,800/100,100/0/default.jpg"


# -- tiles: the Implementation Notes' algorithm against the native Deep Zoom grid ----------
def svs_like(width: int, height: int, downsamples: tuple[int, ...]) -> Pyramid:
    dims = [(max(1, width // d), max(1, height // d)) for d in downsamples]
    return Pyramid(tuple(dims), level_downsamples(dims))


def osd_url(l0_size: tuple[int, int], tile: int, s: int, n: int, m: int) -> str:
    """The region/size OpenSeadragon 6's IIIF tile source asks (IIIFTileSource.getTileUrl,
    version 3): ``full`` and ``w,h`` for a level in one tile, ``x,y,w,h`` and ``w,h``
    otherwise, ``max`` when the size is the full image's."""
    width, height = l0_size
    level_w, level_h = math.ceil(width / s), math.ceil(height / s)
    if level_w < tile and level_h < tile:
        size = "max" if (level_w, level_h) == l0_size else f"{level_w},{level_h}"
        return f"full/{size}"
    x, y = n * tile * s, m * tile * s
    w, h = min(tile * s, width - x), min(tile * s, height - y)
    region = "full" if (x, y, w, h) == (0, 0, width, height) else f"{x},{y},{w},{h}"
    sw, sh = min(tile, level_w - n * tile), min(tile, level_h - m * tile)
    size = "max" if (sw, sh) == l0_size else f"{sw},{sh}"
    return f"{region}/{size}"


def tiles_of(l0_size: tuple[int, int], tile: int, s: int, rng: random.Random
             ) -> list[tuple[int, int]]:
    cols = math.ceil(l0_size[0] / (tile * s))
    rows = math.ceil(l0_size[1] / (tile * s))
    every = [(n, m) for n in {0, 1, cols - 2, cols - 1} for m in {0, 1, rows - 2, rows - 1}
             if 0 <= n < cols and 0 <= m < rows]
    if cols * rows <= 400:
        every = [(n, m) for n in range(cols) for m in range(rows)]
    return every + [(rng.randrange(cols), rng.randrange(rows)) for _ in range(20)]


PYRAMIDS = {
    # (width, height): stored level downsamples; the native tile size is 256 unless given
    "validator": ((1000, 1000), (1, 2, 4), 256),
    "odd, 1-px slivers": ((1025, 769), (1, 4), 256),
    "odd, tile 128": ((1001, 517), (1, 3), 128),
    "1 x N": ((1, 100_000), (1,), 256),
    "N x 1": ((100_000, 1), (1, 4, 16), 256),
    "100k wide": ((100_003, 41_999), (1, 4, 16, 64), 256),
    "aperio-like": ((24_000, 18_000), (1, 4, 16), 256),
    "tile 512": ((30_001, 20_001), (1, 2, 4, 8, 16, 32), 512),
    "one pixel": ((1, 1), (1,), 256),
}


@pytest.mark.parametrize("name", list(PYRAMIDS))
def test_every_scale_factor_tile_is_the_native_deep_zoom_tile(name: str) -> None:
    l0_size, downsamples, tile = PYRAMIDS[name]
    pyramid = svs_like(*l0_size, downsamples)
    geom = deep_zoom(pyramid, GeometryParams(tile, 0, False))
    factors = scale_factors(l0_size, tile)
    assert factors == tuple(2**k for k in range(len(factors)))
    last = factors[-1]
    assert math.ceil(l0_size[0] / last) <= tile and math.ceil(l0_size[1] / last) <= tile
    assert len(factors) <= geom.level_count
    rng = random.Random(name)
    lined_up = checked = 0
    for s in factors:
        level = geom.level_count - 1 - int(math.log2(s))
        for n, m in tiles_of(l0_size, tile, s, rng):
            region, size = tile_request(l0_size, (tile, tile), s, n, m)
            url = osd_url(l0_size, tile, s, n, m)
            # OpenSeadragon asks exactly what the Implementation Notes compute...
            mine = ours(f"{url}/0/default.jpg", *l0_size, LIMITS)
            assert mine == (region, size), (s, n, m, url)
            # ...which the reference implementation reads the same way...
            assert reference(f"{url}/0/default.jpg", *l0_size) == (region, size), url
            # ...and which is the native Deep Zoom tile (n, m) of the level of scale s.
            checked += 1
            address = native_tile(geom, region, size)
            dz = geom.tile_region(level, n, m)
            assert dz.z_size == size
            if dz.l0_location == region[:2] and dz.out_size == size:
                assert address == (level, n, m), (s, n, m)
                lined_up += 1
            else:  # a level's downsample is not exact, or Image.thumbnail takes a pixel
                assert address is None  # off the Deep Zoom tile: rendered at its own size
                assert s > 1  # never at full resolution
    assert lined_up >= checked // 2


def test_only_tiles_line_up() -> None:
    l0_size = (3000, 2100)
    geom = deep_zoom(svs_like(*l0_size, (1, 4, 16)), GeometryParams(256, 0, False))
    n = geom.level_count
    assert native_tile(geom, (0, 0, 256, 256), (256, 256)) == (n - 1, 0, 0)
    assert native_tile(geom, (512, 1024, 512, 512), (256, 256)) == (n - 2, 1, 2)
    assert native_tile(geom, (0, 0, 3000, 2100), (188, 132)) == (n - 5, 0, 0)
    for region, size in [((1, 0, 256, 256), (256, 256)), ((0, 0, 256, 256), (128, 128)),
                         ((0, 0, 256, 255), (256, 255)), ((0, 0, 512, 512), (255, 256)),
                         ((0, 0, 768, 768), (256, 256)), ((0, 0, 3000, 2100), (3000, 2100))]:
        assert native_tile(geom, region, size) is None, region
    overlapping = deep_zoom(svs_like(*l0_size, (1, 4, 16)), GeometryParams(254, 1, False))
    assert native_tile(overlapping, (0, 0, 254, 254), (254, 254)) is None


@pytest.mark.parametrize("name", list(PYRAMIDS))
def test_preferred_sizes_are_scale_factor_sizes_within_limits(name: str) -> None:
    l0_size, _, _ = PYRAMIDS[name]
    sizes = preferred_sizes(l0_size, LIMITS)
    assert sizes and list(sizes) == sorted(sizes)
    scaled = {(math.ceil(l0_size[0] / 2**k), math.ceil(l0_size[1] / 2**k)) for k in range(20)}
    for w, h in sizes:
        assert LIMITS.allow((w, h)) and max(w, h) <= 2048
        assert (w, h) in scaled


# -- the read of a rendered image -----------------------------------------------------------
def test_read_plan_uses_the_coarsest_sufficient_level() -> None:
    pyramid = svs_like(24_000, 18_000, (1, 4, 16))
    plan = plan_read(pyramid, (0, 0, 24_000, 18_000), (1500, 1125))
    assert (plan.slide_level, plan.l_size, plan.out_size) == (2, (1500, 1125), (1500, 1125))
    plan = plan_read(pyramid, (1000, 2000, 800, 800), (100, 100))  # downsample 8
    assert plan.slide_level == 1 and plan.l0_location == (1000, 2000)
    assert plan.l_size == (200, 200) and plan.l_z_downsample == 2
    plan = plan_read(pyramid, (0, 0, 100, 100), (400, 100))  # distorted: the finer axis
    assert plan.slide_level == 0 and plan.l_size == (100, 100)
    plan = plan_read(pyramid, (23_990, 17_990, 10, 10), (1000, 1000))  # upscaled, at the edge
    assert plan.slide_level == 0 and plan.l_size == (10, 10) and plan.l_z_downsample == 0.01


# -- documents --------------------------------------------------------------------------------
@pytest.mark.parametrize(("public_url", "headers", "expected"), [
    (None, {}, "http://host:8000"),
    ("https://slides.example.org/", {"x-forwarded-host": "evil"}, "https://slides.example.org"),
    (None, {"x-forwarded-proto": "https", "x-forwarded-host": "slides.example.org"},
     "https://slides.example.org"),
    (None, {"x-forwarded-proto": "https, http", "x-forwarded-host": "a.org:8443, b"},
     "https://a.org:8443"),
    (None, {"forwarded": 'for=1.2.3.4;proto=https;host="p.example:444", for=5.6.7.8'},
     "https://p.example:444"),
    (None, {"x-forwarded-host": "evil.org/<script>", "x-forwarded-proto": "javascript"},
     "http://host:8000"),
    (None, {"x-forwarded-host": "[::1]:8080"}, "http://[::1]:8080"),
])
def test_public_base(public_url: str | None, headers: dict[str, str], expected: str) -> None:
    assert public_base(public_url, headers, "http", "host:8000") == expected


def test_public_base_keeps_a_root_path() -> None:
    assert public_base(None, {}, "http", "h", "/wsi/") == "http://h/wsi"
    assert public_base(None, {}, "http", "h", "/<bad>") == "http://h"


@pytest.mark.parametrize(("accept", "json_ld"), [
    ("", True), ("*/*", True), ("application/ld+json", True),
    ("application/json", False), ("application/json, application/ld+json;q=0.9", True),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
])
def test_content_negotiation(accept: str, json_ld: bool) -> None:
    media = json_media_type(accept, IMAGE_CONTEXT)
    if json_ld:
        assert media == f'application/ld+json;profile="{IMAGE_CONTEXT}"'
    else:
        assert media == "application/json"


def service_of(l0_size: tuple[int, int], tile: int = 256) -> ImageService:
    return ImageService("https://h/iiif/3/abc", l0_size, tile, LIMITS, ("webp",))


def test_info_json_describes_tiles_sizes_limits_and_features() -> None:
    info = info_json(service_of((24_000, 18_000)))
    assert next(iter(info)) == "@context" and info["@context"] == IMAGE_CONTEXT
    assert info["id"] == "https://h/iiif/3/abc" and info["type"] == "ImageService3"
    assert info["profile"] == "level2" and info["protocol"] == "http://iiif.io/api/image"
    assert (info["width"], info["height"]) == (24_000, 18_000)
    assert (info["maxWidth"], info["maxHeight"], info["maxArea"]) == (10_000, 10_000,
                                                                      25_000_000)
    assert info["tiles"] == [{"width": 256, "height": 256,
                              "scaleFactors": [1, 2, 4, 8, 16, 32, 64, 128]}]
    assert info["sizes"][-1] == {"width": 1500, "height": 1125}
    assert info["preferredFormats"] == ["jpg"] and info["extraFormats"] == ["webp"]
    assert info["extraQualities"] == ["color", "gray", "bitonal"]
    assert info["extraFeatures"] == list(EXTRA_FEATURES)
    assert "sizeUpscaling" in EXTRA_FEATURES  # which needs maxWidth or maxArea: both given


def test_manifest_has_one_canvas_painted_by_the_image_service() -> None:
    svc = service_of((3000, 2100))
    facts = SlideFacts("case 12 block A.svs", [("Dimensions", "3,000 × 2,100 px")],
                       [("Slide label", 'https://h/api/slides/abc/associated/label?v="1"')])
    doc: dict[str, Any] = manifest("https://h", "abc", svc, facts)
    assert doc["@context"] == "http://iiif.io/api/presentation/3/context.json"
    assert doc["type"] == "Manifest" and doc["id"] == "https://h/iiif/3/abc/manifest.json"
    assert doc["label"] == {"none": ["case 12 block A.svs"]}
    (canvas,) = doc["items"]
    assert (canvas["type"], canvas["width"], canvas["height"]) == ("Canvas", 3000, 2100)
    (page,) = canvas["items"]
    (anno,) = page["items"]
    assert anno["motivation"] == "painting" and anno["target"] == canvas["id"]
    body = anno["body"]
    assert body["service"] == [{"id": svc.id, "type": "ImageService3", "profile": "level2"}]
    assert body["id"] == f"{svc.id}/full/max/0/default.jpg"
    (thumb,) = doc["thumbnail"]
    assert thumb["id"].startswith(f"{svc.id}/full/") and max(thumb["width"], thumb["height"]) >= 256
    label = doc["metadata"][-1]
    assert label["label"] == {"en": ["Slide label"]}
    assert label["value"]["none"][0] == (
        '<span><img src="https://h/api/slides/abc/associated/label?v=&quot;1&quot;" '
        'alt="Slide label"/></span>')
