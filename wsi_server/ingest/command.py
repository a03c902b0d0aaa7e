"""``wsi-server ingest WATCH_DIR --library DIR``: the ingest pipeline on its own."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

INGEST_SETTINGS = [
    "ingest_settle_seconds", "ingest_quarantine", "ingest_urgent_dir", "ingest_poll",
    "ingest_validate_timeout", "ingest_convert", "convert_dir", "log_level",
]


def add_ingest_command(sub: Any) -> None:
    """Register the ``ingest`` subcommand on the CLI's subparsers."""
    from wsi_server import settings as settings_mod

    parser = sub.add_parser(
        "ingest", help="move finished scans from a watch folder into the library",
        description="Watch WATCH_DIR; move each scan, once settled and validated, into the "
        "library (the folder the server serves), bad ones into the quarantine.",
    )
    parser.add_argument("watch_dir", type=Path, help="drop folder the scanners write into")
    parser.add_argument("--library", type=Path, required=True,
                        help="library folder (the first slide folder of `wsi-server serve`)")
    parser.add_argument("--once", action="store_true",
                        help="exit once nothing is arriving or queued")
    parser.add_argument("--force-copy", action="store_true", help=argparse.SUPPRESS)
    settings_mod.add_arguments(parser, INGEST_SETTINGS)
    parser.add_argument("--settle-seconds", dest="ingest_settle_seconds", default=None,
                        metavar="VALUE", help="short for --ingest-settle-seconds")
    parser.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    import dataclasses

    from wsi_server import settings as settings_mod
    from wsi_server.ingest.pipeline import IngestConfig, IngestPipeline

    s = settings_mod.from_sources(args)
    logging.basicConfig(level=s.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = IngestConfig.from_settings(s, watch=args.watch_dir, library=args.library)
    if args.force_copy:
        config = dataclasses.replace(config, force_copy=True)
    pipeline = IngestPipeline(config)
    if args.once:
        try:
            pipeline.run_until_idle(timeout=float("inf"))
        finally:
            pipeline.close()
        return 0
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    pipeline.start()
    done.wait()
    pipeline.close()
    return 0
