"""Real headless Chromium fixtures (see tests/test_viewer.py).

- ``live_server(folder, **settings)``: the app on a free loopback port, served by uvicorn in
  a background thread; returns its base URL. Stopped at the end of the test.
- ``chromium``: Debian's ``/usr/bin/chromium`` launched once per session through Playwright's
  Python API (``executable_path``), headless. Without the binary the tests are skipped
  locally and fail in CI (env ``CI`` set).
- ``page``: a fresh browser context and page per test (1280×800). When the test fails, a
  screenshot is saved as ``failure.png`` in the test's ``tmp_path``. Console errors and
  uncaught page errors are collected in ``page.wsi_console`` for assertions and reports.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from wsi_server.app import create_app
from wsi_server.settings import Settings

CHROMIUM = os.environ.get("WSI_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """uvicorn serving one app in a daemon thread on a loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
            access_log=False, lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}",
                                       daemon=True)

    def start(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live_server() -> Iterator[Callable[..., str]]:
    servers: list[ThreadedServer] = []

    def start(*paths: Path, **settings: Any) -> str:
        settings.setdefault("rescan_seconds", 0)
        server = ThreadedServer(Settings(paths=tuple(paths), **settings)).start()
        servers.append(server)
        return server.url

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (Debian package chromium)")
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests run last: Playwright's sync API keeps its event loop set as the main
    thread's running loop for the rest of the session (``chromium`` is session-scoped),
    and pytest-asyncio cannot run a test or fixture after that."""
    def uses_browser(item: pytest.Item) -> bool:
        return bool({"page", "chromium"} & set(getattr(item, "fixturenames", ())))

    items.sort(key=uses_browser)  # stable: the order is kept within each group


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"wsi_report_{report.when}", report)
    return report


@pytest.fixture
def page(chromium: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    context = chromium.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    messages: list[str] = []
    pg.on("console", lambda m: messages.append(f"{m.type}: {m.text}") if m.type == "error"
          else None)
    pg.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    pg.wsi_console = messages
    yield pg
    failed = any(
        getattr(getattr(request.node, f"wsi_report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    if failed:
        shot = tmp_path / "failure.png"
        try:
            pg.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot of the failed page: {shot}")
            if messages:
                print("browser console:\n  " + "\n  ".join(messages))
        except Exception as exc:  # a crashed page must not hide the test's own failure
            print(f"\nno screenshot ({exc!r})")
    context.close()
