"""Typed, immutable settings built from CLI flags and ``WSI_*`` environment variables.

Each field is documented once, here; ``--help`` and the README's configuration table are
generated from the same metadata (``python -m wsi_server.settings --update-readme``).
Precedence: command-line flag, then environment variable, then the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _opt(help: str, flag: str | None = None, **kw: Any) -> Any:
    default = kw.pop("default")
    meta = {"help": help, "flag": flag, "repeat": kw.pop("repeat", False)}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    paths: tuple[Path, ...] = _opt(
        "Slide files or folders to serve (scanned recursively). Positional on the CLI; "
        "in the environment, separated by ':'.",
        default=(),
    )
    host: str = _opt("Address to bind.", default="127.0.0.1")
    port: int = _opt("Port to bind.", default=8000)
    workers: int = _opt("Worker processes (uvicorn); share tiles through Redis.", default=1)
    jpeg_quality: int = _opt("JPEG quality of rendered tiles (1-100).", default=75)
    tile_encoding: str = _opt(
        "How the viewer asks for tiles of stored levels: 'stored' (the scanner's JPEG bytes "
        "as they are: exact, no server CPU) or 'reencoded' (JPEG 4:2:0 at --jpeg-quality, "
        "about half the bytes of a q90 scan, for reporters on slow links; never larger than "
        "the stored tile). Any client may ask for either with ?encoding= on a .dzi or tile.",
        default="stored",
    )
    tile_size: int = _opt("Tile size of the default Deep Zoom geometry.", default=254)
    overlap: int = _opt("Tile overlap of the default Deep Zoom geometry.", default=1)
    limit_bounds: bool = _opt(
        "Limit the default geometry to the slide's non-empty bounds, where the file says.",
        default=False,
    )
    cache_size: int = _opt(
        "In-process tile cache size in MB (0 disables it); with Redis, the front tier.",
        default=256,
    )
    redis_url: str | None = _opt(
        "Redis URL for a tile cache shared by every worker and replica.", default=None
    )
    # -- Redis tier --
    cache_ttl: int = _opt(
        "Seconds a tile stays in Redis (0: until Redis evicts it).", default=7 * 86400
    )
    cache_item_max: int = _opt(
        "Largest item either cache tier stores, in KB (bigger ones are not cached).",
        default=2048,
    )
    redis_timeout: float = _opt(
        "Seconds a Redis command may take before it counts as a miss.", default=0.05
    )
    require_redis: bool = _opt(
        "Report not ready (503 on /readyz) while Redis is unreachable, instead of degraded.",
        default=False,
    )
    cors_origins: tuple[str, ...] = _opt(
        "Origins allowed by CORS (comma separated in the environment; '*' for any).",
        default=(),
    )
    pool_size: int = _opt("Open slides kept in the reader pool.", default=32)
    render_threads: int = _opt(
        "Threads decoding, resampling and encoding tiles (0: one per core).", default=0
    )
    rescan_seconds: float = _opt(
        "Seconds between library rescans that pick up new or removed slides (0: never).",
        default=30.0,
    )
    ingest: Path | None = _opt("Watch folder of the ingest pipeline.", default=None)
    ingest_settle_seconds: float = _opt(
        "Seconds a scan's files must keep their size and mtime before ingest takes it.",
        default=10.0,
    )
    ingest_quarantine: Path | None = _opt(
        "Folder for scans that fail validation (default: WATCH/quarantine).", default=None
    )
    ingest_urgent_dir: str = _opt(
        "Subfolder of the watch folder whose scans are ingested first.", default="urgent"
    )
    ingest_poll: bool = _opt(
        "Ingest by polling only, without filesystem events (network filesystems).",
        default=False,
    )
    ingest_validate_timeout: float = _opt(
        "Seconds the isolated validator may spend on one scan before it is killed.",
        default=120.0,
    )
    ingest_warm_levels: int = _opt(
        "After ingest, render this many of the new slide's coarsest levels (both "
        "geometries) into the cache, so its first view is instant (0: off).",
        default=0,
    )
    ingest_convert: bool = _opt(
        "Convert each ingested slide to a zarr pyramid in --convert-dir, which the server "
        "then serves in place of the original.",
        default=False,
    )
    # -- DICOMweb --
    stow_max_mb: int = _opt(
        "Largest STOW-RS request body (POST /dicomweb/studies) in MB; a bigger upload is "
        "refused with 413 and nothing of it is kept.",
        default=4096,
    )
    dicomweb_source: tuple[str, ...] = _opt(
        "DICOMweb archive whose whole-slide series the server lists and serves as slides "
        "(the base URL of its QIDO-RS/WADO-RS services, e.g. https://pacs.example.org/"
        "dicom-web). Repeat the flag for several; comma separated in the environment.",
        default=(),
        repeat=True,
    )
    dicomweb_source_auth: str | None = _opt(
        "Value of the Authorization header sent to every --dicomweb-source (e.g. 'Bearer "
        "TOKEN' or 'Basic ...'; prefer the environment variable).",
        default=None,
    )
    dicomweb_source_timeout: float = _opt(
        "Seconds a --dicomweb-source request may take (connect and read) before its slide "
        "answers 503.",
        default=10.0,
    )
    dicomweb_source_refresh: float = _opt(
        "Seconds between two listings of each --dicomweb-source's series (new and removed "
        "slides); 0: listed once at start.",
        default=300.0,
    )
    # -- zarr conversion --
    convert_dir: Path | None = _opt(
        "Folder of converted copies (wsi-server convert): a slide is served from "
        "DIR/<its path under the root>.zarr once that store is complete. Keep DIR outside "
        "the library roots.",
        default=None,
    )
    isolate_open: bool = _opt(
        "Check each new or changed slide in a separate process before the server opens it: "
        "a file that crashes or hangs a decoder is listed as unreadable instead of taking "
        "the server down. Costs 5-40 ms per never-opened slide (once: verdicts are kept in "
        "--state-dir) and one helper process; --no-isolate-open turns it off.",
        default=True,
    )
    hide_associated: bool = _opt(
        "Withhold label and macro images (they often carry patient identifiers).",
        default=False,
    )
    viewer_assets: Path | None = _opt(
        "Folder holding OpenSeadragon's build (openseadragon.min.js, images/); default: "
        "node_modules/openseadragon/build/openseadragon of the source tree (npm ci).",
        default=None,
    )
    # -- access control and state --
    auth: str = _opt(
        "Who may connect: 'none' (no sign-in; only on a loopback address unless "
        "--allow-anonymous) or 'oidc' (hospital single sign-on and bearer tokens from an "
        "OpenID Connect provider).",
        default="none",
    )
    allow_anonymous: bool = _opt(
        "Serve without sign-in on a non-loopback address (--auth none). Everyone who can "
        "reach the port sees every slide; a warning is logged at every start.",
        default=False,
    )
    oidc_issuer: str | None = _opt(
        "Issuer URL of the OpenID Connect provider (its discovery document is "
        "ISSUER/.well-known/openid-configuration).",
        default=None,
    )
    oidc_client_id: str | None = _opt("Client id registered at the provider.", default=None)
    oidc_client_secret: str | None = _opt(
        "Client secret registered at the provider (prefer the environment variable).",
        default=None,
    )
    oidc_audience: str | None = _opt(
        "Audience that bearer JWT access tokens must name (default: the client id).",
        default=None,
    )
    oidc_groups_claim: str = _opt(
        "Claim (of the ID token or userinfo, or of a bearer token) listing the user's "
        "groups; the access file grants collections to groups.",
        default="groups",
    )
    oidc_scopes: str = _opt(
        "Scopes asked at sign-in besides 'openid' (space separated).", default="profile email"
    )
    access_config: Path | None = _opt(
        "Access file (TOML): which groups see which collections, and who is admin. "
        "Without it, signed-in users see nothing but share links.",
        default=None,
    )
    public_url: str | None = _opt(
        "The server's external URL behind a proxy (e.g. https://slides.example.org); used "
        "for sign-in redirects, share links and cookie security.",
        default=None,
    )
    state_dir: Path | None = _opt(
        "Folder of the server's state (the SQLite database, the session key); never inside a "
        "library root. Default: $XDG_STATE_HOME/wsi-server (~/.local/state/wsi-server).",
        default=None,
    )
    database_url: str | None = _opt(
        "SQLAlchemy URL of the state store (default: SQLite in --state-dir; "
        "postgresql+psycopg://... for several replicas).",
        default=None,
    )
    session_secret: str | None = _opt(
        "Key that signs session and share cookies; replicas must share it. Default: a "
        "random key kept in --state-dir.",
        default=None,
    )
    session_hours: float = _opt("Hours a sign-in lasts.", default=12.0)
    share_max_days: int = _opt("Longest lifetime of a share link, in days.", default=30)
    audit_retention_days: int = _opt(
        "Days audit records are kept before a daily purge deletes them (0: kept for ever).",
        default=0,
    )
    frame_ancestors: str = _opt(
        "CSP frame-ancestors: who may embed the viewer in a frame (e.g. \"'self' "
        "https://pacs.example.org\").",
        default="'self'",
    )
    # -- IIIF --
    iiif_cors_origins: tuple[str, ...] = _opt(
        "Origins allowed by CORS on the IIIF routes (/iiif/3/...), which viewers on other "
        "sites load: '*' for any (the default); empty for none (comma separated in the "
        "environment). Access rules apply all the same.",
        default=("*",),
    )
    iiif_max_width: int = _opt(
        "Largest width and height of a IIIF image (maxWidth, maxHeight in info.json).",
        default=10000,
    )
    iiif_max_area: int = _opt(
        "Largest area of a IIIF image in pixels (maxArea in info.json).", default=25_000_000
    )
    log_level: str = _opt("Logging level.", default="info")
    bench_routes: bool = _opt(
        "Mount benchmark-only routes (/bench/bytes/{n}). Never enable in production.",
        default=False,
    )

    @property
    def env_prefix(self) -> str:
        return "WSI_"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def env_name(name: str) -> str:
    return "WSI_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    t = str(f.type)
    if t == "bool":
        v = raw.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env_name(f.name)}: expected a boolean, got {raw!r}")
    if t == "int":
        return int(raw)
    if t == "float":
        return float(raw)
    if t.startswith("tuple[Path"):
        return tuple(Path(p) for p in raw.split(os.pathsep) if p)
    if t.startswith("tuple[str"):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if t.startswith("Path"):
        return Path(raw) if raw else None
    if t.startswith("str | None"):
        return raw or None
    return raw


def fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Settings)


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Add a flag for each named setting, with its environment variable in the help."""
    by_name = {f.name: f for f in fields()}
    for name in names:
        f = by_name[name]
        help_text = f"{f.metadata['help']} [env {env_name(name)}; default {f.default!r}]"
        if name == "paths":
            parser.add_argument("paths", nargs="*", type=Path, help=help_text)
        elif f.metadata.get("repeat"):
            parser.add_argument(flag_name(name), action="append", default=None,
                                help=help_text, metavar="VALUE")
        elif str(f.type) == "bool":
            parser.add_argument(
                flag_name(name), action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )
        else:
            parser.add_argument(flag_name(name), default=None, help=help_text, metavar="VALUE")


def from_sources(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from parsed flags over ``WSI_*`` variables over defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields():
        raw_env = environ.get(env_name(f.name))
        if raw_env is not None:
            values[f.name] = _convert(f, raw_env)
        flag = getattr(args, f.name, None) if args is not None else None
        if flag is None or (f.name == "paths" and not flag):
            continue
        if isinstance(flag, bool | list):
            values[f.name] = tuple(flag) if isinstance(flag, list) else flag
        else:
            values[f.name] = _convert(f, str(flag))
    settings = Settings(**values)
    validate(settings)
    return settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate(s: Settings) -> None:
    if s.ingest_convert and s.convert_dir is None:
        raise ValueError("ingest_convert needs convert_dir: the folder converted copies go to")
    if not 1 <= s.jpeg_quality <= 100:
        raise ValueError("jpeg_quality must be between 1 and 100")
    if s.tile_encoding not in ("stored", "reencoded"):
        raise ValueError("tile_encoding must be 'stored' or 'reencoded'")
    if s.tile_size < 1 or s.overlap < 0:
        raise ValueError("tile_size must be >= 1 and overlap >= 0")
    if s.cache_size < 0 or s.pool_size < 1 or s.workers < 1:
        raise ValueError("cache_size must be >= 0, pool_size and workers >= 1")
    if s.auth not in ("none", "oidc"):
        raise ValueError("auth must be 'none' or 'oidc'")
    if s.auth == "none" and not s.allow_anonymous and not is_loopback(s.host):
        raise ValueError(
            f"refusing to serve every slide without sign-in on {s.host}, which is not a "
            "loopback address: use --auth oidc (hospital sign-in), or --allow-anonymous if "
            "this network is trusted to see every slide"
        )
    if s.auth == "oidc" and not (s.oidc_issuer and s.oidc_client_id):
        raise ValueError("--auth oidc needs --oidc-issuer and --oidc-client-id")
    if s.share_max_days < 1 or s.session_hours <= 0 or s.audit_retention_days < 0:
        raise ValueError("share_max_days must be >= 1, session_hours > 0, "
                         "audit_retention_days >= 0")
    if s.cache_ttl < 0 or s.cache_item_max < 1 or s.redis_timeout <= 0:
        raise ValueError("cache_ttl must be >= 0, cache_item_max and redis_timeout > 0")
    if s.stow_max_mb < 1 or s.dicomweb_source_timeout <= 0 or s.dicomweb_source_refresh < 0:
        raise ValueError("stow_max_mb must be >= 1, dicomweb_source_timeout > 0 and "
                         "dicomweb_source_refresh >= 0")
    for url in s.dicomweb_source:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"dicomweb_source must be an http(s) URL, got {url!r}")
    if s.iiif_max_width < 2048 or s.iiif_max_area < 2048 * 2048:
        raise ValueError("iiif_max_width must be >= 2048 and iiif_max_area >= 4194304 (a "
                         "IIIF tile of the largest native tile size must fit)")


def markdown_table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields():
        flag = "PATH ..." if f.name == "paths" else flag_name(f.name)
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        rows.append(f"| `{flag}` | `{env_name(f.name)}` | `{default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)


def update_readme(path: Path) -> None:
    """Rewrite the configuration table between the README's settings-table markers."""
    text = path.read_text()
    start = text.index("<!-- settings-table")
    start = text.index("\n", start) + 1
    end = text.index("<!-- /settings-table -->")
    path.write_text(text[:start] + markdown_table() + "\n" + text[end:])


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--update-readme"]:
        update_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(markdown_table())
