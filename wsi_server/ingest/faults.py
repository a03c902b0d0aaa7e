"""Fault injection for the crash-safety tests, driven by the ``WSI_INGEST_FAULT`` variable.

The value is a comma-separated list of tokens:

- ``kill:POINT`` — the process kills itself with SIGKILL when it reaches the named point of
  the pipeline (see the ``fault(...)`` calls in :mod:`wsi_server.ingest.mover` and
  :mod:`wsi_server.ingest.pipeline`);
- ``validate-hang:TEXT`` / ``validate-crash:TEXT`` — the validator process hangs, or
  aborts like a crashing C decoder, on a scan whose name contains TEXT.

Unset (always, outside tests) every check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "WSI_INGEST_FAULT"


def _tokens() -> list[tuple[str, str]]:
    raw = os.environ.get(ENV, "")
    out = []
    for token in raw.split(","):
        kind, _, arg = token.strip().partition(":")
        if kind:
            out.append((kind, arg))
    return out


def fault(point: str) -> None:
    """Die here, as kill -9 would, if the environment asks for it."""
    if ENV in os.environ and ("kill", point) in _tokens():
        os.kill(os.getpid(), signal.SIGKILL)


def validator_fault(name: str) -> str | None:
    """``"hang"`` or ``"crash"`` when the environment asks the validator to misbehave."""
    if ENV not in os.environ:
        return None
    for kind, arg in _tokens():
        if kind in ("validate-hang", "validate-crash") and arg and arg in name:
            return kind.removeprefix("validate-")
    return None
