"""The compose stack (compose/) agrees with plantml's defaults.

Docker cannot run the stack on this machine, so these tests read the files: services,
published ports, credentials, bucket, variable names and the server image's packages.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from plantml import settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from plantml.settings import read_env_file

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = COMPOSE_DIR / "mlflow.Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

INIT_JOB = "minio-init"

_INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


# --- helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def resolve_default(value: object) -> str:
    """Resolve compose ``${VAR:-default}`` interpolation with an empty environment."""

    def substitute(match: re.Match[str]) -> str:
        default = match.group("default")
        assert default is not None, f"{match.group(0)} has no default: the stack would need it set"
        return default

    return _INTERPOLATION.sub(substitute, str(value))


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a mapping, with ``${VAR:-default}`` resolved."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: resolve_default(value) for key, value in env.items()}


def published_ports(service: dict) -> dict[int, int]:
    """Container port -> published host port (short syntax "HOST:CONTAINER" or long syntax)."""
    result: dict[int, int] = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result[int(port["target"])] = int(port["published"])
            continue
        parts = str(port).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {port!r} publishes no fixed host port"
        result[int(parts[-1])] = int(parts[-2])
    return result


def argv(command: object) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def option(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in command {command}")


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def dockerfile_instructions() -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    return logical


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction in dockerfile_instructions():
        match = re.match(r"ARG\s+(\w+)=(\S+)", instruction)
        if match:
            args[match.group(1)] = match.group(2).strip("\"'")
    return args


def pip_requirements() -> list[str]:
    """Requirements passed to ``pip install`` in RUN instructions, ARG defaults substituted."""
    args = dockerfile_args()
    requirements = []
    for instruction in dockerfile_instructions():
        if not instruction.startswith("RUN") or "pip install" not in instruction:
            continue
        words = shlex.split(instruction.split("pip install", 1)[1])
        for word in words:
            if word in ("&&", ";"):
                break
            if word.startswith("-"):
                continue
            requirements.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), word))
    return requirements


def mlflow_command(services: dict) -> list[str]:
    return argv(services["mlflow"]["command"])


# --- services and ports ----------------------------------------------------------------


def test_compose_defines_postgres_minio_bucket_job_and_mlflow_services(services):
    assert set(services) >= {"postgres", "minio", INIT_JOB, "mlflow"}


def test_services_publish_the_design_host_ports(services):
    assert published_ports(services["postgres"]) == {5432: 5432}
    assert published_ports(services["minio"]) == {9000: 9000, 9001: 9001}
    assert list(published_ports(services["mlflow"]).values()) == [5001]


def test_postgres_is_version_15(services):
    assert services["postgres"]["image"].startswith("postgres:15")


# --- mlflow server ---------------------------------------------------------------------


def test_mlflow_backend_is_psycopg2_postgres_with_the_postgres_service_credentials(services):
    backend = urlsplit(option(mlflow_command(services), "--backend-store-uri"))
    pg_env = environment(services["postgres"])
    pg_container_port = next(iter(published_ports(services["postgres"])))

    assert backend.scheme == "postgresql+psycopg2"
    assert backend.hostname == "postgres"
    assert backend.port == pg_container_port
    assert backend.username == pg_env["POSTGRES_USER"]
    assert backend.password == pg_env["POSTGRES_PASSWORD"]
    assert backend.path.lstrip("/") == pg_env["POSTGRES_DB"]


def test_mlflow_default_artifact_root_is_the_plantml_default_bucket(services):
    assert option(mlflow_command(services), "--default-artifact-root") == f"s3://{settings.DEFAULT_BUCKET}/"


def test_mlflow_listens_on_the_container_port_it_publishes(services):
    command = mlflow_command(services)
    assert option(command, "--host") == "0.0.0.0"
    assert int(option(command, "--port")) in published_ports(services["mlflow"])


def test_mlflow_reaches_minio_with_the_minio_root_credentials(services):
    mlflow_env = environment(services["mlflow"])
    minio_env = environment(services["minio"])
    endpoint = urlsplit(mlflow_env["MLFLOW_S3_ENDPOINT_URL"])

    assert endpoint.hostname == "minio"
    assert endpoint.port in published_ports(services["minio"])
    assert mlflow_env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert mlflow_env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]


def test_mlflow_starts_after_healthy_postgres_and_a_completed_bucket_job(services):
    assert depends_on(services["mlflow"]) == {
        "postgres": "service_healthy",
        INIT_JOB: "service_completed_successfully",
    }


def test_mlflow_service_is_built_from_the_compose_dockerfile(services):
    build = services["mlflow"]["build"]
    assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


# --- bucket job ------------------------------------------------------------------------


def test_bucket_job_creates_every_bucket_of_the_plantml_setting(services, tmp_path):
    """Run the job's script in a shell, with a stand-in ``mc`` that records what it is asked to create."""
    fake_mc = tmp_path / "mc"
    fake_mc.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake_mc.chmod(0o755)
    # "$$" is compose's escape for a "$" the container's shell sees; "${VAR:-default}" is compose's own.
    script = resolve_default(" ".join(argv(services[INIT_JOB]["command"])).replace("$$", "\0")).replace("\0", "$")
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p"}
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30)
    created = [line.split()[-1] for line in (tmp_path / "calls").read_text().splitlines() if line.startswith("mb ")]
    assert created == [f"local/{name}" for name in settings.VARIABLES["PLANTML_S3_BUCKETS"].default.split(",")]
    assert settings.DEFAULT_BUCKET in settings.VARIABLES["PLANTML_S3_BUCKETS"].default.split(",")


def test_bucket_job_waits_for_healthy_minio(services):
    assert depends_on(services[INIT_JOB]) == {"minio": "service_healthy"}


# --- .env.example ----------------------------------------------------------------------


def test_env_example_names_only_plantml_variables(env_example):
    assert set(env_example) <= set(settings.ENV_NAMES.values())


def test_env_example_names_every_plantml_variable(env_example):
    assert set(settings.ENV_NAMES.values()) <= set(env_example)


def test_env_example_experiment_is_the_plantml_default(env_example):
    assert env_example[settings.ENV_NAMES["experiment_name"]] == settings.DEFAULT_EXPERIMENT_NAME


def test_env_example_tracking_uri_targets_the_mlflow_published_port(services, env_example):
    uri = urlsplit(env_example[settings.ENV_NAMES["tracking_uri"]])
    assert uri.scheme == "http"
    assert uri.hostname == "localhost"
    assert uri.port in published_ports(services["mlflow"]).values()


def test_env_example_s3_endpoint_targets_the_minio_published_api_port(services, env_example):
    minio_ports = published_ports(services["minio"])
    endpoint = urlsplit(env_example[settings.ENV_NAMES["s3_endpoint"]])
    # The API port is the one the server listens on; the other one is the console.
    console = int(option(argv(services["minio"]["command"]), "--console-address").rsplit(":", 1)[1])
    api_host_ports = {host for container, host in minio_ports.items() if container != console}

    assert endpoint.hostname == "localhost"
    assert api_host_ports == {endpoint.port}


def test_env_example_credentials_are_those_minio_starts_with(services, env_example):
    minio_env = environment(services["minio"])
    assert env_example[settings.ENV_NAMES["aws_access_key"]] == minio_env["MINIO_ROOT_USER"]
    assert env_example[settings.ENV_NAMES["aws_secret_key"]] == minio_env["MINIO_ROOT_PASSWORD"]


def test_env_example_documents_each_variable_with_a_comment():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"no comment above {line!r}"


# --- server image ----------------------------------------------------------------------


def test_dockerfile_installs_psycopg2_and_boto3():
    names = {Requirement(req).name.lower() for req in pip_requirements()}
    assert {"psycopg2-binary", "boto3"} <= names or {"psycopg2", "boto3"} <= names


def test_dockerfile_pins_mlflow_inside_the_pyproject_range():
    pinned = [Requirement(req) for req in pip_requirements() if Requirement(req).name == "mlflow"]
    assert len(pinned) == 1
    (specifier,) = pinned[0].specifier
    assert specifier.operator == "=="

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    (declared,) = [Requirement(dep) for dep in project["dependencies"] if Requirement(dep).name == "mlflow"]
    assert Version(specifier.version) in declared.specifier


def test_dockerfile_runs_as_a_non_root_user_with_an_overridable_command():
    instructions = dockerfile_instructions()
    users = [i.split(None, 1)[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(i.startswith("CMD ") for i in instructions)
    assert not any(i.startswith("ENTRYPOINT ") for i in instructions)


# --- healthchecks ----------------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck(services):
    missing = [name for name, svc in services.items() if name != INIT_JOB and not svc.get("healthcheck", {}).get("test")]
    assert missing == []


def test_the_one_shot_bucket_job_has_no_healthcheck_and_no_restart(services):
    job = services[INIT_JOB]
    assert "healthcheck" not in job
    assert job.get("restart", "no") == "no"
