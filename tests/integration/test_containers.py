"""The containers backend: failures are clear and leave no container; killed sessions are cleaned up.

Part of the ``--stack containers`` session (each test builds its own stacks); needs Docker
and the images of ``plantml stack build-images``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import requests
from click.testing import CliRunner

from plantml.errors import StackError
from plantml.stack import mlflow_server, stack
from plantml.stack.containers import ContainerRunner, ContainersStack
from plantml.stack.docker_api import LABEL, LABEL_PID, check_image, docker_client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docker():
    """The Docker client (this file is collected only in a ``--stack containers`` session: see conftest.py)."""
    return docker_client()


def _containers_of(docker, **labels: str) -> list:
    filters = [LABEL] + [f"{key}={value}" for key, value in labels.items()]
    return docker.containers.list(all=True, filters={"label": filters})


def test_a_missing_image_says_to_run_build_images_and_starts_nothing(docker, monkeypatch):
    monkeypatch.setenv("PLANTML_MLFLOW_IMAGE", "plantml/no-such-image:0")
    stack = ContainersStack()
    with pytest.raises(StackError, match=r"mlflow: image 'plantml/no-such-image:0' .*plantml stack build-images"):
        stack.start()
    assert _containers_of(docker, **{LABEL: stack.stack_id}) == []


def test_a_failed_start_shows_the_containers_log_and_removes_every_container(docker, monkeypatch):
    def broken(*args, **kwargs):
        return replace(mlflow_server.mlflow_service(*args, **kwargs), command=("mlflow", "server", "--no-such-flag"))

    monkeypatch.setattr(stack, "mlflow_service", broken)
    containers = ContainersStack()
    with pytest.raises(StackError) as failure:
        containers.start()
    assert failure.value.service == "mlflow"
    assert "exited with code" in failure.value.cause
    assert "no-such-flag" in failure.value.log_tail  # the container's own output
    assert "--- last lines of the mlflow log ---" in str(failure.value)
    assert _containers_of(docker, **{LABEL: containers.stack_id}) == []
    assert not containers.folder_path.exists()


def test_every_endpoint_is_on_loopback_and_stop_removes_the_containers(docker, monkeypatch):
    """Its S3 container is created only once another service has recorded the stack's pids: the services start at
    once, each up records every pid, and one whose container was still being created failed that record
    ("Container is not started": the stack's start failed on a loaded machine)."""
    recorded = threading.Event()
    save_state, describe = ContainersStack._save_state, ContainerRunner.describe

    def save_and_tell(self: ContainersStack) -> None:
        try:
            save_state(self)
        finally:
            recorded.set()

    def s3_created_late(self: ContainerRunner, spec, name, one_off=None):  # noqa: ANN001, ANN202
        container = describe(self, spec, name, one_off)
        if spec.name == "s3" and one_off is None:
            start = container.start
            container.start = lambda: (recorded.wait(60), start())[1]
        return container

    monkeypatch.setattr(ContainersStack, "_save_state", save_and_tell)
    monkeypatch.setattr(ContainerRunner, "describe", s3_created_late)
    with ContainersStack() as stack:
        endpoints = stack.endpoints
        assert endpoints.tracking_uri.startswith("http://127.0.0.1:")
        assert endpoints.s3_endpoint.startswith("http://127.0.0.1:")
        assert "@127.0.0.1:" in endpoints.database_uri
        assert requests.get(f"{stack.tracking_uri}/health", timeout=5).status_code == 200
        assert len(_containers_of(docker, **{LABEL: stack.stack_id})) == 3
    assert _containers_of(docker, **{LABEL: stack.stack_id}) == []


def test_a_container_runs_its_description_as_the_host_account_on_its_own_folder(mlflow_stack):
    postgres = mlflow_stack.services["postgres"]
    attrs = postgres.process.docker_container.attrs
    folder = str(postgres.spec.folder)
    account = postgres.spec.account
    assert attrs["Config"]["User"] == f"{account.uid}:{account.gid}"  # the same owner as on the host runner
    assert attrs["Config"]["Entrypoint"] == ["postgres"] and attrs["Config"]["Cmd"] == list(postgres.spec.command[1:])
    assert f"{folder}:{folder}:rw" in attrs["HostConfig"]["Binds"]
    assert attrs["HostConfig"]["NetworkMode"] in ("host", f"plantml-{mlflow_stack.stack_id}")
    assert Path(folder, "data", "PG_VERSION").is_file()  # the cluster lives in the stack's folder, not the container
    for service in mlflow_stack.services.values():  # a stack kept for months: Docker caps each log, as trim_log does
        log_config = service.process.docker_container.attrs["HostConfig"]["LogConfig"]
        assert log_config == {"Type": "json-file", "Config": {"max-size": "32m", "max-file": "2"}}, service.name


SESSION = textwrap.dedent("""
    import json, time, psutil
    from plantml.stack.containers import ContainersStack
    stack = ContainersStack().start()
    reaper = next(p.pid for p in psutil.Process().children() if "plantml.stack.reaper" in " ".join(p.cmdline()))
    print(json.dumps({"reaper": reaper, "folder": str(stack.folder.path)}), flush=True)
    time.sleep(600)
""")


def test_stack_prune_removes_what_a_killed_session_and_its_killed_reaper_left(docker):
    from plantml.cli.stack import stack as stack_command

    session = subprocess.Popen([sys.executable, "-c", SESSION], stdout=subprocess.PIPE, text=True)
    try:
        left = json.loads(session.stdout.readline())
        psutil.Process(left["reaper"]).kill()  # the reaper gone first, then its owner: nothing cleans up
    finally:
        session.send_signal(signal.SIGKILL)
        session.wait()
    assert len(_containers_of(docker, **{LABEL_PID: str(session.pid)})) == 3
    assert Path(left["folder"]).is_dir()

    result = CliRunner().invoke(stack_command, ["prune"])

    assert result.exit_code == 0, result.output
    assert "removed 3 container(s)" in result.output
    # Every stack's start also prunes dead stacks' folders: another pytest worker's start may have removed this one
    # first (seen with three workers). Either way it is gone below, and the prune said which it removed.
    assert f"stack folder {left['folder']}" in result.output or "removed 0 local leftover(s)" in result.output
    assert _containers_of(docker, **{LABEL_PID: str(session.pid)}) == []
    # a prune that another worker's start began (it holds the folder's lock, so this one passed it by) may still be
    # removing the folder: gone within seconds, whichever prune removes it
    deadline = time.monotonic() + 60
    while Path(left["folder"]).exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(left["folder"]).exists()


def test_stack_prune_keeps_a_live_owners_containers_and_prune_all_removes_them(docker, monkeypatch):
    """``prune --all`` removes every plantml container, a live session's too; ``prune`` alone only those of dead
    owners. The label is narrowed to this test's own: a real ``--all`` would end the other workers' stacks."""
    from plantml.cli.stack import stack as stack_command
    from plantml.stack import docker_api
    from plantml.stack.images import default_postgres_image

    label = f"plantml.stack-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(docker_api, "LABEL", label)
    container = docker.containers.run(default_postgres_image(), ["sleep", "300"], entrypoint=[], detach=True,
                                      network_mode="none", labels=docker_api.owner_labels("live-session"))
    try:
        kept = CliRunner().invoke(stack_command, ["prune"])
        assert kept.exit_code == 0, kept.output
        assert "removed 0 container(s)" in kept.output
        assert docker.containers.get(container.id).status == "running"  # its owner, this process, is alive

        removed = CliRunner().invoke(stack_command, ["prune", "--all"])

        assert removed.exit_code == 0, removed.output
        assert "removed 1 container(s)" in removed.output and container.name in removed.output
        assert docker.containers.list(all=True, filters={"label": label}) == []
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


def test_a_folder_kept_by_one_backend_is_served_by_the_other_in_another_mode(tmp_path):
    """``--data-dir DIR``, "same or other backend options": local processes (direct artifacts), then containers
    (proxied artifacts, MLflow's auth), then local processes again, all on one folder: the same run and file."""
    import shutil
    import tempfile
    import uuid

    import mlflow

    from plantml.stack import LocalStack
    from plantml.tracking.environ import forget_stale_s3_clients

    folder = Path(tempfile.mkdtemp(prefix="plantml-switch-"))  # every service account must traverse its parents
    try:
        with LocalStack("direct", data_dir=folder) as first, pytest.MonkeyPatch.context() as patch:
            for variable, value in first.client_env().items():
                patch.setenv(variable, value)
            forget_stale_s3_clients()  # plain MLflow: its S3 clients cached with another stack's keys must go
            client = mlflow.MlflowClient(first.tracking_uri)
            run_id = client.create_run(client.create_experiment(f"switch_{uuid.uuid4().hex[:8]}")).info.run_id
            client.log_metric(run_id, "val_loss", 0.5, step=1)
            (tmp_path / "notes.txt").write_text("kept across backends")
            client.log_artifact(run_id, str(tmp_path / "notes.txt"))
            client.set_terminated(run_id)

        def read_back(stack) -> tuple[list, str]:
            with pytest.MonkeyPatch.context() as patch:
                for variable, value in stack.client_env().items():
                    patch.setenv(variable, value)
                forget_stale_s3_clients()
                reader = mlflow.MlflowClient(stack.tracking_uri)
                history = [(m.step, m.value) for m in reader.get_metric_history(run_id, "val_loss")]
                local = reader.download_artifacts(run_id, "notes.txt", str(tmp_path / uuid.uuid4().hex))
                return history, Path(local).read_text()

        with ContainersStack("proxied", data_dir=folder, auth=True) as second:
            assert second.artifact_mode == "proxied" and "MLFLOW_TRACKING_PASSWORD" in second.client_env()
            assert read_back(second) == ([(1, 0.5)], "kept across backends")
        with LocalStack("direct", data_dir=folder) as third:
            assert read_back(third) == ([(1, 0.5)], "kept across backends")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_missing_image_names_the_build_command_the_variable_and_the_pytest_option():
    with pytest.raises(StackError) as info:
        check_image(docker_client(), "mlflow", "plantml/nope:1")
    assert str(info.value) == ("mlflow: image 'plantml/nope:1' is not present locally: run `plantml stack build-images` "
                               "(no registry needed), or set PLANTML_MLFLOW_IMAGE (pytest: --mlflow-image) to one that is")


def test_a_container_removed_under_the_stack_is_made_again_on_its_folder(private_mlflow_stack, docker):
    """``docker rm -f`` of a service's container: the supervisor makes it again from its description, on its folder
    and port, rather than trying to start a container that no longer exists until the stack gives up."""
    from botocore.exceptions import BotoCoreError, ClientError
    from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

    s3 = private_mlflow_stack.s3_client()
    s3.put_object(Bucket="mlflow", Key="before-the-removal.txt", Body=b"leaf")
    process = private_mlflow_stack.services["s3"].process
    removed = process.docker_container.id

    docker.containers.get(removed).remove(force=True)

    @retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(60), wait=wait_fixed(0.2), reraise=True)
    def reads_back() -> bool:
        try:
            return s3.get_object(Bucket="mlflow", Key="before-the-removal.txt")["Body"].read() == b"leaf"
        except (BotoCoreError, ClientError):  # not made again yet
            return False

    assert reads_back()
    assert process.docker_container.id != removed
    assert [c.name for c in _containers_of(docker, **{LABEL: private_mlflow_stack.stack_id})].count(process.container_name) == 1


def test_build_images_on_current_images_rebuilds_none_of_them():
    """What ``.ci/run`` and the README rely on: a second ``build-images`` finds the three images current (their
    inputs' fingerprint unchanged) and leaves them as they are."""
    from plantml.stack import images

    before = {key: images.image_id(recipe.name) for key, recipe in images.recipes().items()}
    result = subprocess.run([sys.executable, "-m", "plantml", "stack", "build-images"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(f"{recipe.name}: up to date" for recipe in images.recipes().values())
    assert lines[-1].startswith("images ready in ")
    assert {key: images.image_id(recipe.name) for key, recipe in images.recipes().items()} == before


def test_an_image_is_rebuilt_when_one_of_its_inputs_changes_and_its_old_image_dropped(tmp_path):
    """The fingerprint at work on a real daemon, with an image of this test's own (the session's stacks use the
    three defaults): built, current while its file is unchanged, rebuilt once the file changes, the old one gone."""
    from plantml.stack import images

    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\necho one\n", encoding="utf-8")
    recipe = images.ImageRecipe(service="s3", name=f"plantml-test/rebuild:{uuid.uuid4().hex[:8]}",
                                files=((str(tool), "/usr/local/bin/tool"),), changes=('CMD ["/usr/local/bin/tool"]',))
    try:
        assert images.build_image(recipe).startswith("built in ")
        first = images.image_id(recipe.name)
        assert images.build_image(recipe) == "up to date"
        assert images.image_id(recipe.name) == first

        tool.write_text("#!/bin/sh\necho two\n", encoding="utf-8")
        assert images.build_image(recipe).startswith("built in ")
        second = images.image_id(recipe.name)
        assert second not in (None, first)
        assert subprocess.run(["docker", "image", "inspect", first], capture_output=True).returncode != 0
        assert images.build_image(recipe, force=True).startswith("built in ")  # --force: even when current
    finally:
        subprocess.run(["docker", "image", "rm", "-f", recipe.name], capture_output=True, check=False)
