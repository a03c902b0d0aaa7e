"""The benchmark-only ceiling route: absent unless enabled, and when enabled it answers
like a tile (same headers, the asked number of bytes) without doing a tile's work."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def test_bench_route_is_not_mounted_by_default(make_client: Any, synthetic_dir: Path) -> None:
    client = make_client(paths=(synthetic_dir,))
    r = client.get("/bench/bytes/100")
    assert r.status_code == 404
    assert set(r.json()) == {"error", "detail"}


def test_bench_route_returns_n_bytes_with_tile_headers(
    make_client: Any, synthetic_slides: dict[str, Path]
) -> None:
    client = make_client(paths=(synthetic_slides["aperio-rgb"],), bench_routes=True)
    (entry,) = client.get("/api/slides").json()["slides"]
    tile = client.get(f"/slides/{entry['id']}/native_files/12/1_1.jpeg")
    assert tile.status_code == 200
    n = len(tile.content)
    r = client.get(f"/bench/bytes/{n}")
    assert r.status_code == 200
    assert len(r.content) == n
    assert r.headers["content-type"] == tile.headers["content-type"]
    assert set(tile.headers) == set(r.headers)
    assert client.get("/bench/bytes/0").content == b""
    assert client.get("/bench/bytes/99999999").status_code == 400
    assert client.get("/bench/bytes/-1").status_code == 400
