"""The IIIF front through the app: the official image validator against a live server, the
info.json and manifest documents, tiles that are the Deep Zoom tiles, rendered images and
their pixels, bad input, access, CORS and limits.

The validator is the IIIF consortium's ``iiif-validator`` (PyPI 1.0.5, the latest release,
of 2019; its repository has error-reporting fixes since but no release). It runs at level 2
against its own test image — the 10×10 squares of its ``ValidationInfo.colorInfo`` table,
written here as a tiled pyramidal TIFF — served as a slide on loopback, plus the level-3
tests of the features info.json claims beyond level 2 (mirroring, arbitrary rotation, the
canonical and profile link headers). Two of its level-3 tests are not run, and the
features they cover are tested here instead: ``format_webp`` cannot pass on Python 3 (it
calls ``urllib.urlopen`` and compares bytes with a str), and ``size_up`` expects ``^max``
not to upscale, where the Image API (§4.2) says ``^max`` scales to the server's limits.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import tifffile
from openslide import OpenSlide
from PIL import Image

from tests.authkit import ANONYMOUS, BHAM, LEEDS, make_library, oidc_settings, running
from tests.plugins.jwks_server import JwksServer
from wsi_server import tiles as tiles_mod

VALIDATOR_TESTS_NOT_RUN = {
    "format_webp": "broken on Python 3 (urllib.urlopen, bytes compared with a str)",
    "size_up": "expects ^max not to upscale; the Image API says it scales to the limits",
}
CLAIMED_LEVEL_3 = {"rot_mirror", "rot_mirror_180", "rot_full_non90", "rot_region_non90",
                   "linkheader_canonical", "linkheader_profile"}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- the validator ----------------------------------------------------------------------------
def write_validator_slide(path: Path) -> Path:
    """The validator's test image: 1000×1000, 10×10 squares of 100 px coloured from its
    own table (``colorInfo[x][y]`` is the square at column x, row y), as a tiled pyramidal
    TIFF (levels 1, 1/2, 1/4; lossless, so the only lossy step is the server's)."""
    from iiif_validator.validator import ValidationInfo

    colours = ValidationInfo().colorInfo
    image = np.empty((1000, 1000, 3), np.uint8)
    for x in range(10):
        for y in range(10):
            image[y * 100:(y + 1) * 100, x * 100:(x + 1) * 100] = colours[x][y]
    with tifffile.TiffWriter(path) as tif:
        for i, ds in enumerate((1, 2, 4)):
            level = image if ds == 1 else np.asarray(
                Image.fromarray(image).resize((1000 // ds, 1000 // ds), Image.Resampling.BOX))
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      subfiletype=1 if i else 0, metadata=None)
    return path


@pytest.fixture(scope="module")
def validator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("iiif-validator")
    write_validator_slide(d / "validator-squares.tiff")
    return d


def test_the_official_validator_passes_at_level_2(live_server: Any, validator_dir: Path
                                                  ) -> None:
    from iiif_validator.validator import ImageAPI, TestSuite, ValidationInfo

    base = live_server(validator_dir)
    (slide,) = httpx.get(f"{base}/api/slides").json()["slides"]
    assert slide["status"] == "ready", slide
    seed = int(os.environ.get("WSI_IIIF_VALIDATOR_SEED", random.randrange(10**6)))
    random.seed(seed)  # the validator draws its squares and sizes from `random`
    tests = TestSuite(ValidationInfo()).list_tests("3.0")
    chosen = sorted(name for name, info in tests.items()
                    if (info["level"] <= 2 or name in CLAIMED_LEVEL_3)
                    and name not in VALIDATOR_TESTS_NOT_RUN)
    assert len(chosen) >= 34, chosen
    failures = []
    for name in chosen:
        result = ImageAPI(slide["id"], base.removeprefix("http://"), "iiif/3", "http", "",
                          "3.0", debug=False)
        try:
            TestSuite(ValidationInfo()).run_test(name, result)
        except Exception as exc:  # the validator's own crash counts as a failure
            failures.append(f"{name}: {exc!r} at {result.urls[-1:]}")
            continue
        if result.exception is not None:  # a failure, or a warning: neither is a pass
            e = result.exception
            failures.append(f"{name}: {e.type}: got {e.got!r}, expected {e.expected!r} "
                            f"({e.message}; warning={e.warning}) at {result.urls[-1:]}")
    assert not failures, f"validator seed {seed} (WSI_IIIF_VALIDATOR_SEED):\n" + \
        "\n".join(failures)


# -- an app over the synthetic slides -----------------------------------------------------
@pytest.fixture
def svs(synthetic_dir: Path, tmp_path: Path) -> Path:
    """A folder holding the 3000×2100 Aperio-like slide (JPEG tiles of 256, levels 1, 4,
    16) and nothing else."""
    d = tmp_path / "one"
    d.mkdir()
    (d / "slide.svs").symlink_to(synthetic_dir / "aperio-rgb.svs")
    return d


@pytest.fixture
def app(make_client: Any, svs: Path) -> tuple[Any, str]:
    client = make_client(paths=(svs,))
    return client, client.get("/api/slides").json()["slides"][0]["id"]


def test_info_json(app: tuple[Any, str]) -> None:
    client, sid = app
    r = client.get(f"/iiif/3/{sid}/info.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == \
        'application/ld+json;profile="http://iiif.io/api/image/3/context.json"'
    assert r.headers["access-control-allow-origin"] == "*"
    assert "Accept" in r.headers["vary"]
    info = r.json()
    assert info["id"] == f"http://testserver/iiif/3/{sid}"
    assert (info["width"], info["height"], info["profile"]) == (3000, 2100, "level2")
    assert info["tiles"] == [{"width": 256, "height": 256, "scaleFactors": [1, 2, 4, 8, 16]}]
    assert {"width": 188, "height": 132} in info["sizes"]
    # plain JSON for a client that asks for it; JSON-LD for one that asks for that
    plain = client.get(f"/iiif/3/{sid}/info.json", headers={"Accept": "application/json"})
    assert plain.headers["content-type"] == "application/json"
    assert plain.headers["etag"] != r.headers["etag"]
    ld = client.get(f"/iiif/3/{sid}/info.json", headers={"Accept": "application/ld+json"})
    assert ld.headers["content-type"].startswith("application/ld+json;profile=")
    again = client.get(f"/iiif/3/{sid}/info.json", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    # behind a proxy: the public scheme and host
    proxied = client.get(f"/iiif/3/{sid}/info.json", headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "slides.example.org"}).json()
    assert proxied["id"] == f"https://slides.example.org/iiif/3/{sid}"
    forwarded = client.get(f"/iiif/3/{sid}/info.json", headers={
        "Forwarded": 'for=10.0.0.1;proto=https;host="pathology.example:8443"'}).json()
    assert forwarded["id"] == f"https://pathology.example:8443/iiif/3/{sid}"


def test_public_url_names_the_service(make_client: Any, svs: Path) -> None:
    client = make_client(paths=(svs,), public_url="https://slides.example.org/wsi/")
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    info = client.get(f"/iiif/3/{sid}/info.json",
                      headers={"X-Forwarded-Host": "attacker.example"}).json()
    assert info["id"] == f"https://slides.example.org/wsi/iiif/3/{sid}"
    r = client.get(f"/iiif/3/{sid}", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"https://slides.example.org/wsi/iiif/3/{sid}/info.json"


def test_base_uri_redirects_to_info_json(app: tuple[Any, str]) -> None:
    client, sid = app
    r = client.get(f"/iiif/3/{sid}", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"http://testserver/iiif/3/{sid}/info.json"
    assert r.headers["access-control-allow-origin"] == "*"


def test_a_tile_of_the_grid_is_the_deep_zoom_tile(app: tuple[Any, str]) -> None:
    client, sid = app
    dz = client.get(f"/slides/{sid}/native.dzi")
    assert dz.status_code == 200
    full = 12  # 3000 px: Deep Zoom levels 0..12
    for (x, y, s), (level, col, row), source in [
        ((512, 768, 1), (full, 2, 3), "passthrough"),    # a stored JPEG tile, as it is
        ((1024, 1024, 4), (full - 2, 1, 1), "passthrough"),  # stored level 1 (downsample 4)
        ((512, 0, 2), (full - 1, 1, 0), "rendered"),      # downsample 2: not stored
    ]:
        span = 256 * s
        url = f"/iiif/3/{sid}/{x},{y},{span},{span}/256,256/0/default.jpg"
        iiif = client.get(url)
        assert iiif.status_code == 200, iiif.text
        assert iiif.headers["x-tile-source"] in (source, "memory")
        tile = client.get(f"/slides/{sid}/native_files/{level}/{col}_{row}.jpeg")
        assert tile.headers["x-tile-source"] in (source, "memory")
        assert iiif.content == tile.content, url
        assert iiif.headers["etag"] == tile.headers["etag"]  # one cache entry for both
        assert iiif.headers["content-type"] == "image/jpeg"
        link = iiif.headers["link"]
        canonical = "max" if s == 1 else "256,256"
        canonical_url = (f"http://testserver/iiif/3/{sid}/{x},{y},{span},{span}/{canonical}"
                         "/0/default.jpg")
        assert f'<{canonical_url}>;rel="canonical"' in link
        assert '<http://iiif.io/api/image/3/level2.json>;rel="profile"' in link
        assert client.get(url, headers={"If-None-Match": iiif.headers["etag"]}).status_code == 304
    # the whole slide in one tile, as a viewer asks the top of the pyramid
    top = client.get(f"/iiif/3/{sid}/full/188,132/0/default.jpg")
    assert top.content == client.get(f"/slides/{sid}/native_files/{full - 4}/0_0.jpeg").content


def reference_pixels(slide: Path, region: tuple[int, int, int, int], size: tuple[int, int]
                     ) -> np.ndarray:
    """OpenSlide's pixels of a level-0 region, resampled like the server (Lanczos)."""
    x, y, w, h = region
    with OpenSlide(str(slide)) as s:
        img = s.read_region((x, y), 0, (w, h)).convert("RGB")
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS))


def test_rendered_images_have_the_slides_pixels(app: tuple[Any, str], svs: Path) -> None:
    client, sid = app
    for region, size in [((1001, 333, 517, 251), (517, 251)), ((100, 100, 1500, 900), (500, 300)),
                         ((2900, 2000, 500, 500), (100, 100)), ((10, 10, 60, 40), (150, 100))]:
        x, y, w, h = region
        up = "^" if size[0] > w else ""
        r = client.get(f"/iiif/3/{sid}/{x},{y},{w},{h}/{up}{size[0]},{size[1]}/0/default.png")
        assert r.status_code == 200, r.text
        assert r.headers["x-tile-source"] == "rendered"
        got = decode(r.content)
        cropped = (min(w, 3000 - x), min(h, 2100 - y))
        want = reference_pixels(svs / "slide.svs", (x, y, *cropped), size)
        assert got.shape == want.shape == (size[1], size[0], 3)
        assert mad(got, want) < 4, region


def test_rotation_mirroring_and_qualities(app: tuple[Any, str]) -> None:
    client, sid = app
    base = f"/iiif/3/{sid}/300,200,800,600/400,300"

    def get(rotation: str, quality_format: str) -> np.ndarray:
        r = client.get(f"{base}/{rotation}/{quality_format}")
        assert r.status_code == 200, r.text
        return decode(r.content)

    plain = get("0", "default.png")
    assert plain.shape == (300, 400, 3)
    assert (get("0", "color.png") == plain).all()
    assert (get("90", "default.png") == np.rot90(plain, -1)).all()
    assert (get("180", "default.png") == np.rot90(plain, 2)).all()
    assert (get("270", "default.png") == np.rot90(plain, 1)).all()
    assert (get("!0", "default.png") == plain[:, ::-1]).all()
    assert (get("!90", "default.png") == np.rot90(plain[:, ::-1], -1)).all()
    grey = get("0", "gray.png")
    assert grey.shape == (300, 400)
    assert (grey == np.asarray(Image.fromarray(plain).convert("L"))).all()
    bitonal = get("0", "bitonal.png")
    assert set(np.unique(bitonal)) <= {0, 255} and (bitonal == np.where(grey >= 128, 255, 0)).all()
    # any angle: the bounding box of the rotated image, transparent corners in PNG
    turned = get("30", "default.png")
    assert turned.shape[2] == 4 and turned[0, 0, 3] == 0 and turned[150, 200, 3] == 255
    assert abs(turned.shape[1] - (400 * 0.866 + 300 * 0.5)) <= 2
    assert abs(turned.shape[0] - (300 * 0.866 + 400 * 0.5)) <= 2
    jpeg = get("30", "default.jpg")
    assert jpeg.shape[2] == 3 and jpeg[0, 0].min() > 230  # corners: the slide's background
    # WebP and grey JPEG
    webp = client.get(f"{base}/0/default.webp")
    assert webp.headers["content-type"] == "image/webp"
    assert webp.content[:4] == b"RIFF" and webp.content[8:12] == b"WEBP"
    assert mad(decode(webp.content), plain) < 6
    assert decode(client.get(f"{base}/0/gray.jpg").content).ndim == 2


BAD = [
    # (path after /iiif/3/{id}, status)
    ("/full/max/0/default.gif", 400), ("/full/max/0/default.tif", 400),
    ("/full/max/0/default.pdf", 400), ("/full/max/0/default", 400),
    ("/full/max/0/native.jpg", 400), ("/full/max/0/grey.jpg", 400),
    ("/full/max/0/default.JPG", 400), ("/full/full/0/default.jpg", 400),
    ("/full/0,/0/default.jpg", 400), ("/full/,0/0/default.jpg", 400),
    ("/full/-10,/0/default.jpg", 400), ("/full/3001,/0/default.jpg", 400),
    ("/full/,2101/0/default.jpg", 400), ("/full/pct:101/0/default.jpg", 400),
    ("/full/pct:0/0/default.jpg", 400), ("/full/!3001,5000/0/default.jpg", 400),
    ("/full/^pct:100000000/0/default.jpg", 400), ("/full/^20000,/0/default.jpg", 400),
    ("/0,0,0,10/max/0/default.jpg", 400), ("/0,0,10,0/max/0/default.jpg", 400),
    ("/-1,0,10,10/max/0/default.jpg", 400), ("/3000,0,10,10/max/0/default.jpg", 400),
    ("/0,2100,10,10/max/0/default.jpg", 400), ("/pct:100,0,10,10/max/0/default.jpg", 400),
    ("/pct:0,0,1e3,10/max/0/default.jpg", 400),
    ("/pct:0,0,99999999999999999999,10/max/0/default.jpg", 400),
    ("/pct:0,0,0.0001,10/max/0/default.jpg", 400), ("/1.5,0,10,10/max/0/default.jpg", 400),
    ("/full/max/-90/default.jpg", 400), ("/full/max/361/default.jpg", 400),
    ("/full/max/90deg/default.jpg", 400), ("/full/max/!!90/default.jpg", 400),
    ("/nonsense/max/0/default.jpg", 400), ("/full/max/0/default.jpg.exe", 400),
    ("/full//0/default.jpg", 404), ("/full/max/0", 404), ("/full/max", 404),
    ("/full/max/0/default.jpg/more", 404), ("/info.xml", 404), ("/manifest", 404),
]


@pytest.mark.parametrize(("tail", "status"), BAD)
def test_bad_requests_get_json_errors(app: tuple[Any, str], tail: str, status: int) -> None:
    client, sid = app
    r = client.get(f"/iiif/3/{sid}{tail}")
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error", "detail"}
    assert r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("identifier", [
    "NO_SUCH_SLIDE_00", "..", "%2E%2E", "a%2Fb", "x" * 65, "x" * 5000, "[frob]", "%5Bfrob%5D",
    "ab%00cd", "{id}%2F..%2F{id}", "{id}%2Ffull", "..%2F{id}", "%2E%2E%2F{id}",
])
def test_unknown_or_malformed_identifiers_are_404(app: tuple[Any, str], identifier: str
                                                  ) -> None:
    client, sid = app
    ident = identifier.replace("{id}", sid)
    for tail in ("/info.json", "/full/max/0/default.jpg", "/manifest.json", ""):
        r = client.get(f"/iiif/3/{ident}{tail}", follow_redirects=False)
        assert r.status_code == 404, (ident, tail, r.status_code)
        assert set(r.json()) == {"error", "detail"}


def test_escaped_identifier_characters_name_the_slide(app: tuple[Any, str]) -> None:
    client, sid = app
    escaped = "".join(f"%{ord(c):02X}" for c in sid)
    assert client.get(f"/iiif/3/{escaped}/info.json").json()["id"].endswith(f"/iiif/3/{sid}")
    assert client.get(f"/iiif/3/{escaped}/full/max/0/default.jpg").status_code == 200


def test_no_error_reaches_a_stack_trace(app: tuple[Any, str]) -> None:
    client, sid = app
    rng = random.Random(7)
    alphabet = "0123456789,.:!^-pctfulmaxsqre%/ "
    for _ in range(400):
        parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
                 for _ in range(4)]
        r = client.get(f"/iiif/3/{sid}/" + "/".join(quote(p, safe=",:!^%") for p in parts))
        assert r.status_code in (200, 400, 404, 501), (parts, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()) == {"error", "detail"}, parts


def test_too_large_a_read_is_501(app: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    client, sid = app
    monkeypatch.setattr(tiles_mod, "MAX_IMAGE_SOURCE_PIXELS", 500 * 500)
    r = client.get(f"/iiif/3/{sid}/0,0,2000,2000/1000,1000/0/default.jpg")
    assert r.status_code == 501
    assert r.json()["error"] == "not_implemented"
    assert client.get(f"/iiif/3/{sid}/full/200,140/0/default.jpg").status_code == 200


def test_limits_are_configurable(make_client: Any, svs: Path) -> None:
    client = make_client(paths=(svs,), iiif_max_width=2048, iiif_max_area=2048 * 1536)
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    info = client.get(f"/iiif/3/{sid}/info.json").json()
    assert (info["maxWidth"], info["maxHeight"], info["maxArea"]) == (2048, 2048, 2048 * 1536)
    assert all(s["width"] <= 2048 for s in info["sizes"])
    full = decode(client.get(f"/iiif/3/{sid}/full/max/0/default.jpg").content)
    assert full.shape[1] * full.shape[0] <= 2048 * 1536 and full.shape[1] >= 2040
    assert client.get(f"/iiif/3/{sid}/full/2100,/0/default.jpg").status_code == 400
    up = decode(client.get(f"/iiif/3/{sid}/0,0,100,100/^max/0/default.jpg").content)
    assert up.shape[:2] == (1773, 1773)  # a square: maxArea binds, sqrt(2048 * 1536)


def test_cors_on_every_iiif_response(make_client: Any, svs: Path) -> None:
    client = make_client(paths=(svs,))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    for url in (f"/iiif/3/{sid}/info.json", f"/iiif/3/{sid}/full/100,/0/default.jpg",
                f"/iiif/3/{sid}/manifest.json", "/iiif/3/NO_SUCH_SLIDE_00/info.json",
                f"/iiif/3/{sid}/full/max/0/default.tif"):
        r = client.get(url, headers={"Origin": "https://viewer.example"})
        assert r.headers["access-control-allow-origin"] == "*", url
        assert "Link" in r.headers["access-control-expose-headers"]
    preflight = client.options(f"/iiif/3/{sid}/info.json", headers={
        "Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "x-requested-with"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "GET" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "x-requested-with"
    assert "access-control-allow-origin" not in client.get("/api/slides").headers
    not_preflight = client.options(f"/iiif/3/{sid}/info.json")
    assert not_preflight.status_code == 405 and set(not_preflight.json()) == {"error", "detail"}
    head = client.head(f"/iiif/3/{sid}/full/100,/0/default.jpg")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["access-control-allow-origin"] == "*" and "link" in head.headers


def test_cors_origins_are_configurable(make_client: Any, svs: Path) -> None:
    listed = make_client(paths=(svs,), iiif_cors_origins=("https://viewer.example",))
    sid = listed.get("/api/slides").json()["slides"][0]["id"]
    url = f"/iiif/3/{sid}/info.json"
    ok = listed.get(url, headers={"Origin": "https://viewer.example"})
    assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
    assert "Origin" in ok.headers["vary"]
    other = listed.get(url, headers={"Origin": "https://elsewhere.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert "Origin" in other.headers["vary"]  # no shared cache mixes the two answers
    none = make_client(paths=(svs,), iiif_cors_origins=())
    assert "access-control-allow-origin" not in none.get(url, headers={"Origin": "https://a"}).headers


def test_manifest(app: tuple[Any, str]) -> None:
    client, sid = app
    r = client.get(f"/iiif/3/{sid}/manifest.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == \
        'application/ld+json;profile="http://iiif.io/api/presentation/3/context.json"'
    doc = r.json()
    assert doc["id"] == f"http://testserver/iiif/3/{sid}/manifest.json"
    assert doc["label"] == {"none": ["slide.svs"]}
    (canvas,) = doc["items"]
    assert (canvas["width"], canvas["height"]) == (3000, 2100)
    body = canvas["items"][0]["items"][0]["body"]
    service = body["service"][0]
    assert service["id"] == f"http://testserver/iiif/3/{sid}"
    assert client.get(service["id"] + "/info.json").status_code == 200
    assert client.get(body["id"]).status_code == 200
    (thumb,) = doc["thumbnail"]
    assert decode(client.get(thumb["id"]).content).shape[:2] == (thumb["height"], thumb["width"])
    facts = {m["label"]["en"][0]: m["value"]["none"][0] for m in doc["metadata"]}
    assert facts["Dimensions"] == "3,000 × 2,100 px"
    assert "0.25" in facts["Resolution"] and facts["Objective"] == "40×"
    assert f"/api/slides/{sid}/associated/label?v=" in facts["Slide label"]
    label_url = facts["Slide label"].split('src="', 1)[1].split('"', 1)[0]
    assert client.get(label_url.removeprefix("http://testserver")).status_code == 200


def test_manifest_withholds_label_and_macro_when_the_server_does(
    make_client: Any, svs: Path
) -> None:
    client = make_client(paths=(svs,), hide_associated=True)
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    doc = client.get(f"/iiif/3/{sid}/manifest.json").json()
    labels = [m["label"]["en"][0] for m in doc["metadata"]]
    assert "Slide label" not in labels and not any("Macro" in x for x in labels)
    assert "associated" not in str(doc)


def test_a_slide_one_may_not_see_is_404_on_every_iiif_route(
    tmp_path: Path, synthetic_slides: dict[str, Path], jwks_server: JwksServer
) -> None:
    lib = make_library(tmp_path / "lib", synthetic_slides)
    with running(oidc_settings(tmp_path, lib, jwks_server), jwks_server) as kit:
        bea = kit.bearer("bea", [BHAM])
        bob = kit.bearer("bob", [LEEDS])
        ids = kit.ids(bea)  # a.svs (birmingham), b.tiff (solihull)
        mine = ids["a.svs"]
        tails = ["/info.json", "/full/max/0/default.jpg", "/0,0,256,256/256,256/0/default.jpg",
                 "/manifest.json", ""]
        for tail in tails:
            ok = kit.get(f"/iiif/3/{mine}{tail}", bea)
            assert ok.status_code in (200, 303), (tail, ok.text)
            missing = kit.get(f"/iiif/3/AAAAAAAAAAAAAAAA{tail}", bob)
            for who in (bob, ANONYMOUS):
                r = kit.get(f"/iiif/3/{mine}{tail}", who)
                assert r.status_code in (401, 404), (who.label, tail)
                if who is bob:
                    assert (r.status_code, r.content) == (missing.status_code, missing.content)
                assert "etag" not in r.headers and "link" not in r.headers
                assert b"3000" not in r.content and b"2100" not in r.content
