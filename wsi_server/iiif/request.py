"""IIIF Image API 3.0 requests as pure computations over frozen values.

- the grammar of the five path parameters, ``{region}/{size}/{rotation}/{quality}.{format}``
  (``parse_image_request``): anything malformed or out of range is ``BadRequest`` (400);
- the region and size arithmetic of the specification (``resolve``), with the rounding of
  the Image API's reference implementation (the ``iiif`` package: half up) computed exactly
  (fractions, no floats), and the maximum-size rule of the Implementation Notes (§4);
- the tile grid an info.json advertises (``scale_factors``) and the request a viewer builds
  for one tile of it (``tile_request``: the Implementation Notes' algorithm, §3);
- where a request lines up with the slide's native Deep Zoom grid (``native_tile``): it is
  then that tile, served (passed through or cached) by the same path as the Deep Zoom front.

Coordinate spaces are named as in ``geometry.py``: ``l0_`` is the full-resolution image
(IIIF's "full image"), ``out_`` the returned image before rotation. Nothing here reads a
file or a request.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from wsi_server.errors import BadRequest
from wsi_server.geometry import DeepZoomGeometry, Size

Rect = tuple[int, int, int, int]
"""(x, y, width, height) in pixels of the full image."""

QUALITIES = ("default", "color", "gray", "bitonal")
FORMATS = ("jpg", "png", "webp")
PARAM_MAX_CHARS = 64
"""Longest accepted region, size or rotation parameter (longer ones are 400)."""

# Pixel values are non-negative integers; percentages and degrees are decimal numbers made
# of digits and one '.', no sign, no exponent (Image API 3.0, §4 and §4.7).
_INT = re.compile(r"[0-9]{1,10}")
_NUM = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,12})?|\.[0-9]{1,12}")
_PX = re.compile(r"([0-9]{1,10}),([0-9]{1,10}),([0-9]{1,10}),([0-9]{1,10})")
_HALF = Fraction(1, 2)
_HUNDRED = Fraction(100)


def _round(q: Fraction) -> int:
    """Round half up, as the reference implementation's ``int(x + 0.5)`` (exactly)."""
    return math.floor(q + _HALF)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# -- parameters ---------------------------------------------------------------------------
Number = int | Fraction


@dataclass(frozen=True, slots=True)
class Region:
    kind: Literal["full", "square", "px", "pct"]
    xywh: tuple[Number, Number, Number, Number] = (0, 0, 0, 0)
    """Pixels (integers) or percentages (exact decimals) of the full image."""


@dataclass(frozen=True, slots=True)
class SizeRequest:
    kind: Literal["max", "w", "h", "wh", "confined", "pct"]
    upscale: bool = False
    """The ``^`` prefix: the result may be larger than the region."""
    w: int = 0
    h: int = 0
    pct: Fraction = Fraction(0)


@dataclass(frozen=True, slots=True)
class Rotation:
    degrees: Fraction
    """Clockwise, 0 <= degrees < 360 (360 is read as 0)."""
    mirror: bool = False
    """``!``: mirrored on the vertical axis before the rotation."""

    @property
    def is_identity(self) -> bool:
        return self.degrees == 0 and not self.mirror

    @property
    def quarter_turns(self) -> int | None:
        """0-3 clockwise quarter turns, or None for an arbitrary angle."""
        turns = self.degrees / 90
        return int(turns) if turns.denominator == 1 else None

    def canonical(self) -> str:
        """``!`` if mirrored, then an integer if possible, else the shortest decimal."""
        return ("!" if self.mirror else "") + _decimal(self.degrees)


@dataclass(frozen=True, slots=True)
class ImageRequest:
    region: Region
    size: SizeRequest
    rotation: Rotation
    quality: str
    fmt: str


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's ``maxWidth``, ``maxHeight`` and ``maxArea`` (advertised in info.json)."""

    max_width: int
    max_height: int
    max_area: int

    def allow(self, size: Size) -> bool:
        w, h = size
        return w <= self.max_width and h <= self.max_height and w * h <= self.max_area


def _decimal(q: Fraction) -> str:
    """A fraction with a finite decimal expansion (parsed from one) without trailing zeros."""
    if q.denominator == 1:
        return str(q.numerator)
    whole, rest = divmod(q.numerator, q.denominator)
    digits: list[str] = []
    while rest and len(digits) < 24:
        rest *= 10
        digit, rest = divmod(rest, q.denominator)
        digits.append(str(digit))
    return f"{whole}.{''.join(digits)}"


def _check_length(text: str, name: str) -> None:
    if not text or len(text) > PARAM_MAX_CHARS:
        raise BadRequest(f"the {name} parameter is empty or longer than {PARAM_MAX_CHARS} "
                         "characters")


_FULL = Region("full")
_SQUARE = Region("square")


def parse_region(text: str) -> Region:
    """``full``, ``square``, ``x,y,w,h`` or ``pct:x,y,w,h``."""
    px = _PX.fullmatch(text)
    if px is not None:  # the tiles' form: one match
        x, y, w, h = int(px[1]), int(px[2]), int(px[3]), int(px[4])
        if w and h:
            return Region("px", (x, y, w, h))
    _check_length(text, "region")
    if text == "full":
        return _FULL
    if text == "square":
        return _SQUARE
    pct = text.startswith("pct:")
    parts = (text[4:] if pct else text).split(",")
    number = _NUM if pct else _INT
    if len(parts) != 4 or not all(number.fullmatch(p) for p in parts):
        raise BadRequest("region must be full, square, x,y,w,h (non-negative integers) or "
                         "pct:x,y,w,h (decimal numbers)")
    qx, qy, qw, qh = (_number(p) for p in parts)
    if qw == 0 or qh == 0:
        raise BadRequest("the region's width and height must be greater than zero")
    return Region("pct" if pct else "px", (qx, qy, qw, qh))


def _number(text: str) -> Number:
    """A decimal parameter (checked by ``_NUM``), exactly: an int when it is one."""
    return Fraction(text) if "." in text else int(text)


@functools.lru_cache(maxsize=4096)  # a viewer asks a few sizes for thousands of tiles
def parse_size(text: str) -> SizeRequest:
    """``max``, ``w,``, ``,h``, ``w,h``, ``!w,h``, ``pct:n``, each also after ``^``."""
    _check_length(text, "size")
    upscale = text.startswith("^")
    body = text[1:] if upscale else text
    if body == "max":
        return SizeRequest("max", upscale)
    if body == "full":
        raise BadRequest("the size 'full' was replaced by 'max' in Image API 3.0")
    if body.startswith("pct:"):
        if not _NUM.fullmatch(body[4:]):
            raise BadRequest("size pct:n needs a decimal number n")
        pct = Fraction(_number(body[4:]))
        if pct == 0:
            raise BadRequest("size pct:n needs n greater than zero")
        return SizeRequest("pct", upscale, pct=pct)
    confined = body.startswith("!")
    if confined:
        body = body[1:]
    w_text, comma, h_text = body.partition(",")
    if (not comma or not (w_text or h_text) or (w_text and not _INT.fullmatch(w_text))
            or (h_text and not _INT.fullmatch(h_text))):
        raise BadRequest("size must be max, w,  ,h  w,h  !w,h or pct:n (optionally after ^), "
                         "with w and h non-negative integers")
    w = int(w_text) if w_text else 0
    h = int(h_text) if h_text else 0
    if confined and not (w_text and h_text):
        raise BadRequest("size !w,h needs both w and h")
    if (w_text and w == 0) or (h_text and h == 0):
        raise BadRequest("the size's width and height must be greater than zero")
    kind: Literal["w", "h", "wh", "confined"]
    kind = "confined" if confined else "wh" if w and h else "w" if w else "h"
    return SizeRequest(kind, upscale, w=w, h=h)


_NO_ROTATION = Rotation(Fraction(0))


@functools.lru_cache(maxsize=512)
def parse_rotation(text: str) -> Rotation:
    """``n`` or ``!n``, n in degrees from 0 to 360."""
    if text == "0":
        return _NO_ROTATION
    _check_length(text, "rotation")
    mirror = text.startswith("!")
    body = text[1:] if mirror else text
    if not _NUM.fullmatch(body):
        raise BadRequest("rotation must be a number of degrees from 0 to 360, optionally "
                         "after ! (mirroring)")
    degrees = Fraction(_number(body))
    if degrees > 360:
        raise BadRequest("rotation must be between 0 and 360 degrees")
    return Rotation(degrees % 360, mirror)


@functools.lru_cache(maxsize=256)
def parse_quality_format(text: str, formats: tuple[str, ...] = FORMATS) -> tuple[str, str]:
    """``{quality}.{format}``: a quality of ``QUALITIES`` and a format of ``formats``."""
    quality, dot, fmt = text.rpartition(".")
    if not dot or len(text) > PARAM_MAX_CHARS:
        raise BadRequest("the last parameter must be {quality}.{format}, e.g. default.jpg")
    if quality not in QUALITIES:
        raise BadRequest(f"quality must be one of {', '.join(QUALITIES)}")
    if fmt not in formats:
        raise BadRequest(f"format must be one of {', '.join(formats)}")
    return quality, fmt


def parse_image_request(
    region: str, size: str, rotation: str, quality_format: str,
    formats: tuple[str, ...] = FORMATS,
) -> ImageRequest:
    """The five parameters of an image request; ``BadRequest`` names the first bad one."""
    quality, fmt = parse_quality_format(quality_format, formats)
    return ImageRequest(parse_region(region), parse_size(size), parse_rotation(rotation),
                        quality, fmt)


# -- region and size ------------------------------------------------------------------------
def resolve_region(region: Region, l0_size: Size) -> Rect:
    """The region in full-image pixels, cropped at the image's edges (§4.1). A region that
    is empty or entirely outside the image is ``BadRequest``."""
    width, height = l0_size
    if region.kind == "full":
        return (0, 0, width, height)
    if region.kind == "square":  # centred on the longer dimension
        side = min(width, height)
        return ((width - side) // 2, (height - side) // 2, side, side)
    qx, qy, qw, qh = region.xywh
    if region.kind == "pct":
        x, y = _round(qx * width / _HUNDRED), _round(qy * height / _HUNDRED)
        w, h = _round(qw * width / _HUNDRED), _round(qh * height / _HUNDRED)
    else:
        x, y, w, h = int(qx), int(qy), int(qw), int(qh)  # ints already
    if w <= 0 or h <= 0:
        raise BadRequest("the region is less than one pixel wide or high")
    if x >= width or y >= height:
        raise BadRequest("the region is entirely outside the image")
    return (x, y, min(w, width - x), min(h, height - y))


def constrain(size: Size, limits: Limits) -> Size:
    """The largest size of the same shape within the limits (Implementation Notes §4):
    ``size`` itself when it is within them."""
    width, height = size
    w, h = width, height
    if limits.max_area < w * h:
        scale = math.sqrt(limits.max_area / (w * h))  # rounds down: never above maxArea
        w, h = int(w * scale), int(h * scale)
    if limits.max_width < w:
        w, h = limits.max_width, int(height * limits.max_width / width + 0.5)
    if limits.max_height < h:
        h, w = limits.max_height, int(width * limits.max_height / height + 0.5)
    while w * h > limits.max_area:  # a float rounded up past an integer
        w, h = w - (w >= h), h - (h > w)
    return (max(w, 1), max(h, 1))


def upscaled_max(size: Size, limits: Limits) -> Size:
    """``^max``: the region scaled, up or down, to the largest size within the limits."""
    width, height = size
    scale = min(Fraction(limits.max_width, width), Fraction(limits.max_height, height))
    if scale <= 1:
        return constrain(size, limits)
    w = min(limits.max_width, _round(width * scale))
    h = min(limits.max_height, _round(height * scale))
    return constrain((w, h), limits)


def resolve_size(size: SizeRequest, region: Size, limits: Limits) -> Size:
    """The size of the returned image (before rotation) for a region of ``region`` pixels
    (§4.2). Less than a pixel, larger than the region without ``^``, or beyond the limits
    (except ``max``, which is constrained to them) is ``BadRequest``."""
    rw, rh = region
    if size.kind == "max":
        return upscaled_max(region, limits) if size.upscale else constrain(region, limits)
    if size.kind == "pct":
        w, h = _round(rw * size.pct / _HUNDRED), _round(rh * size.pct / _HUNDRED)
    elif size.kind == "w":
        w, h = size.w, _round(Fraction(rh * size.w, rw))
    elif size.kind == "h":
        w, h = _round(Fraction(rw * size.h, rh)), size.h
    elif size.kind == "wh":
        w, h = size.w, size.h
    else:  # confined: the largest of the region's shape within w x h
        scale = min(Fraction(size.w, rw), Fraction(size.h, rh))
        w, h = _round(rw * scale), _round(rh * scale)
    if w < 1 or h < 1:
        raise BadRequest(f"the requested size is less than one pixel ({w}x{h})")
    if not size.upscale and (w > rw or h > rh):
        raise BadRequest(f"the requested size {w}x{h} is larger than the region ({rw}x{rh}); "
                         "upscaling needs the ^ prefix")
    if not limits.allow((w, h)):
        raise BadRequest(f"the requested size {w}x{h} is over the server's limits "
                         f"(maxWidth {limits.max_width}, maxHeight {limits.max_height}, "
                         f"maxArea {limits.max_area})")
    return (w, h)


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """An image request applied to one image: what to read and what to return."""

    l0_region: Rect
    out_size: Size
    """Size of the scaled region, before rotation."""
    rotation: Rotation
    quality: str
    fmt: str

    @property
    def plain(self) -> bool:
        """No rotation, no mirroring and the image's own colours: the request can be a tile
        of the Deep Zoom path."""
        return self.rotation.is_identity and self.quality in ("default", "color")

    def canonical(self, l0_size: Size, limits: Limits) -> str:
        """The request's canonical ``region/size/rotation/quality.format`` (§4.8)."""
        rotation = "0" if self.rotation is _NO_ROTATION else self.rotation.canonical()
        return canonical(self.l0_region, self.out_size, l0_size, limits,
                         f"{rotation}/{self.quality}.{self.fmt}")


def canonical(l0_region: Rect, out_size: Size, l0_size: Size, limits: Limits, tail: str
              ) -> str:
    """Canonical ``region/size/`` (§4.8) of a resolved request, then ``tail`` (its
    canonical rotation, quality and format)."""
    x, y, w, h = l0_region
    region = "full" if l0_region == (0, 0, *l0_size) else f"{x},{y},{w},{h}"
    ow, oh = out_size
    up = ow > w or oh > h
    if out_size == constrain((w, h), limits):
        size = "max"
    elif up and out_size == upscaled_max((w, h), limits):
        size = "^max"
    else:
        size = f"{'^' if up else ''}{ow},{oh}"
    return f"{region}/{size}/{tail}"


def resolve(request: ImageRequest, l0_size: Size, limits: Limits) -> ResolvedImage:
    """Region, then size (§4.6); rotation, quality and format are carried over."""
    region = resolve_region(request.region, l0_size)
    out = resolve_size(request.size, (region[2], region[3]), limits)
    return ResolvedImage(region, out, request.rotation, request.quality, request.fmt)


_WH = re.compile(r"([0-9]{1,10}),([0-9]{1,10})")


def resolve_tile_form(region: str, size: str, l0_size: Size, limits: Limits
                      ) -> tuple[Rect, Size] | None:
    """``resolve``'s region and size for the form viewers ask tiles in (``x,y,w,h`` and
    ``w,h``, no upscaling) in one pass, or None for any other form or any request
    ``resolve`` would refuse (then ``resolve`` decides, and says why)."""
    px, wh = _PX.fullmatch(region), _WH.fullmatch(size)
    if px is None or wh is None:
        return None
    x, y, w, h = int(px[1]), int(px[2]), int(px[3]), int(px[4])
    ow, oh = int(wh[1]), int(wh[2])
    width, height = l0_size
    if not (w and h and ow and oh) or x >= width or y >= height:
        return None
    w, h = min(w, width - x), min(h, height - y)
    if ow > w or oh > h or not limits.allow((ow, oh)):
        return None
    return (x, y, w, h), (ow, oh)


# -- tiles ------------------------------------------------------------------------------------
def scale_factors(l0_size: Size, tile: int) -> tuple[int, ...]:
    """Contiguous powers of two, 1 to the first at which the whole image is one tile (what
    OpenSeadragon and other viewers assume): the levels of the native Deep Zoom grid that
    hold more than one tile, and the first one that holds just one."""
    width, height = l0_size
    out = [1]
    while _ceil_div(width, out[-1]) > tile or _ceil_div(height, out[-1]) > tile:
        out.append(out[-1] * 2)
    return tuple(out)


def tile_request(l0_size: Size, tile: Size, s: int, n: int, m: int) -> tuple[Rect, Size]:
    """Region and size of tile (n, m) at scale factor ``s``, by the Implementation Notes'
    algorithm (§3), in integer arithmetic."""
    width, height = l0_size
    tw, th = tile
    xr, yr = n * tw * s, m * th * s
    wr, hr = tw * s, th * s
    if xr + wr > width:
        wr = width - xr
    if yr + hr > height:
        hr = height - yr
    ws, hs = tw, th
    if xr + tw * s > width:
        ws = (width - xr + s - 1) // s
    if yr + th * s > height:
        hs = (height - yr + s - 1) // s
    return (xr, yr, wr, hr), (ws, hs)


def preferred_sizes(
    l0_size: Size, limits: Limits, smallest: int = 32, largest: int = 2048
) -> tuple[Size, ...]:
    """info.json ``sizes``: the image at each power-of-two scale whose longer side is from
    ``smallest`` to ``largest`` pixels (quick thumbnails), smallest first; a smaller image
    lists its full size."""
    width, height = l0_size
    out = []
    s = 1
    while True:
        w, h = _ceil_div(width, s), _ceil_div(height, s)
        if smallest <= max(w, h) <= largest and limits.allow((w, h)):
            out.append((w, h))
        if max(w, h) <= smallest:
            break
        s *= 2
    if not out and limits.allow(l0_size):
        out.append(l0_size)
    return tuple(reversed(out))


def _pow2_at_least(a: int, b: int) -> int:
    """The smallest power of two s with s * b >= a."""
    return 1 << (_ceil_div(a, b) - 1).bit_length()


def _power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5 and value >= 1


def _interior_tiles_exact(geometry: DeepZoomGeometry, level: int) -> bool:
    """True when every interior tile (not in the last column or row) of a Deep Zoom level
    reads from level-0 pixel ``tile * s * (col, row)`` and delivers ``tile`` x ``tile``
    pixels: its source level's downsample and the scale to it are exact powers of two
    (so the floats of ``DeepZoomGeometry.tile_region`` are exact), and the source level
    holds every interior tile whole (so the read is square and ``Image.thumbnail`` keeps
    it at the tile size)."""
    slide_level = geometry.slide_from_dz_level[level]
    l_z = geometry.l_z_downsamples[level]
    if not (_power_of_two(geometry.l0_l_downsamples[slide_level]) and _power_of_two(l_z)):
        return False
    tile = geometry.tile_size
    for l_lim, t_count in zip(geometry.l_dimensions[slide_level],
                              geometry.t_dimensions[level], strict=True):
        if l_lim < l_z * tile * (t_count - 1):
            return False
    return True


def native_tile(
    geometry: DeepZoomGeometry, l0_region: Rect, out_size: Size
) -> tuple[int, int, int] | None:
    """The tile ``(level, col, row)`` of the native Deep Zoom grid (overlap 0) whose image is
    exactly this request's: the same full-image region scaled by a power of two to the same
    size. None when the request does not line up with that grid."""
    params = geometry.params
    if params.overlap or geometry.l0_offset != (0, 0):
        return None
    x, y, w, h = l0_region
    ow, oh = out_size
    width, height = geometry.l_dimensions[0]
    tile = params.tile_size
    s_x = _pow2_at_least(w, ow)
    s_y = _pow2_at_least(h, oh)
    for s in (s_x,) if s_x == s_y else (s_x, s_y):
        span = tile * s
        if (x % span or y % span or w != min(span, width - x) or h != min(span, height - y)
                or ow != -(-w // s) or oh != -(-h // s)):
            continue
        level = len(geometry.z_dimensions) - s.bit_length()
        col, row = x // span, y // span
        if level < 0:
            continue
        cols, rows = geometry.t_dimensions[level]
        if col >= cols or row >= rows:
            continue
        if (col < cols - 1 and row < rows - 1 and ow == oh == tile
                and _interior_tiles_exact(geometry, level)):
            return (level, col, row)  # what the check below finds, without the read plan
        # The Deep Zoom tile reads from the same level-0 pixel and delivers the same size
        # (unless a level's downsample is not exact, or Image.thumbnail's aspect rule
        # takes a pixel off: then the request is rendered at its own size).
        tile_region = geometry.tile_region(level, col, row)
        if tile_region.l0_location == (x, y) and tile_region.out_size == out_size:
            return (level, col, row)
    return None
