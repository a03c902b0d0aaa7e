"""Validation of a settled scan, in a separate process with a timeout.

A scan is valid when the reader registry opens it and a few regions decode: the first, a
middle and the last tile of the full-resolution level and of the smallest level, and the
stored tile at (0, 0) when the file has passthrough tiles. A corrupt file that makes a C
decoder hang or crash costs only the validator process: :class:`Validator` kills it on
timeout, notices when it dies, and starts a fresh one for the next scan.

Run on its own: ``python -m wsi_server.ingest.validate PATH`` prints the verdict as JSON
(exit status 0 when valid, 1 when not). ``--worker`` serves one path per stdin line with
one JSON line per answer, which is how the pipeline keeps one warm process.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 120.0
_PROBE = 256


@dataclass(frozen=True)
class Verdict:
    ok: bool
    code: str = "ok"
    """``ok``, or the failure: an error code of the reader (``unsupported_format``,
    ``unreadable_slide``), ``validator_timeout``, ``validator_crashed``."""
    detail: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "code": self.code, "detail": self.detail, "info": self.info,
                "seconds": round(self.seconds, 3)}


# -- inside the validator process ------------------------------------------------
def check(path: Path) -> dict[str, Any]:
    """Open ``path`` with the registry and decode a few regions; the verdict as a dict."""
    from wsi_server import codecs
    from wsi_server.errors import WsiServerError
    from wsi_server.ingest.faults import validator_fault
    from wsi_server.readers import default_registry

    misbehave = validator_fault(path.name)
    if misbehave == "hang":
        while True:
            time.sleep(60)
    if misbehave == "crash":
        os.abort()
    try:
        reader = default_registry().open(path)
    except WsiServerError as exc:
        return {"ok": False, "code": exc.code, "detail": exc.detail}
    except Exception as exc:
        return {"ok": False, "code": "unreadable_slide", "detail": f"open failed: {exc!r}"}
    try:
        meta = reader.metadata
        if not meta.levels or meta.width <= 0 or meta.height <= 0:
            return {"ok": False, "code": "unreadable_slide", "detail": "the slide has no pixels"}
        for index in sorted({0, len(meta.levels) - 1}):
            lv = meta.levels[index]
            w, h = min(_PROBE, lv.width), min(_PROBE, lv.height)
            spots = {(0, 0), ((lv.width - w) // 2, (lv.height - h) // 2),
                     (lv.width - w, lv.height - h)}
            for l_x, l_y in sorted(spots):
                ds = lv.downsample
                pixels = reader.read_region(index, round(l_x * ds), round(l_y * ds), w, h)
                if pixels.shape != (h, w, 3):
                    return {"ok": False, "code": "unreadable_slide",
                            "detail": f"level {index} region has shape {pixels.shape}"}
        raw = reader.read_raw_tile(0, 0, 0)
        if raw is not None and raw.media_type == codecs.JPEG:
            codecs.decode_jpeg(raw.data)
        for name in meta.associated:
            reader.associated_image(name)
        truncated = _tiff_truncation(path)
        if truncated:
            return {"ok": False, "code": "unreadable_slide", "detail": truncated}
        return {
            "ok": True, "code": "ok", "detail": "",
            "info": {"backend": type(reader).__name__, "format": meta.format,
                     "vendor": meta.vendor, "width": meta.width, "height": meta.height,
                     "level_count": len(meta.levels)},
        }
    except WsiServerError as exc:
        return {"ok": False, "code": exc.code, "detail": exc.detail}
    except Exception as exc:
        return {"ok": False, "code": "unreadable_slide", "detail": f"decoding failed: {exc!r}"}
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def _tiff_truncation(path: Path) -> str | None:
    """For a TIFF-family file: does any stored strip or tile end past the end of the file?"""
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None
    import tifffile

    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        for index, page in enumerate(tif.pages):
            offsets = getattr(page, "dataoffsets", ())
            counts = getattr(page, "databytecounts", ())
            if any(o + n > size for o, n in zip(offsets, counts, strict=False)):
                return f"the file is truncated: image {index} ends past the end of the file"
    return None


def _worker() -> int:
    # Keep stdout for answers only: C libraries may write to fd 1.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not path:
            continue
        out.write(json.dumps(check(Path(path))) + "\n")
        out.flush()
    return 0


# -- in the pipeline ---------------------------------------------------------------
class Validator:
    """One warm validator process, replaced whenever it hangs or dies."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "wsi_server.ingest.validate", "--worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self._proc

    def validate(self, path: Path) -> Verdict:
        started = time.monotonic()
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(os.fsencode(str(path)) + b"\n")
            proc.stdin.flush()
        except OSError:
            return self._died(proc, started)
        buf = b""
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not buf.endswith(b"\n"):
                left = started + self.timeout - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._kill(proc)
                    return Verdict(False, "validator_timeout",
                                   f"the validator did not answer within {self.timeout:g} s",
                                   seconds=time.monotonic() - started)
                chunk = os.read(fd, 65536)
                if not chunk:
                    return self._died(proc, started)
                buf += chunk
        try:
            answer = json.loads(buf)
        except ValueError:
            self._kill(proc)
            return Verdict(False, "validator_crashed", "the validator answered garbage",
                           seconds=time.monotonic() - started)
        return Verdict(bool(answer["ok"]), answer.get("code", "ok"), answer.get("detail", ""),
                       answer.get("info", {}), time.monotonic() - started)

    def _died(self, proc: subprocess.Popen[bytes], started: float) -> Verdict:
        rc = proc.wait()
        _close_pipes(proc)
        self._proc = None
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        return Verdict(False, "validator_crashed", f"the validator process died ({how})",
                       seconds=time.monotonic() - started)

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()
        _close_pipes(proc)
        self._proc = None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill(proc)
        _close_pipes(proc)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def main(argv: list[str]) -> int:
    if argv == ["--worker"]:
        return _worker()
    if len(argv) != 1:
        print("usage: python -m wsi_server.ingest.validate PATH", file=sys.stderr)
        return 2
    verdict = Validator().validate(Path(argv[0]).resolve())
    print(json.dumps(verdict.as_dict(), indent=2))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
