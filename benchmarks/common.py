"""Helpers shared by the benchmarks: the benchmark slide, statistics and tables, and a
live server on a free loopback port.

- ``bench_slide(width, height)`` writes (once) and returns an SVS-like slide in
  ``benchmarks/out/`` (gitignored); later runs reuse it.
- ``Stats.of(seconds)`` and ``markdown_table(header, rows)`` summarise latencies.
- ``LiveServer(paths, *flags)`` runs ``python -m wsi_server serve`` as a subprocess on a
  free loopback port, waits for ``/readyz`` and stops it on exit (a context manager).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("WSI_BENCH_OUT", ROOT / "benchmarks" / "out"))


# Pixel-scale grain in the tissue makes the generated JPEG tiles as heavy as a scanner's
# (~20 kB per 256-px tile), so decoding costs what it costs on real slides.
GRAIN = 14.0


def bench_slide(
    width: int = 24000,
    height: int = 18000,
    tile: int = 256,
    downsamples: Sequence[int] = (1, 4, 16),
    out: Path = OUT,
) -> Path:
    """An SVS-like slide (JPEG q90 tiles, Aperio levels) in its own folder under ``out``,
    generated on first use and reused afterwards (the name carries every parameter)."""
    from sample_slides import write_svs_like

    name = f"svs-{width}x{height}-t{tile}-ds{'-'.join(map(str, downsamples))}-grain{GRAIN:g}"
    folder = out / name
    path = folder / f"{name}.svs"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.svs.partial"
        start = time.perf_counter()
        print(f"generating {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ...",
              file=sys.stderr, flush=True)
        write_svs_like(
            tmp, width, height, tile=tile, downsamples=tuple(downsamples), grain=GRAIN
        )
        tmp.rename(path)  # complete or absent: an interrupted run never leaves half a slide
        print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return path


@dataclass(frozen=True)
class Stats:
    """Count, throughput (sequential: count / total time) and latency percentiles."""

    count: int
    total_s: float
    p50_ms: float
    p99_ms: float

    @property
    def per_s(self) -> float:
        return self.count / self.total_s if self.total_s > 0 else float("inf")

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        return cls(len(seconds), sum(seconds), percentile(seconds, 50) * 1e3,
                   percentile(seconds, 99) * 1e3)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by linear interpolation (numpy's default method)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fmt_num(x: float) -> str:
    """A number with about three significant digits, no exponent."""
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; numbers are formatted with ``fmt_num``."""
    def cell(v: object) -> str:
        return fmt_num(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the numbers were measured."""
    return (f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """Status and body of a GET (4xx/5xx are returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class LiveServer:
    """``python -m wsi_server serve PATHS --port P --log-level warning *flags`` on a free
    loopback port; ``with LiveServer([...]) as srv: srv.url("/api/slides")``.

    ``env`` adds ``WSI_*`` variables (e.g. ``{"WSI_BENCH_ROUTES": "1"}``). The server's
    output goes to ``log`` (default: ``benchmarks/out/server-PORT.log``)."""

    def __init__(
        self,
        paths: Sequence[Path],
        *flags: str,
        env: dict[str, str] | None = None,
        python: str | None = None,
        ready_timeout: float = 60.0,
        log: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.python = python or os.environ.get("WSI_BENCH_PYTHON") or sys.executable
        self.argv = [self.python, "-m", "wsi_server", "serve", *map(str, paths),
                     "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                     *flags]
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.log = log or OUT / f"server-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def pid(self) -> int:
        """The server's process id (while it runs)."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        return self._proc.pid

    def json(self, path: str) -> object:
        status, body = http_get(self.url(path))
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return json.loads(body)

    def start(self) -> LiveServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited ({self._proc.returncode}); see {self.log}")
            try:
                if http_get(self.url("/readyz"), timeout=2.0)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {self.ready_timeout} s; see {self.log}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
