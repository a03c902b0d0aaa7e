"""Command line: ``wsi-server serve | info | convert | ingest | warm``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_server import settings as settings_mod
from wsi_server.errors import WsiServerError
from wsi_server.settings import Settings

SERVE_SETTINGS = [f.name for f in settings_mod.fields()]


def app_from_env() -> Any:
    """App factory for uvicorn workers: settings come from ``WSI_*`` variables."""
    from wsi_server.app import create_app

    return create_app(settings_mod.from_sources(None))


def settings_to_env(s: Settings) -> dict[str, str]:
    env: dict[str, str] = {}
    for f in settings_mod.fields():
        value = getattr(s, f.name)
        if value is None:
            continue
        if f.name == "paths":
            env[settings_mod.env_name(f.name)] = os.pathsep.join(str(p) for p in value)
        elif isinstance(value, tuple):
            env[settings_mod.env_name(f.name)] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            env[settings_mod.env_name(f.name)] = "1" if value else "0"
        else:
            env[settings_mod.env_name(f.name)] = str(value)
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    s = settings_mod.from_sources(args)
    if not s.paths:
        print("wsi-server serve: give at least one slide file or folder", file=sys.stderr)
        return 2
    logging.basicConfig(level=s.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    common: dict[str, Any] = {
        "host": s.host,
        "port": s.port,
        "log_level": s.log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 5,
    }
    if s.workers > 1:
        os.environ.update(settings_to_env(s))
        uvicorn.run("wsi_server.cli:app_from_env", factory=True, workers=s.workers, **common)
    else:
        from wsi_server.app import create_app

        uvicorn.run(create_app(s), **common)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from wsi_server.readers import default_registry

    try:
        reader = default_registry().open(Path(args.slide))
    except WsiServerError as exc:
        print(json.dumps({"error": exc.code, "detail": exc.detail}), file=sys.stderr)
        return 1
    meta = reader.metadata
    out = {
        "path": str(reader.path),
        "backend": type(reader).__name__,
        "format": meta.format,
        "vendor": meta.vendor,
        "width": meta.width,
        "height": meta.height,
        "level_count": len(meta.levels),
        "levels": [
            {"width": lv.width, "height": lv.height, "downsample": lv.downsample,
             "tile_size": list(lv.tile_size) if lv.tile_size else None}
            for lv in meta.levels
        ],
        "mpp": list(meta.mpp) if meta.mpp else None,
        "objective_power": meta.objective_power,
        "associated": list(meta.associated),
        "bounds": list(meta.bounds) if meta.bounds else None,
        "properties": meta.properties,
    }
    print(json.dumps(out, indent=2))
    return 0


WARM_SETTINGS = [
    "redis_url", "tile_size", "overlap", "limit_bounds", "jpeg_quality", "cache_ttl",
    "cache_item_max", "redis_timeout", "render_threads", "tile_encoding",
]


def cmd_warm(args: argparse.Namespace) -> int:
    from wsi_server.warm import run_cli

    s = settings_mod.from_sources(args)
    if args.library:
        s = s.replace(paths=tuple(args.library))
    return run_cli(s.replace(cache_size=0), args.target, args.levels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-server",
        description="Whole-slide image tile server (Deep Zoom). Every flag also reads a "
        "WSI_* environment variable; flags win.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve slides over HTTP")
    settings_mod.add_arguments(serve, SERVE_SETTINGS)
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser("info", help="print a slide's metadata as JSON")
    info.add_argument("slide", help="slide file, or DICOM-WSI folder")
    info.set_defaults(func=cmd_info)
    # -- more commands register below (convert, ingest, warm) --
    from wsi_server.convert import add_convert_command

    add_convert_command(sub)
    from wsi_server.ingest.command import add_ingest_command

    add_ingest_command(sub)
    from wsi_server.dicom.export import add_dicom_command

    add_dicom_command(sub)

    warm = sub.add_parser(
        "warm", help="render a slide's coarsest Deep Zoom levels into the shared (Redis) cache"
    )
    warm.add_argument("target", metavar="SLIDE_OR_ID",
                      help="slide path, or slide id of a slide under --library")
    warm.add_argument("--levels", type=int, default=12, metavar="K",
                      help="how many of the coarsest DZ levels to render, in both geometries "
                      "(default 12: up to 2048 px)")
    warm.add_argument("--library", action="append", type=Path, default=[], metavar="PATH",
                      help="library folder the servers serve (for a slide id) [env WSI_PATHS]")
    settings_mod.add_arguments(warm, WARM_SETTINGS)
    warm.set_defaults(func=cmd_warm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"wsi-server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
