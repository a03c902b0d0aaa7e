"""Ingest against the running server: latency from the last byte written to the slide being
listed by ``/api/slides``, and throughput when many scans are dropped at once.

- latency: 20 synthetic SVS scans written one after the other into the watch folder (each
  written in chunks, then closed); the clock stops when ``/api/slides`` lists it. The
  reference is the settle time itself (a scan cannot be taken before it): the table shows
  the overhead above it and the ratio to it. Run with filesystem events (watchfiles) and
  with polling only (``--ingest-poll``, the network-filesystem mode).
- throughput: 100 small scans renamed into the watch folder at once; time until all are
  listed, and scans per second once the settle time has passed.

    python -m benchmarks.bench_ingest [--settle 2] [--scans 20] [--burst 100]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import LiveServer, machine, markdown_table, percentile
from sample_slides import write_svs_like


def _listed(srv: LiveServer) -> set[str]:
    body = srv.json("/api/slides")
    assert isinstance(body, dict)
    return {s["name"] for s in body["slides"]}


def _make_scans(folder: Path, prefix: str, n: int, w: int, h: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_svs_like(folder / f"{prefix}-{i:03d}.svs", w + i, h, tile=256,
                       downsamples=(1, 4) if w >= 1024 else (1,), seed=i, associated=False)
        for i in range(n)
    ]


def latency(tmp: Path, settle: float, scans: int, poll: bool) -> list[float]:
    mode = "poll" if poll else "events"
    lib, watch = tmp / f"lib-{mode}", tmp / f"watch-{mode}"
    lib.mkdir()
    sources = _make_scans(tmp / f"src-{mode}", "lat", scans, 1200, 900)
    flags = ["--ingest", str(watch), "--ingest-settle-seconds", str(settle),
             "--rescan-seconds", "0", *(["--ingest-poll"] if poll else [])]
    out: list[float] = []
    with LiveServer([lib], *flags) as srv:
        for src in sources:
            data = src.read_bytes()
            step = len(data) // 8 + 1
            with open(watch / src.name, "wb") as fh:
                for i in range(0, len(data), step):
                    if i:
                        time.sleep(0.02)
                    fh.write(data[i:i + step])
                    fh.flush()
            last_byte = time.monotonic()
            while src.name not in _listed(srv):
                time.sleep(0.01)
            out.append(time.monotonic() - last_byte)
    return out


def throughput(tmp: Path, settle: float, burst: int) -> tuple[float, float]:
    lib, watch = tmp / "lib-burst", tmp / "watch-burst"
    lib.mkdir()
    watch.mkdir()
    sources = _make_scans(tmp / "src-burst", "burst", burst, 300, 200)
    flags = ["--ingest", str(watch), "--ingest-settle-seconds", str(settle),
             "--rescan-seconds", "0"]
    names = {s.name for s in sources}
    with LiveServer([lib], *flags) as srv:
        t0 = time.monotonic()
        for src in sources:
            os.rename(src, watch / src.name)
        while not names <= _listed(srv):
            time.sleep(0.02)
        total = time.monotonic() - t0
        report = srv.json("/api/ingest")
        assert isinstance(report, dict)
        assert not report["failures"], json.dumps(report["failures"])[:500]
    return total, burst / max(total - settle, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--scans", type=int, default=20)
    ap.add_argument("--burst", type=int, default=100)
    args = ap.parse_args()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        tmp = Path(d)
        for poll in (False, True):
            lat = latency(tmp, args.settle, args.scans, poll)
            p50, p95 = percentile(lat, 50), percentile(lat, 95)
            rows.append([
                f"latency, {'polling only' if poll else 'fs events + polling'}",
                f"{args.scans} scans of 1200x900", f"{p50:.2f} s", f"{p95:.2f} s",
                f"+{p50 - args.settle:.2f} s / +{p95 - args.settle:.2f} s",
                f"{p50 / args.settle:.2f}x / {p95 / args.settle:.2f}x",
            ])
        total, rate = throughput(tmp, args.settle, args.burst)
        rows.append([
            "throughput, dropped at once", f"{args.burst} scans of 300x200",
            f"all listed after {total:.2f} s", f"{rate:.1f} scans/s after settle", "", "",
        ])
    print(f"Ingest, settle time {args.settle:g} s ({machine()})\n")
    print(markdown_table(
        ["measure", "scans", "p50", "p95", "over settle (p50 / p95)",
         "ratio to settle (p50 / p95)"], rows,
    ))


if __name__ == "__main__":
    main()
