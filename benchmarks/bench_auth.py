"""What sign-in costs on the tile path: cached tiles over HTTP from the same server run
three ways, loaded with ``wrk`` on loopback, in one run.

- ``none``: ``--auth none`` (anonymous, everything visible): the reference;
- ``session``: ``--auth oidc``, every request carrying the ``wsi_session`` cookie of a
  signed-in user (a session created in the server's own store and signed with its
  ``--session-secret``, as the sign-in callback would), whose group is granted the slide's
  collection by an ``--access-config`` file;
- ``bearer``: ``--auth oidc``, every request carrying ``Authorization: Bearer <JWT>``
  (RS256, signed by a key this script serves as a JWKS, with a discovery document, from a
  small HTTP server on loopback that counts the requests it gets); ``--tokens`` distinct
  tokens in rotation.

The three servers (one uvicorn worker each, 1 GB memory cache, same flags but the auth
ones) run side by side; each is warmed by fetching every URL of the list once, then the
modes take turns for ``--rounds`` rounds (the order rotates every round). Reported: each
mode's median round, the median of its round-by-round ratios to ``none`` (adjacent runs,
so a change in the machine's load hits both), and the server's CPU time per request
(``/proc/PID/stat``), steadier than req/s on a shared machine. The list is every
native-grid tile of the full-resolution level of the benchmark slide, in a fixed random
order (as in ``bench_http``).

JWT verifications are counted in the bearer server itself: a ``sitecustomize`` hook (on
that process's ``PYTHONPATH`` only) wraps ``joserfc.jwt.decode`` (a signature check) and
``BearerVerifier.verify`` (a request that missed the auth service's cache) to append a
line to a file; the hot path, a cache hit, is not touched.

Target (issue 9): session cached tiles >= 90% of ``none`` req/s; a bearer token is
verified once, not per request. Missing the target is reported (MISS), not an error.

    python -m benchmarks.bench_auth [--duration 4] [--rounds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.bench_http import WrkResult, tile_paths, tile_sources
from benchmarks.bench_http import wrk as http_wrk
from benchmarks.common import OUT, LiveServer, bench_slide, machine, markdown_table

COLLECTION = "bench"
GROUP = "bench-readers"
CLIENT_ID = "wsi-bench"
AUDIENCE = "wsi-bench-api"
SESSION_SUBJECT = "bench-session-user"
BEARER_SUBJECT = "bench-bearer-user"
TARGET = 0.90
MODES = ("none", "session", "bearer")

# Loaded by the servers' interpreters (PYTHONPATH) when WSI_BENCH_VERIFY_LOG is set.
SITECUSTOMIZE = r'''
import functools
import os

_log = os.environ.get("WSI_BENCH_VERIFY_LOG")


def _note(what):
    with open(_log, "a") as f:
        f.write(what + "\n")


if _log:
    try:
        import joserfc.jwt as _jwt
        from wsi_server.auth import tokens as _tokens
    except Exception as exc:  # the benchmark reports the counts as unavailable
        _note("hook-failed " + type(exc).__name__)
    else:
        _decode = _jwt.decode

        @functools.wraps(_decode)
        def _counted_decode(*args, **kwargs):
            _note("decode")
            return _decode(*args, **kwargs)

        _jwt.decode = _counted_decode
        _verify = _tokens.BearerVerifier.verify

        @functools.wraps(_verify)
        async def _counted_verify(self, token):
            _note("verify")
            return await _verify(self, token)

        _tokens.BearerVerifier.verify = _counted_verify
        _note("hook-ok")
'''


# -- the identity provider: discovery document and JWKS -------------------------------
class Issuer:
    """An OpenID provider as far as bearer verification needs one: a discovery document
    and a JWKS on a loopback port, counting the GETs of each path; mints RS256 JWTs."""

    def __init__(self) -> None:
        from joserfc.jwk import RSAKey

        self.kid = "bench-" + secrets.token_hex(4)
        self.key = RSAKey.generate_key(
            2048, parameters={"kid": self.kid, "use": "sig", "alg": "RS256"}, private=True
        )
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with issuer._lock:
                    issuer.hits[path] += 1
                doc = issuer.document(path)
                body = json.dumps(doc).encode() if doc is not None else b"{}"
                self.send_response(200 if doc is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def document(self, path: str) -> dict[str, object] | None:
        if path == "/.well-known/openid-configuration":
            return {
                "issuer": self.url,
                "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token",
                "jwks_uri": self.url + "/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        if path == "/jwks":
            return {"keys": [self.key.as_dict(private=False)]}
        return None

    def token(self, subject: str, groups: list[str], lifetime: float = 3600.0) -> str:
        from joserfc import jwt

        now = int(time.time())
        claims = {
            "iss": self.url, "aud": AUDIENCE, "sub": subject, "name": subject,
            "groups": groups, "iat": now, "nbf": now, "exp": now + int(lifetime),
            "jti": secrets.token_hex(8),
        }
        return jwt.encode({"alg": "RS256", "kid": self.kid, "typ": "JWT"}, claims, self.key)

    def __enter__(self) -> Issuer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the session a sign-in would have created ------------------------------------------
def signed_in_cookie(state_dir: Path, secret: str) -> str:
    """A ``wsi_session`` cookie value: a session stored in the server's database (the
    default SQLite file of ``state_dir``), signed as ``AuthService.session_cookie`` does."""
    from itsdangerous import URLSafeTimedSerializer

    from wsi_server.store.engine import Store, default_database_url
    from wsi_server.store.sessions import UserSessions

    store = Store.open(default_database_url(state_dir))
    try:
        token = UserSessions(store).create(
            SESSION_SUBJECT, "Bench Session User", [GROUP], [],
            datetime.now(UTC) + timedelta(hours=6), "bench_auth",
        )
    finally:
        store.close()
    return URLSafeTimedSerializer(secret, salt="wsi-session").dumps(token)


def audit_views(state_dir: Path) -> dict[str, tuple[int, int]]:
    """``slide.view`` records by actor: (records, summed request count)."""
    from wsi_server.store.audit import AuditLog
    from wsi_server.store.engine import Store, default_database_url

    store = Store.open(default_database_url(state_dir))
    try:
        out: dict[str, tuple[int, int]] = {}
        for rec in AuditLog(store).query(action="slide.view", limit=100_000):
            n, total = out.get(rec.actor, (0, 0))
            out[rec.actor] = (n + 1, total + rec.count)
        return out
    finally:
        store.close()


# -- HTTP ------------------------------------------------------------------------------
def get(url: str, headers: dict[str, str], timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Mode:
    name: str
    server: LiveServer
    header: str | None = None
    values: list[str] = field(default_factory=list)
    warm_value: str | None = None
    runs: list[WrkResult] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    """Server CPU seconds (user + system, all threads) of each run."""
    served: Counter[str] = field(default_factory=Counter)

    def headers(self, value: str | None) -> dict[str, str]:
        return {self.header: value} if self.header and value else {}


def warm(mode: Mode, paths: list[str]) -> None:
    """GET every path once with the mode's warm-up credential (fills the tile cache)."""
    headers = mode.headers(mode.warm_value)

    def one(path: str) -> None:
        status, body = get(mode.server.url(path), headers)
        if status != 200:
            raise RuntimeError(f"{mode.name}: GET {path}: {status} {body[:200]!r}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, paths))


def wrk(mode: Mode, paths: list[str], duration: float, connections: int, threads: int
        ) -> WrkResult:
    """bench_http's wrk run against this mode's server, with its credential header."""
    return http_wrk(mode.server.base, paths, duration, connections, threads,
                    header=mode.header, values=mode.values)


def cpu_seconds(server: LiveServer) -> float:
    """User + system CPU time of the server process so far (all its threads)."""
    proc = server._proc
    if proc is None:
        raise RuntimeError("server not running")
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hook_counts(path: Path) -> Counter[str]:
    try:
        return Counter(path.read_text().split())
    except FileNotFoundError:
        return Counter()


@contextmanager
def timed(label: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    print(f"  {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def cpu_per_request(mode: Mode) -> float:
    """Median over the rounds of the server's CPU seconds per request."""
    per = sorted(c / max(1, r.requests) for c, r in zip(mode.cpu, mode.runs, strict=True))
    return per[len(per) // 2]


def paired_ratio(mode: Mode, ref: Mode) -> tuple[float, list[float]]:
    """The median, over the rounds, of this mode's req/s over the reference's in the same
    round (adjacent runs, so a change in the machine's load hits both), and each ratio."""
    ratios = [m.per_s / n.per_s for m, n in zip(mode.runs, ref.runs, strict=True)]
    return statistics.median(ratios), ratios


def median_run(runs: list[WrkResult]) -> WrkResult:
    return sorted(runs, key=lambda r: r.per_s)[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="wrk runs per mode")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--tokens", type=int, default=4,
                        help="distinct bearer tokens in rotation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk; ./dev bench installs it)",
              file=sys.stderr)
        return 2

    slide = bench_slide()
    load_before = os.getloadavg()[0]
    work = OUT / "auth"
    lib, state = work / "lib", work / "state"
    shutil.rmtree(state, ignore_errors=True)
    (lib / COLLECTION).mkdir(parents=True, exist_ok=True)
    link = lib / COLLECTION / slide.name
    if not link.exists():
        os.symlink(slide, link)
    access = work / "access.toml"
    access.write_text(f'[[grant]]\ngroup = "{GROUP}"\ncollections = ["{COLLECTION}"]\n')
    # Outside the source tree (mypy and ruff check every .py under benchmarks/).
    site = Path(tempfile.mkdtemp(prefix="wsi-bench-auth-"))
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    verify_log = site / "verifications.log"
    secret = secrets.token_urlsafe(32)

    common = ("--rescan-seconds", "0", "--cache-size", "1024", "--state-dir", str(state),
              "--session-secret", secret, "--access-config", str(access))
    env = {"PYTHONPATH": os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}

    with ExitStack() as stack:
        stack.callback(shutil.rmtree, site, ignore_errors=True)
        issuer = stack.enter_context(Issuer())
        oidc = ("--auth", "oidc", "--oidc-issuer", issuer.url, "--oidc-client-id", CLIENT_ID,
                "--oidc-audience", AUDIENCE)

        def serve(name: str, *flags: str, hook: bool = False) -> LiveServer:
            extra = {**env, "WSI_BENCH_VERIFY_LOG": str(verify_log)} if hook else {}
            srv = LiveServer([lib], *common, *flags, env=extra,
                             log=OUT / f"server-auth-{name}.log")
            return stack.enter_context(srv)

        print("starting servers", file=sys.stderr, flush=True)
        none_srv = serve("none", "--auth", "none")
        cookie = signed_in_cookie(state, secret)
        session_srv = serve("session", *oidc)
        bearer_srv = serve("bearer", *oidc, hook=True)
        tokens = [issuer.token(BEARER_SUBJECT, [GROUP]) for _ in range(args.tokens)]
        modes = {
            "none": Mode("none", none_srv),
            "session": Mode("session", session_srv, "Cookie", [f"wsi_session={cookie}"],
                            f"wsi_session={cookie}"),
            "bearer": Mode("bearer", bearer_srv, "Authorization",
                           [f"Bearer {t}" for t in tokens],
                           "Bearer " + issuer.token(BEARER_SUBJECT, [GROUP])),
        }

        (entry,) = none_srv.json("/api/slides")["slides"]  # type: ignore[index]
        if entry.get("collection", COLLECTION) != COLLECTION:
            raise RuntimeError(f"slide collection is {entry.get('collection')!r}")
        paths = tile_paths(slide, entry["id"], args.seed)["full"]

        # Auth is really on: no credential is refused, the credential is accepted.
        for mode in (modes["session"], modes["bearer"]):
            status, _ = get(mode.server.url(paths[0]), {})
            if status != 401:
                raise RuntimeError(f"{mode.name}: a tile without credentials gave {status}")
            status, body = get(mode.server.url(paths[0]), mode.headers(mode.warm_value))
            if status != 200:
                raise RuntimeError(f"{mode.name}: a tile with credentials gave {status} "
                                   f"{body[:200]!r}")
        hooked = hook_counts(verify_log)
        if not hooked["hook-ok"]:
            print(f"warning: verification counter not installed ({dict(hooked)})",
                  file=sys.stderr)

        for mode in modes.values():
            with timed(f"warmed {mode.name} ({len(paths)} tiles)"):
                warm(mode, paths)
        before_wrk = hook_counts(verify_log)
        issuer_before = issuer.hits.copy()

        order = list(MODES)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                mode = modes[name]
                print(f"round {r + 1}/{args.rounds}: wrk {name}", file=sys.stderr, flush=True)
                sources = tile_sources(mode.server)
                cpu = cpu_seconds(mode.server)
                mode.runs.append(wrk(mode, paths, args.duration, args.connections,
                                     args.threads))
                mode.cpu.append(cpu_seconds(mode.server) - cpu)
                mode.served += tile_sources(mode.server) - sources
        after_wrk = hook_counts(verify_log)
        issuer_during = issuer.hits - issuer_before
        stack.close()  # stop the servers: their view counters are flushed to the store

    views = audit_views(state)
    ref_cpu = cpu_per_request(modes["none"])
    rows: list[list[object]] = []
    for mode in modes.values():
        med = median_run(mode.runs)
        total = max(1, mode.served.total())
        by = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(mode.served.items()))
        rounds = " / ".join(f"{r.per_s:,.0f}" for r in mode.runs)
        cpu = cpu_per_request(mode)
        ratio = "–" if mode.name == "none" else \
            f"{100 * paired_ratio(mode, modes['none'])[0]:.0f}%"
        cpu_ratio = "–" if mode.name == "none" else f"{100 * ref_cpu / cpu:.0f}%"
        rows.append([mode.name, med.per_s, ratio, med.p50_ms, med.p99_ms, rounds,
                     cpu * 1e6, cpu_ratio, sum(r.errors for r in mode.runs), by or "–"])

    print(f"\nSlide: {slide.name} (collection folder `{COLLECTION}/`, {len(paths)} "
          f"full-resolution native tiles, memory cache warm). Machine: {machine()}; servers "
          f"and wrk share it (1-min load average {load_before:.1f} before the servers "
          f"started, {os.getloadavg()[0]:.1f} at the end).")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s per run, "
          f"{args.rounds} rounds (order rotated each round): req/s, p50, p99 of the median "
          f"round; vs none = median of the round-by-round ratios; server CPU = median per "
          f"round. One server process per mode (python -m wsi_server serve, 1 worker), all "
          f"up at once.\n")
    print(markdown_table(
        ["mode", "req/s", "vs none", "p50 ms", "p99 ms", "rounds req/s",
         "server CPU µs/req", "none CPU / this", "errors", "served by"],
        rows,
    ))

    failed = any(r.errors for m in modes.values() for r in m.runs)
    print()
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"Note: other work was running (load {load_before:.1f} on {os.cpu_count()} "
              "cores before the start): req/s ratios are noisy; server CPU per request is "
              "the steadier comparison.")
    for name, label in (("session", "Target, signed-in session"), ("bearer", "Bearer JWT")):
        share, ratios = paired_ratio(modes[name], modes["none"])
        paired = " / ".join(f"{r:.0%}" for r in ratios)
        print(f"{label} >= {TARGET:.0%} of --auth none: {share:.1%} "
              f"{'PASS' if share >= TARGET else 'MISS'} (round by round: {paired})")

    bearer_requests = sum(r.requests for r in modes["bearer"].runs)
    during = after_wrk - before_wrk
    print(f"\nBearer verification ({args.tokens} tokens in rotation over "
          f"{bearer_requests:,} timed requests; 1 more token for the sanity check and "
          f"warm-up):")
    if hooked["hook-ok"]:
        ok = during["decode"] == args.tokens
        print(f"- JWT signature checks in the server: {during['decode']} during the timed "
              f"runs, {after_wrk['decode']} in all; BearerVerifier.verify calls (auth "
              f"service cache misses): {during['verify']} timed, {after_wrk['verify']} in "
              f"all. One per token: {'PASS' if ok else 'MISS'}")
    else:
        print("- JWT signature checks: not counted (hook not installed)")
    print(f"- identity provider hits, whole run: discovery "
          f"{issuer.hits['/.well-known/openid-configuration']}, JWKS {issuer.hits['/jwks']}; "
          f"during the timed runs: {sum(issuer_during.values())}")
    print("\nAudit trail, slide.view records (one per user, slide and session; count = "
          "requests):")
    for actor, (n, count) in sorted(views.items()):
        print(f"- {actor}: {n} record(s), count {count:,}")
    if failed:
        print("\nerrors during the runs: see the errors column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
