"""The Dockerfile and compose.yaml cannot be built here (no Docker engine): check what can
be checked without one: they parse, name only real settings, and keep their promises
(multi-stage, non-root, health check, N replicas, Redis evicting by LRU)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsi_server import settings as settings_mod

ROOT = Path(__file__).resolve().parent.parent
SETTING_VARS = {settings_mod.env_name(f.name) for f in settings_mod.fields()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_every_wsi_variable_in_the_deploy_files_is_a_setting() -> None:
    for name in ("Dockerfile", "compose.yaml"):
        used = set(re.findall(r"\bWSI_[A-Z0-9_]+", (ROOT / name).read_text()))
        assert used, name
        assert used <= SETTING_VARS, (name, used - SETTING_VARS)


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    steps = _dockerfile()
    froms = [i for i, (instr, _) in enumerate(steps) if instr == "FROM"]
    assert len(froms) >= 2
    final = steps[froms[-1]:]
    assert any(instr == "COPY" and "--from=" in args for instr, args in final)
    users = [args for instr, args in final if instr == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    health = [args for instr, args in final if instr == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    assert any(instr == "ENTRYPOINT" and "wsi-server" in args for instr, args in final)
    env = " ".join(args for instr, args in final if instr == "ENV")
    assert "WSI_HOST=0.0.0.0" in env  # reachable from outside the container


def test_compose_runs_replicas_sharing_an_lru_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis_name = next(n for n, s in services.items() if "redis" in str(s.get("image", "")))
    command = [str(c) for c in services[redis_name]["command"]]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in command
    servers = [s for s in services.values() if "WSI_REDIS_URL" in (s.get("environment") or {})]
    assert len(servers) == 1
    server = servers[0]
    env = server["environment"]
    assert set(env) <= SETTING_VARS
    assert re.match(rf"redis://{redis_name}:\d+/\d+$", env["WSI_REDIS_URL"])
    replicas = str(server["deploy"]["replicas"])
    default = re.fullmatch(r"\$\{\w+:-(\d+)\}", replicas)
    assert int(default.group(1) if default else replicas) >= 2
    assert redis_name in server["depends_on"]
    for value in env.values():  # compose wants strings, not YAML numbers or booleans
        assert isinstance(value, str)
    # every setting given in compose parses with the settings' own converters
    settings_mod.from_sources(None, {k: v for k, v in env.items() if k != "WSI_PATHS"})
