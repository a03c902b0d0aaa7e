"""The JSON documents of the IIIF front, as pure functions: the image service's info.json
(Image API 3.0, §5), a slide's Presentation 3 manifest, the public base URL they are
built on, and the media type content negotiation picks.

The manifest is assembled here rather than with ``iiif-prezi3``: that library pins Pillow
to <= 12.0.0 (this server resamples every tile with Pillow and takes its security
releases), and one canvas with one image service is a small, fixed shape; real viewers
(Mirador) check it in the browser tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wsi_server.geometry import Size
from wsi_server.iiif.request import Limits, constrain, preferred_sizes, scale_factors

IMAGE_CONTEXT = "http://iiif.io/api/image/3/context.json"
PRESENTATION_CONTEXT = "http://iiif.io/api/presentation/3/context.json"
PROFILE = "level2"
PROFILE_URI = "http://iiif.io/api/image/3/level2.json"
PREFIX = "/iiif/3"
EXTRA_QUALITIES = ("color", "gray", "bitonal")
EXTRA_FEATURES = (
    # beyond level 2, which has the region, size and 90° rotation forms, base URI
    # redirects, CORS and the JSON-LD media type
    "canonicalLinkHeader",
    "mirroring",
    "profileLinkHeader",
    "rotationArbitrary",
    "sizeUpscaling",
)

_HOST = re.compile(r"(?:[A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}(?::[0-9]{1,5})?"
                   r"|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")
_PATH = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]*)*")


def _first(value: str | None) -> str:
    return value.split(",", 1)[0].strip() if value else ""


def public_base(
    public_url: str | None, headers: Mapping[str, str], scheme: str, host: str,
    root_path: str = "",
) -> str:
    """The server's external ``scheme://host[/prefix]``: ``--public-url`` when set, else
    the proxy's ``Forwarded`` (RFC 7239) or ``X-Forwarded-Proto`` / ``X-Forwarded-Host``
    headers, else the request's own scheme and ``Host``. Values that are not a plain
    scheme or host name are ignored (no header can put markup or a path into a URL)."""
    if public_url:
        return public_url.rstrip("/")
    if not headers and not root_path and _HOST.fullmatch(host):  # no proxy: the common case
        return f"{scheme}://{host}"
    proto = fhost = ""
    forwarded = _first(headers.get("forwarded"))
    for pair in forwarded.split(";"):
        name, _, value = pair.strip().partition("=")
        value = value.strip().strip('"')
        if name.lower() == "proto":
            proto = value
        elif name.lower() == "host":
            fhost = value
    proto = (proto or _first(headers.get("x-forwarded-proto"))).lower()
    fhost = fhost or _first(headers.get("x-forwarded-host"))
    if proto in ("http", "https"):
        scheme = proto
    if fhost and _HOST.fullmatch(fhost):
        host = fhost
    elif not _HOST.fullmatch(host):
        host = "localhost"
    if not _PATH.fullmatch(root_path):
        root_path = ""
    return f"{scheme}://{host}{root_path.rstrip('/')}"


def json_media_type(accept: str, context: str) -> str:
    """``application/ld+json`` with the context as its profile (the specifications'
    default, and what ``Accept: application/ld+json`` asks), unless the client accepts
    ``application/json`` and not JSON-LD."""
    if "application/json" in accept and "application/ld+json" not in accept:
        return "application/json"
    return f'application/ld+json;profile="{context}"'


def service_id(base: str, slide_id: str) -> str:
    return f"{base}{PREFIX}/{slide_id}"


@dataclass(frozen=True, slots=True)
class ImageService:
    """What info.json says of one slide."""

    id: str
    l0_size: Size
    tile: int
    limits: Limits
    formats: tuple[str, ...]
    """Formats beyond level 2's jpg and png (``extraFormats``)."""


def info_json(service: ImageService) -> dict[str, Any]:
    """The image information document (Image API 3.0, §5)."""
    width, height = service.l0_size
    limits = service.limits
    return {
        "@context": IMAGE_CONTEXT,
        "id": service.id,
        "type": "ImageService3",
        "protocol": "http://iiif.io/api/image",
        "profile": PROFILE,
        "width": width,
        "height": height,
        "maxWidth": limits.max_width,
        "maxHeight": limits.max_height,
        "maxArea": limits.max_area,
        "sizes": [{"width": w, "height": h}
                  for w, h in preferred_sizes(service.l0_size, limits)],
        "tiles": [{"width": service.tile, "height": service.tile,
                   "scaleFactors": list(scale_factors(service.l0_size, service.tile))}],
        "preferredFormats": ["jpg"],
        "extraFormats": list(service.formats),
        "extraQualities": list(EXTRA_QUALITIES),
        "extraFeatures": list(EXTRA_FEATURES),
    }


def _text(value: str, language: str = "none") -> dict[str, list[str]]:
    return {language: [value]}


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


@dataclass(frozen=True, slots=True)
class SlideFacts:
    """What a manifest tells of a slide besides its image service."""

    name: str
    metadata: Sequence[tuple[str, str]]
    """(label, value) pairs shown by viewers (English labels)."""
    associated: Sequence[tuple[str, str]] = ()
    """(label, image URL) of the label and macro images the requester may see."""


def manifest(base: str, slide_id: str, service: ImageService, facts: SlideFacts
             ) -> dict[str, Any]:
    """A Presentation 3 manifest of one slide: one canvas of the full image painted by the
    image service, the slide's metadata, a thumbnail; the label and macro images (when the
    requester may see them) as metadata entries viewers render as images."""
    sid = service.id
    root = f"{base}{PREFIX}/{slide_id}"
    width, height = service.l0_size
    image_service = [{"id": sid, "type": "ImageService3", "profile": PROFILE}]
    full_w, full_h = constrain(service.l0_size, service.limits)
    sizes = preferred_sizes(service.l0_size, service.limits)
    thumb = next((s for s in sizes if max(s) >= 256), sizes[-1] if sizes else (full_w, full_h))
    canvas = f"{root}/canvas/1"
    metadata = [{"label": _text(label, "en"), "value": _text(value)}
                for label, value in facts.metadata]
    metadata += [
        {"label": _text(label, "en"),
         "value": _text(f'<span><img src="{_html_escape(url)}" '
                        f'alt="{_html_escape(label)}"/></span>')}
        for label, url in facts.associated
    ]
    return {
        "@context": PRESENTATION_CONTEXT,
        "id": f"{root}/manifest.json",
        "type": "Manifest",
        "label": _text(facts.name),
        "metadata": metadata,
        "thumbnail": [{
            "id": f"{sid}/full/{thumb[0]},{thumb[1]}/0/default.jpg",
            "type": "Image",
            "format": "image/jpeg",
            "width": thumb[0],
            "height": thumb[1],
            "service": image_service,
        }],
        "items": [{
            "id": canvas,
            "type": "Canvas",
            "label": _text(facts.name),
            "width": width,
            "height": height,
            "items": [{
                "id": f"{root}/page/1",
                "type": "AnnotationPage",
                "items": [{
                    "id": f"{root}/annotation/1",
                    "type": "Annotation",
                    "motivation": "painting",
                    "target": canvas,
                    "body": {
                        "id": f"{sid}/full/max/0/default.jpg",
                        "type": "Image",
                        "format": "image/jpeg",
                        "width": full_w,
                        "height": full_h,
                        "service": image_service,
                    },
                }],
            }],
        }],
    }
