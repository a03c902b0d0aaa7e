"""Audit front (admins only): ``GET /api/audit`` as JSON or CSV, and
``GET /api/audit/fhir`` as a FHIR R4 Bundle of ``AuditEvent`` resources."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wsi_server.auth import policy
from wsi_server.context import AppContext, principal
from wsi_server.errors import BadRequest, Forbidden
from wsi_server.store.fhir import audit_bundle

MAX_LIMIT = 10_000
CSV_COLUMNS = ("time", "last_time", "count", "actor", "actor_name", "action", "slide",
               "outcome", "client", "detail")


def parse_time(name: str, raw: str | None) -> datetime | None:
    """An ISO 8601 instant (a date means its midnight UTC; no zone means UTC)."""
    if raw is None or raw == "":
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 date or time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_query(params: Any) -> dict[str, Any]:
    """The filters of an audit query: user, slide, action, since, until, limit, offset."""
    out: dict[str, Any] = {}
    for key in ("user", "slide", "action"):
        value = params.get(key)
        if value:
            if len(value) > 256:
                raise BadRequest(f"{key} is too long")
            out[key] = value
    out["since"] = parse_time("since", params.get("since"))
    out["until"] = parse_time("until", params.get("until"))
    for key, default in (("limit", 1000), ("offset", 0)):
        raw = params.get(key, str(default))
        if not raw.isdigit() or (key == "limit" and not 1 <= int(raw) <= MAX_LIMIT):
            raise BadRequest(f"{key} must be an integer"
                             + (f" from 1 to {MAX_LIMIT}" if key == "limit" else ""))
        out[key] = int(raw)
    return out


def to_csv(events: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for e in events:
        row = [e.get(c) for c in CSV_COLUMNS]
        row[-1] = json.dumps(e["detail"]) if e.get("detail") is not None else ""
        # a cell starting with = + - @ (or a tab or CR before one) is a formula to a
        # spreadsheet: neutralise it; an empty cell stays empty
        writer.writerow(["'" + v if isinstance(v, str) and v and v[0] in "=+-@\t\r" else v
                         for v in row])
    return buf.getvalue()


def routes(ctx: AppContext) -> list[BaseRoute]:
    auth = ctx.auth

    async def query(request: Request) -> list[Any]:
        who = principal(request)
        if not policy.can_audit(who):
            raise Forbidden("the audit trail is for administrators")
        filters = parse_query(request.query_params)
        return await auth.run(lambda: auth.audit.query(**filters))

    async def audit_json(request: Request) -> Response:
        records = await query(request)
        events = [r.as_dict() for r in records]
        fmt = request.query_params.get("format", "")
        accept = request.headers.get("accept", "")
        if fmt == "csv" or (not fmt and "text/csv" in accept):
            return Response(
                to_csv(events), media_type="text/csv; charset=utf-8",
                headers={"Cache-Control": "no-store",
                         "Content-Disposition": 'attachment; filename="audit.csv"'},
            )
        if fmt not in ("", "json"):
            raise BadRequest("format must be json or csv")
        return JSONResponse({"events": events}, headers={"Cache-Control": "no-store"})

    async def audit_fhir(request: Request) -> Response:
        records = await query(request)
        server = ctx.settings.public_url or "wsi-server"
        body = await auth.run(audit_bundle, records, server)
        await auth.record("admin.audit_export", principal(request),
                          client=request.client.host if request.client else None,
                          detail={"format": "fhir", "records": len(records)})
        return JSONResponse(body, media_type="application/fhir+json",
                            headers={"Cache-Control": "no-store"})

    return [Route("/api/audit", audit_json), Route("/api/audit/fhir", audit_fhir)]
