"""The OpenAPI description (``GET /openapi.json``) is true: every route of the router is in
it and described, and schemathesis, run against a live server, finds no 5xx and no
response that the document does not allow."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as sc

from wsi_server.app import create_app
from wsi_server.settings import Settings
from wsi_server.web.openapi import document, route_table, undescribed

CHECKS = [sc.not_a_server_error, sc.status_code_conformance, sc.content_type_conformance,
          sc.response_schema_conformance]
EXAMPLES = 25


def _apps(tmp_path: Path, lib: Path) -> dict[str, Any]:
    """Apps with every optional route mounted: sign-in routes (OIDC), benchmark routes,
    ingest."""
    base = {"paths": (lib,), "rescan_seconds": 0, "state_dir": tmp_path / "state",
            "isolate_open": False}
    return {
        "default": create_app(Settings(**base)),
        "everything": create_app(Settings(
            **base, bench_routes=True, ingest=tmp_path / "watch", auth="oidc",
            oidc_issuer="http://127.0.0.1:9", oidc_client_id="wsi")),
    }


def test_every_route_of_the_router_is_described(
    tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    for name, app in _apps(tmp_path, synthetic_slides["generic"]).items():
        missing = undescribed(app.router.routes)
        assert not missing, (
            f"routes of the {name} app without a description in wsi_server/web/openapi.py "
            f"OPERATIONS: {missing}")
        doc = document(app.router.routes)
        table = route_table(app.router.routes)
        assert {(p, m) for p, m in table} == {
            (p, m) for p, ops in doc["paths"].items() for m in ops}
        ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
        assert len(ids) == len(set(ids))
    # the standard fronts are present, coarsely described
    paths = document(_apps(tmp_path / "b", synthetic_slides["generic"])["default"]
                     .router.routes)["paths"]
    assert any(p.startswith("/dicomweb/") for p in paths)
    assert any(p.startswith("/iiif/3/") for p in paths)


def test_openapi_json_is_served_and_valid(
    make_client: Any, synthetic_slides: dict[str, Path]
) -> None:
    client = make_client(paths=(synthetic_slides["generic"],))
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    assert doc == document(client.app.router.routes)
    schemathesis.openapi.from_dict(doc).validate()
    slides = doc["paths"]["/api/slides"]["get"]["responses"]["200"]
    assert "slide" in slides["links"]


def test_a_route_without_a_description_is_reported() -> None:
    from starlette.responses import Response
    from starlette.routing import Route

    async def new(request: Any) -> Response:
        return Response()

    routes = [Route("/api/brand-new/{thing}", new)]
    assert undescribed(routes) == [("/api/brand-new/{thing}", "get")]
    entry = document(routes)["paths"]["/api/brand-new/{thing}"]["get"]
    assert entry["x-undescribed"] is True


# -- schemathesis against a live server ------------------------------------------------------
@pytest.fixture
def api_url(live_server: Callable[..., str], tmp_path: Path,
            synthetic_slides: dict[str, Path]) -> str:
    lib = tmp_path / "lib"
    (lib / "collection").mkdir(parents=True)
    shutil.copy(synthetic_slides["odd"], lib / "collection" / "odd.tiff")
    shutil.copy(synthetic_slides["aperio-ycbcr"], lib / "small.svs")
    (lib / "zz-broken.svs").write_bytes(synthetic_slides["aperio-ycbcr"].read_bytes()[:3000])
    return live_server(lib, state_dir=tmp_path / "state", ingest=tmp_path / "watch",
                       isolate_open=False)


@pytest.fixture
def api_schema(api_url: str) -> Any:
    return schemathesis.openapi.from_url(api_url + "/openapi.json")


def test_api_conforms(api_schema: Any) -> None:
    """Every operation, a bounded number of generated requests each (examples and
    fuzzed values, valid and invalid): the checks of ``CHECKS`` on every response."""
    failures: list[str] = []
    count = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # every operation's, not the first
            failures.append(f"{operation.label}: {exc}")
        count += 1
    assert count >= 40
    assert not failures, "\n\n".join(failures)


def test_api_conforms_when_walked_through_its_links(api_schema: Any, api_url: str) -> None:
    # a real slide id comes from GET /api/slides, through the document's links
    assert httpx.get(api_url + "/api/slides").json()["slides"]
    machine = api_schema.as_state_machine()

    seen: Counter[tuple[str, int]] = Counter()

    class Walk(machine):  # type: ignore[misc,valid-type]
        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            seen[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS)

    Walk.run(settings=settings(max_examples=30, stateful_step_count=6, deadline=None,
                               derandomize=True, database=None,
                               suppress_health_check=list(HealthCheck)))
    # the walk reached real slides: their metadata, descriptors and thumbnails answered 200
    reached = {label for (label, status) in seen if status == 200}
    assert any(label.startswith(("GET /api/slides/{slide_id}", "GET /slides/{slide_id}"))
               for label in reached), seen
