"""``docker-compose config`` (v1, from PyPI, in its own cached venv) accepts docker-compose.yml as written."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(tempfile.gettempdir()) / "clora-compose-venv"
MARKER = VENV / ".clora-installed-1.29.2"


@pytest.fixture(scope="session")
def docker_compose() -> Path:
    """Path of a docker-compose 1.29.2 binary, installed once into a venv under the temp dir and reused."""
    exe = VENV / "bin" / "docker-compose"
    if MARKER.is_file() and exe.is_file():
        return exe
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        pip + ["cython<3", "wheel", "setuptools<70"],
        pip + ["--no-build-isolation", "pyyaml==5.4.1"],  # PyYAML 5.4.1 does not build with Cython 3
        pip + ["docker-compose==1.29.2"],
    ]
    for cmd in steps:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing docker-compose timed out at: {' '.join(cmd)}")
        if res.returncode != 0:
            pytest.skip(f"pip could not install docker-compose v1 ({' '.join(cmd[-2:])}): {res.stderr[-500:]}")
    MARKER.write_text("ok\n")
    return exe


def run_config(exe: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CLORA_", "GRAFANA_", "REDIS_", "PROMETHEUS_"))}
    res = subprocess.run(
        [str(exe), "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"), *extra, "config"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**clean, **(env or {})},
    )
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_docker_compose_config_accepts_the_file(docker_compose: Path) -> None:
    doc = run_config(docker_compose)
    services = doc["services"]
    assert set(services) == {"server", "redis", "prometheus", "grafana"}
    server = services["server"]
    assert server["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim-bookworm"
    assert Path(server["build"]["context"]) == ROOT
    assert server["environment"]["CLORA_REDIS_URL"] == "redis://redis:6379/0"
    assert "CLORA_ADMIN_TOKEN" not in server["environment"] or server["environment"]["CLORA_ADMIN_TOKEN"] is None
    assert server["healthcheck"]["start_period"] in ("2m0s", "120s", "2m")
    assert {p["published"] if isinstance(p, dict) else p for p in server["ports"]}
    for name in ("server", "redis", "prometheus"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert set(doc["volumes"]) >= {"clora-adapters", "clora-model-cache"}


def test_docker_compose_config_with_env_file(docker_compose: Path) -> None:
    doc = run_config(docker_compose, "--env-file", str(ROOT / "deploy" / ".env.example"),
                     env={"CLORA_ADMIN_TOKEN": "a-long-admin-token"})
    services = doc["services"]
    assert services["server"]["environment"]["CLORA_ADMIN_TOKEN"] == "a-long-admin-token"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "change-me"
    assert "--maxmemory" in services["redis"]["command"]
