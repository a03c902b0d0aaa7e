"""What opening a never-opened slide costs when it is first checked in an isolated process
(``--isolate-open``), against opening it in the server's own process.

For each kind of slide, copies that no process has opened (each a new file, so a new
fingerprint; the bytes are in the OS page cache, as a freshly scanned library's are):

- ``in process``: ``Library`` opens the slide itself (``ReaderPool.get``: the registry picks
  a backend, which reads the metadata) — what the server does without isolation;
- ``isolated check``: the warm validator process opens it and decodes the first, middle
  and last regions of the finest and coarsest levels, the stored tile (0, 0) and every
  associated image (``IsolatedProbe``, one round trip over a pipe);
- ``isolated, total``: the check, then the in-process open (what the server does with
  isolation: the slide is served by the server's own reader once it passed).

Also: the validator's cold start (process spawn and imports, paid once per server process)
and a whole library scan (``Library.scan`` of N slides, as at server start) both ways, and
with the verdicts of an earlier run remembered (a restart: no slide is probed again).

    python -m benchmarks.bench_isolation [--repeat 15] [--library 100]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import ROOT, bench_slide, fmt_num, machine, markdown_table, percentile
from sample_slides import write_generic_tiff, write_svs_like
from wsi_server.context import IsolatedProbe
from wsi_server.library import Library, fingerprint
from wsi_server.pool import ReaderPool
from wsi_server.readers import default_registry

SHARED = ROOT.parent / "shared" / "slides"


def kinds(work: Path) -> dict[str, Path]:
    """The slides measured: synthetic ones always, the real scanner files when present."""
    work.mkdir(parents=True, exist_ok=True)
    out = {
        "SVS-like 24000x18000 (104 MB)": bench_slide(),
        "SVS-like 3000x2000": write_svs_like(work / "small.svs", 3000, 2000),
        "generic TIFF (zlib) 2000x1500": write_generic_tiff(
            work / "generic.tiff", 2000, 1500, compression="zlib", photometric="rgb"),
    }
    from wsi_server.convert import convert_slide

    store = work / "small.zarr"
    convert_slide(out["SVS-like 3000x2000"], store)
    out["zarr store 3000x2000"] = store
    for name, rel in (("real SVS (CMU-1-Small-Region)", "svs/CMU-1-Small-Region.svs"),
                      ("real NDPI (7 levels)", "ndpi/test3-DAPI-2-(387).ndpi"),
                      ("real DICOM folder", "dicom/wsi2dcm-jpeg")):
        if (SHARED / rel).exists():
            out[name] = SHARED / rel
    return out


def fresh_copy(src: Path, dest: Path) -> Path:
    """A never-opened slide with ``src``'s bytes (a symlink for the big slide: a new path
    is a new fingerprint, and nothing in this process has opened it)."""
    if src.is_dir():
        shutil.copytree(src, dest)
    elif src.stat().st_size > 32 * 2**20:
        dest.symlink_to(src)
    else:
        shutil.copyfile(src, dest)
    return dest


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_slide(work: Path, slides: dict[str, Path], repeat: int) -> list[list[object]]:
    probe = IsolatedProbe(timeout=120)
    rows: list[list[object]] = []
    try:
        cold = timed(lambda: probe(next(iter(slides.values()))))
        for name, src in slides.items():
            inproc: list[float] = []
            check: list[float] = []
            total: list[float] = []
            for i in range(repeat):
                copy = fresh_copy(src, work / f"{i}-{abs(hash(name))}{src.suffix}")
                fp = fingerprint(copy)[0]
                pool = ReaderPool(default_registry())
                t_check = timed(lambda c=copy: _assert_ok(probe(c), c))  # type: ignore[misc]
                t_open = timed(lambda c=copy, f=fp, p=pool: p.get(c, f))  # type: ignore[misc]
                copy2 = fresh_copy(src, work / f"{i}-b-{abs(hash(name))}{src.suffix}")
                pool2 = ReaderPool(default_registry())
                fp2 = fingerprint(copy2)[0]
                inproc.append(timed(lambda c=copy2, f=fp2, p=pool2: p.get(c, f)))  # type: ignore[misc]
                check.append(t_check)
                total.append(t_check + t_open)
            p50_in, p50_total = percentile(inproc, 50), percentile(total, 50)
            rows.append([name, repeat, p50_in * 1e3, percentile(check, 50) * 1e3,
                         p50_total * 1e3, percentile(total, 95) * 1e3,
                         f"+{fmt_num((p50_total - p50_in) * 1e3)} ms",
                         f"{p50_total / p50_in:.1f}x"])
    finally:
        probe.close()
    rows.append(["validator cold start (once per server process)", 1, "–", cold * 1e3, "–", "–",
                 "–", "–"])
    return rows


def _assert_ok(error: object, path: Path) -> None:
    if error is not None:
        raise RuntimeError(f"the validator refused {path}: {error}")


def library_scan(work: Path, src: Path, n: int) -> list[list[object]]:
    """``Library.scan`` of ``n`` never-opened copies of ``src``: in process, isolated, and
    isolated after a restart (verdicts remembered in the state folder)."""
    rows: list[list[object]] = []
    state = work / "state"
    state.mkdir(exist_ok=True)
    for mode in ("in process", "isolated (first scan)", "isolated (restart: remembered)"):
        lib = work / ("lib-" + mode.split()[0]) if mode != "isolated (restart: remembered)" \
            else work / "lib-isolated"
        if not lib.exists():
            lib.mkdir()
            for i in range(n):
                fresh_copy(src, lib / f"slide-{i:04d}{src.suffix}")
        probe = None if mode == "in process" else IsolatedProbe(120, state_dir=state)
        try:
            if probe is not None:
                probe(src)  # the validator's cold start is not part of the scan's cost
            library = Library([lib], ReaderPool(default_registry(), n + 1), probe=probe)
            seconds = timed(library.scan)
            ok = sum(1 for e in library.entries() if e.error is None)
            assert ok == n, f"{n - ok} slides refused"
        finally:
            if probe is not None:
                probe.close()
        rows.append([mode, n, seconds, n / seconds, seconds / n * 1e3])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15, help="never-opened copies per slide kind")
    ap.add_argument("--library", type=int, default=100, help="slides in the scanned library")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as d:
        work = Path(d)
        slides = kinds(work / "seeds")
        rows = per_slide(work, slides, args.repeat)
        scan = library_scan(work, slides["SVS-like 3000x2000"], args.library)
    print(f"### Opening a never-opened slide: in process vs isolated check first ({machine()})\n")
    print(markdown_table(
        ["slide", "copies", "in process p50 ms", "isolated check p50 ms",
         "isolated, total p50 ms", "isolated, total p95 ms", "cost of isolation (p50)",
         "total / in process"], rows))
    print(f"\n### Library scan at server start: {args.library} never-opened SVS-like "
          "3000x2000 slides\n")
    print(markdown_table(["scan", "slides", "seconds", "slides/s", "ms per slide"], scan))


if __name__ == "__main__":
    main()
