"""The Redis tier against a real redis-server: sharing, identity, TTL, per-tier metrics,
warm-up, and faults (refused, killed and restarted mid-load, paused, full) that must
never fail a tile."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.redis_server import RedisServer, free_port
from wsi_server.cache.redis import KEY_PREFIX

pytestmark = pytest.mark.redis
FAULT_LOG = "redis tile cache fault"


@pytest.fixture
def make_client(make_client: Any) -> Any:
    """Apps whose Redis timeout a busy 2-core CI machine cannot trip by accident (a
    connect over 50 ms would be a fault, i.e. a miss); the timeout test sets its own."""

    def make(**kw: Any) -> Any:
        kw.setdefault("redis_timeout", 1.0)
        return make_client(**kw)

    return make


@pytest.fixture
def library(tmp_path: Path, synthetic_slides: dict[str, Path]) -> Path:
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(synthetic_slides["aperio-rgb"], lib / "slide.svs")
    return lib


def _sid(client: Any) -> str:
    return str(client.get("/api/slides").json()["slides"][0]["id"])


def _levels(client: Any, sid: str, kind: str) -> list[tuple[int, int]]:
    """(columns, rows) of every DZ level, from the descriptor the server publishes."""
    path = f"/slides/{sid}.dzi" if kind == "default" else f"/slides/{sid}/native.dzi"
    xml = client.get(path).text
    w, h = (int(v) for v in re.search(r'Width="(\d+)" Height="(\d+)"', xml).groups())  # type: ignore[union-attr]
    size = int(re.search(r'TileSize="(\d+)"', xml).group(1))  # type: ignore[union-attr]
    dims = [(w, h)]
    while dims[-1] != (1, 1):
        dims.append((max(1, math.ceil(dims[-1][0] / 2)), max(1, math.ceil(dims[-1][1] / 2))))
    return [(math.ceil(a / size), math.ceil(b / size)) for a, b in reversed(dims)]


def _tile_urls(client: Any, sid: str, kind: str, levels: int) -> list[str]:
    base = f"/slides/{sid}_files" if kind == "default" else f"/slides/{sid}/native_files"
    return [
        f"{base}/{lv}/{c}_{r}.jpeg"
        for lv, (cols, rows) in enumerate(_levels(client, sid, kind)[:levels])
        for r in range(rows)
        for c in range(cols)
    ]


def _metric(client: Any, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            total += float(m.group(2))
    return total


# -- sharing and identity ----------------------------------------------------------
def test_a_tile_rendered_by_one_process_is_a_redis_hit_in_another(
    make_client: Any, library: Path, redis_url: str
) -> None:
    one = make_client(paths=(library,), redis_url=redis_url)
    two = make_client(paths=(library,), redis_url=redis_url)
    sid = _sid(one)
    url = f"/slides/{sid}_files/10/1_1.jpeg"
    first = one.get(url)
    assert first.status_code == 200 and first.headers["x-tile-source"] == "rendered"
    assert first.headers["server-timing"].startswith("rendered;dur=")
    again = one.get(url)
    assert again.headers["x-tile-source"] == "memory"
    other = two.get(url)
    assert other.headers["x-tile-source"] == "redis"
    assert other.content == first.content
    assert other.headers["etag"] == first.headers["etag"]
    assert two.get(url).headers["x-tile-source"] == "memory"  # promoted to the front
    # metrics are labelled by tier and by how the tile was produced
    assert _metric(two, "wsi_cache_requests_total", tier="redis", result="hit") == 1
    assert _metric(two, "wsi_cache_requests_total", tier="memory", result="hit") == 1
    assert _metric(two, "wsi_cache_requests_total", tier="memory", result="miss") == 1
    assert _metric(two, "wsi_tile_seconds_count", source="redis") == 1
    assert _metric(one, "wsi_tile_seconds_count", source="rendered") == 1


def test_redis_only_without_front_tier(make_client: Any, library: Path, redis_url: str) -> None:
    client = make_client(paths=(library,), redis_url=redis_url, cache_size=0)
    url = f"/slides/{_sid(client)}/native_files/12/0_0.jpeg"
    assert client.get(url).headers["x-tile-source"] == "passthrough"
    assert client.get(url).headers["x-tile-source"] == "redis"


def test_replaced_slide_never_serves_a_stale_tile(
    make_client: Any, library: Path, redis_url: str, synthetic_slides: dict[str, Path]
) -> None:
    one = make_client(paths=(library,), redis_url=redis_url)
    two = make_client(paths=(library,), redis_url=redis_url)
    sid = _sid(one)
    url = f"/slides/{sid}_files/9/0_0.jpeg"
    before = one.get(url)
    assert two.get(url).headers["x-tile-source"] == "redis"
    # Replace the file in place with a different slide: new bytes, new fingerprint.
    tmp = library / "new.tmp"
    shutil.copy(synthetic_slides["generic"], tmp)
    tmp.replace(library / "slide.svs")
    time.sleep(1.1)  # the library re-checks fingerprints at most once a second
    for client in (one, two):
        after = client.get(url)
        assert after.status_code == 200
        assert after.headers["x-tile-source"] in ("rendered", "redis")
        assert after.content != before.content
        assert after.headers["etag"] != before.headers["etag"]


def test_ttl_and_item_size_guard(make_client: Any, library: Path, redis_server: RedisServer,
                                 redis_url: str) -> None:
    client = make_client(paths=(library,), redis_url=redis_url, cache_ttl=30, cache_item_max=4)
    sid = _sid(client)
    sizes = [len(client.get(u).content) for u in _tile_urls(client, sid, "native", 13)]
    small = sum(1 for n in sizes if n <= 4096)
    assert 0 < small < len(sizes)  # some tiles on each side of the guard
    r = redis_server.client()
    keys = r.keys(KEY_PREFIX + "*")
    assert len(keys) == small  # the bigger tiles were not stored
    assert all(0 < r.pttl(k) <= 30_000 for k in keys)


def test_warm_route_fills_redis_for_every_worker(
    make_client: Any, library: Path, redis_url: str
) -> None:
    one = make_client(paths=(library,), redis_url=redis_url)
    sid = _sid(one)
    r = one.post(f"/api/slides/{sid}/warm?levels=10")
    assert r.status_code == 200
    urls = _tile_urls(one, sid, "default", 10) + _tile_urls(one, sid, "native", 10)
    report = r.json()
    assert report["tiles"] == len(urls)
    assert sum(report["sources"].values()) == len(urls)
    two = make_client(paths=(library,), redis_url=redis_url)
    assert {two.get(u).headers["x-tile-source"] for u in urls} == {"redis"}
    assert one.post(f"/api/slides/{sid}/warm?levels=10").json()["sources"] == {
        "memory": len(urls)
    }
    assert one.post(f"/api/slides/{sid}/warm?levels=0").status_code == 400
    assert one.post("/api/slides/nope/warm").status_code == 404


# -- faults ----------------------------------------------------------------------
def test_connection_refused_is_a_miss_and_readyz_degraded(
    make_client: Any, library: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = make_client(paths=(library,), redis_url=dead)
    strict = make_client(paths=(library,), redis_url=dead, require_redis=True)
    sid = _sid(client)
    with caplog.at_level(logging.WARNING, logger="wsi_server.cache.redis"):
        for url in _tile_urls(client, sid, "default", 11):
            r = client.get(url)
            assert r.status_code == 200, url
            assert r.headers["x-tile-source"] == "rendered"
    assert sum(FAULT_LOG in m for m in caplog.messages) == 1
    assert _metric(client, "wsi_cache_requests_total", tier="redis", result="error") >= 1
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert "Redis" in ready.json()["cache"]["reason"]
    assert strict.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_redis_killed_and_restarted_mid_load(
    make_client: Any, library: Path, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(paths=(library,), redis_url=own_redis.url, cache_size=0)
    sid = _sid(client)
    urls = _tile_urls(client, sid, "default", 12) + _tile_urls(client, sid, "native", 12)
    assert len(urls) > 60
    statuses = []
    with caplog.at_level(logging.WARNING, logger="wsi_server.cache.redis"):
        for i, url in enumerate(urls):
            if i == 20:
                own_redis.kill()
            if i == 40:
                own_redis.start()
            statuses.append(client.get(url).status_code)
        assert statuses == [200] * len(urls)
        assert sum(FAULT_LOG in m for m in caplog.messages) == 1
        # Reconnection is automatic: once the back-off has passed, tiles reach Redis again.
        time.sleep(1.1)
        for url in urls[:5]:
            assert client.get(url).status_code == 200
        assert own_redis.client().dbsize() >= 5
        assert client.get(urls[0]).headers["x-tile-source"] == "redis"
    assert client.get("/readyz").json()["status"] == "ready"


def test_paused_redis_times_out_fast(
    make_client: Any, library: Path, own_redis: RedisServer
) -> None:
    client = make_client(paths=(library,), redis_url=own_redis.url, redis_timeout=0.05)
    sid = _sid(client)
    urls = _tile_urls(client, sid, "default", 11)
    own_redis.pause()
    try:
        worst = 0.0
        for url in urls:
            t0 = time.perf_counter()
            assert client.get(url).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
        # one 50 ms timeout, then Redis is bypassed: no request hangs on the paused Redis
        # (without the timeout each would wait for ever; the bound leaves room for a busy
        # CI machine, it is not a speed target)
        assert worst < 2.0
        t0 = time.perf_counter()
        assert client.get("/readyz").json()["status"] == "degraded"
        assert time.perf_counter() - t0 < 2.0
    finally:
        own_redis.resume()
    assert client.get("/readyz").json()["status"] == "ready"


def test_full_redis_is_a_miss_and_reads_continue(
    make_client: Any, library: Path, own_redis: RedisServer
) -> None:
    client = make_client(paths=(library,), redis_url=own_redis.url, cache_size=0)
    sid = _sid(client)
    stored = f"/slides/{sid}_files/8/0_0.jpeg"
    client.get(stored)
    r = own_redis.client()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    try:
        urls = _tile_urls(client, sid, "default", 11)
        assert {client.get(u).status_code for u in urls} == {200}
        assert r.dbsize() == 1
        errors = _metric(client, "wsi_cache_requests_total", tier="redis", result="error")
        assert errors >= len(urls) - 1
        # a write refused for lack of memory does not stop reads from Redis
        assert client.get(stored).headers["x-tile-source"] == "redis"
    finally:
        r.config_set("maxmemory", "0")


def test_warm_command_fills_the_cache_the_server_reads(
    make_client: Any, library: Path, redis_url: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wsi_server.cli import main

    monkeypatch.setenv("WSI_REDIS_TIMEOUT", "1.0")  # see make_client above

    slide = library / "slide.svs"
    assert main(["warm", str(slide), "--levels", "9", "--redis-url", redis_url]) == 0
    report = json.loads(capsys.readouterr().out)
    client = make_client(paths=(library,), redis_url=redis_url)
    sid = _sid(client)
    urls = _tile_urls(client, sid, "default", 9) + _tile_urls(client, sid, "native", 9)
    assert report["slide"] == sid and report["tiles"] == len(urls)
    assert {client.get(u).headers["x-tile-source"] for u in urls} == {"redis"}
    # by id under the library, and refusals
    assert main(["warm", sid, "--library", str(library), "--redis-url", redis_url,
                 "--levels", "9"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == {"redis": len(urls)}
    assert main(["warm", "no-such-id", "--library", str(library), "--redis-url",
                 redis_url]) == 1
    assert main(["warm", str(slide)]) == 2


async def test_concurrent_lookups_share_one_mget(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from wsi_server.cache.redis import RedisCache

    cache = RedisCache(redis_url, timeout=1.0)
    values = {f"k{i}": bytes([i]) * (100 + i) for i in range(40)}
    for key, value in values.items():
        await cache.set(key, value)
    admin = aioredis.Redis.from_url(redis_url)
    await admin.config_resetstat()
    keys = [*values, "missing", "k3", "k3"]
    got = await asyncio.gather(*(cache.get(k) for k in keys))
    assert got == [values.get(k) for k in keys]
    stats = await admin.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats
    await admin.aclose()
    await cache.close()
