"""Stack options that used to fail late, loudly or silently: each is one line before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plantml.cli import main
from plantml.errors import ConfigError, StackError
from plantml.stack import make_stack
from plantml.stack.endpoints import StackEndpoints
from plantml.stack.external import check_bucket
from plantml.stack.folder import ENV_FILE_HEADER, StackFolder, check_env_file_target, registry
from plantml.stack.service import service_account


def test_a_users_own_env_file_is_refused_untouched_before_the_stack_starts(tmp_path: Path, capsys) -> None:
    own = tmp_path / ".env"
    own.write_text("MY_TEAM_SETTING=keep-me\n")

    assert main(["stack", "up", "--env-file", str(own)]) == 2  # refused at once: no stack was started

    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"plantml: error: --env-file {own}: exists and was not written by plantml stack up; it would be "
                   "replaced, then removed at stop: give a new file name"]
    assert own.read_text() == "MY_TEAM_SETTING=keep-me\n"


def test_upgrade_db_without_a_kept_folder_is_refused_before_anything_starts(capsys) -> None:
    assert main(["stack", "up", "--upgrade-db"]) == 2

    assert capsys.readouterr().err == ("plantml: error: --upgrade-db: only a kept stack's database (--data-dir DIR) has "
                                       "a schema to upgrade\n")


def test_an_env_file_a_stack_wrote_may_be_written_again(tmp_path: Path) -> None:
    mine = tmp_path / ".env"
    mine.write_text(ENV_FILE_HEADER + "MLFLOW_TRACKING_URI=http://127.0.0.1:1\n")
    check_env_file_target(mine)
    check_env_file_target(tmp_path / "new" / "folder" / "stack.env")  # folders made at write time


def test_the_env_file_of_a_running_stack_is_refused_untouched_before_a_second_stack_starts(tmp_path: Path,
                                                                                           monkeypatch) -> None:
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    running = StackFolder.open(tmp_path / "data", "running-stack")
    env = tmp_path / ".env"
    running.write_env_file(env, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    written = env.read_text()
    try:
        with pytest.raises(ConfigError, match=f"^--env-file {env}: is the env file of the stack running on "
                                              f"{tmp_path / 'data'}; stop that stack first, or give another file name$"):
            check_env_file_target(env)  # what `plantml stack up --env-file` runs before any service starts
        assert env.read_text() == written
    finally:
        running.close()
    check_env_file_target(tmp_path / "new.env")  # once it stopped, its file is gone and the name free again
    assert not env.exists()


def test_an_env_file_that_cannot_be_written_is_refused_before_the_stack_starts(tmp_path: Path) -> None:
    a_file = tmp_path / "plain"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=rf"--env-file {a_file}/x: cannot be written in {a_file} \(Not a directory\)"):
        check_env_file_target(a_file / "x")


@pytest.mark.parametrize("ports, message", [
    ({"mlflow_port": 23457, "s3_port": 23457}, "mlflow_port and s3_port are both 23457: each service needs its own port"),
    ({"mlflow_port": 70000}, "mlflow_port=70000: expected a port from 1 to 65535"),
    ({"postgres_port": 0}, "postgres_port=0: expected a port from 1 to 65535"),
])
def test_ports_that_cannot_work_are_refused_before_anything_starts(ports, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_stack("local", **ports)


def test_a_data_folder_the_object_store_cannot_use_is_named(tmp_path: Path) -> None:
    latin1 = Path(os.fsdecode(os.fsencode(tmp_path) + b"/pl\xe9nts"))
    with pytest.raises(ConfigError, match="its path is not UTF-8"):
        make_stack("local", data_dir=latin1)
    deep = tmp_path / ("d" * 100)
    with pytest.raises(ConfigError, match="would pass the 107-byte limit of a Unix socket path"):
        make_stack("local", data_dir=deep)


def test_a_short_link_to_a_data_folder_too_deep_for_the_sockets_is_refused(tmp_path: Path) -> None:
    """The services get the folder with its links resolved: ``~/stack -> /mnt/a/deep/folder`` is checked as the latter."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    (tmp_path / "s").symlink_to(deep)
    with pytest.raises(ConfigError, match=rf"^data folder {tmp_path}/s/stack: its path is .* would pass the 107-byte limit"):
        make_stack("local", data_dir=tmp_path / "s" / "stack")
    assert not (deep / "stack").exists()


def test_a_tmpdir_too_deep_for_the_sockets_of_a_temporary_stack_is_named_before_anything_starts(tmp_path, monkeypatch,
                                                                                                 capsys) -> None:
    import tempfile

    deep = tmp_path / ("t" * 90)  # a CI's or pytest's temporary folder: plantml-stack-XXXXXXXX/s3/filer.sock in it is too long
    deep.mkdir()
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(deep))  # what TMPDIR sets

    assert main(["stack", "up"]) == 2

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"plantml: error: temporary stack folder {deep}/plantml-stack-")
    assert line.endswith("would pass the 107-byte limit of a Unix socket path; set TMPDIR to a shorter folder, "
                         "or give --data-dir")
    assert list(deep.iterdir()) == []  # the folder made for it is gone, and no service ever ran

@pytest.mark.skipif(os.geteuid() != 0, reason="PLANTML_PG_USER only matters when plantml runs as root")
def test_a_postgres_account_that_does_not_exist_is_named_not_replaced(monkeypatch) -> None:
    monkeypatch.setenv("PLANTML_PG_USER", "nosuchuser")
    with pytest.raises(ConfigError, match="PLANTML_PG_USER='nosuchuser': no such account"):
        service_account(refuses_root=True)


def test_keys_a_client_found_earlier_in_the_process_are_not_sent_to_a_store_given_none(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Was: boto3's default session kept the keys its first client found in the environment (stack A's, from
    its .env), and a store checked later without keys was sent them; the unit suite in reverse order showed it."""
    import boto3

    from plantml.stack.endpoints import make_s3_client

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stack-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stack-a-secret")
    make_s3_client("http://127.0.0.1:1", None, None)  # found stack A's keys
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    endpoints = StackEndpoints("http://127.0.0.1:1", "http://127.0.0.1:2", None, None)
    with pytest.raises(StackError, match="no S3 keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        check_bucket(endpoints)


def test_an_external_stack_without_s3_keys_names_them(tmp_path: Path, monkeypatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # nor a cloud metadata service: loopback only
    endpoints = StackEndpoints("http://127.0.0.1:1", "http://127.0.0.1:1", None, None)
    with pytest.raises(StackError, match="no S3 keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        check_bucket(endpoints)


def test_a_cache_folder_that_is_a_file_is_named(tmp_path: Path, monkeypatch) -> None:
    a_file = tmp_path / "cache"
    a_file.write_text("")
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(a_file))
    with pytest.raises(ConfigError, match=r"PLANTML_CACHE_DIR: cannot keep the records of running stacks .*Not a directory"):
        registry()



def test_a_data_folder_another_account_made_is_refused_untouched(tmp_path: Path, monkeypatch) -> None:
    """Say /tmp/stack: whoever made it first owns it, and could later swap the stack's credentials.json for keys
    of their own choosing, which the next start would give the object store."""
    if os.geteuid() != 0:
        pytest.fail("this check plays another account through chown, which needs root")
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    squatted = tmp_path / "stack"
    squatted.mkdir()
    squatted.chmod(0o777)
    os.chown(squatted, 65534, 65534)  # nobody

    # what `plantml stack up --data-dir` opens first; a ConfigError is one line, exit 2
    with pytest.raises(ConfigError, match=rf"^--data-dir {squatted}: belongs to another account \(uid 65534\), which "
                                          "could replace the stack's credentials and data in it: give a folder of your own$"):
        StackFolder.open(squatted, "squatted")
    assert list(squatted.iterdir()) == [] and squatted.stat().st_mode & 0o777 == 0o777


def test_a_refused_stack_up_in_process_gives_the_caller_its_signal_handlers_and_logging_back(tmp_path: Path,
                                                                                             capsys) -> None:
    import logging
    import signal

    (tmp_path / "notes.txt").write_text("not a stack\n")
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {signum: signal.getsignal(signum) for signum in signums}
    handlers_before = list(logging.getLogger("plantml.stack.supervisor").handlers)

    assert main(["stack", "up", "--data-dir", str(tmp_path)]) == 2  # refused after the handlers went in

    assert "not empty and holds no plantml stack" in capsys.readouterr().err
    assert {signum: signal.getsignal(signum) for signum in signums} == before
    assert logging.getLogger("plantml.stack.supervisor").handlers == handlers_before


@pytest.mark.parametrize("keys", [True, False])
def test_an_aws_profile_that_is_nowhere_is_one_line_naming_the_variable(tmp_path: Path, monkeypatch, capsys, keys) -> None:
    """boto3 reads the profile's settings even with keys given (MLflow's client as well): AWS_PROFILE exported in a
    shell whose ~/.aws is on another machine (a container, a CI runner) was a traceback from `plantml train`."""
    import boto3

    from plantml.stack.endpoints import make_s3_client

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a session an earlier test made read no profile
    monkeypatch.setenv("AWS_PROFILE", "work")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    (tmp_path / "config").write_text("[profile home]\nregion = eu-west-3\n")
    with pytest.raises(ConfigError, match=r"^AWS_PROFILE='work': no such profile in boto3's files \(~/.aws/config, "):
        make_s3_client("http://127.0.0.1:9", "key" if keys else None, "secret" if keys else None)
    monkeypatch.chdir(tmp_path)
    for name, value in {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "key",
                        "AWS_SECRET_ACCESS_KEY": "secret"}.items():
        monkeypatch.setenv(name, value)
    assert main(["data", "ls", "s3://plants-images"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "plantml: error: AWS_PROFILE='work': no such profile in boto3's files (~/.aws/config, ~/.aws/credentials, "
        "or AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE); unset it, or name one of them"]


def test_an_account_without_a_passwd_line_is_one_line_before_postgres_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """A container run with --user UID (Jenkins' Docker agents, OpenShift): was a KeyError traceback from getpwuid at
    the first stack start. The account is named uidN and not listed; the local runner refuses it for PostgreSQL (its
    initdb refuses such an account) in one line naming the way out, and stops what it started."""
    import pwd

    import psutil

    from plantml.stack import service

    def unlisted(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    with monkeypatch.context() as patched:
        patched.setattr(service.pwd, "getpwuid", unlisted)
        account = service.current_account()
    assert account == service.Account(f"uid{os.geteuid()}", os.geteuid(), os.getegid(), "/", listed=False)
    service.check_listed("postgres", service.current_account())  # a listed account passes
    # the service account as a non-root plantml has it (it is plantml's own; here root's uid, so nothing changes user)
    monkeypatch.setattr(service, "service_account", lambda refuses_root: account)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(StackError) as refused:
        make_stack("local", data_dir=tmp_path / "stack").start()
    assert str(refused.value) == (
        f"postgres: this account (uid {os.geteuid()}) has no line in the password database (/etc/passwd), as in a "
        "container run with --user; PostgreSQL's initdb and server refuse to run without one: add it (or lend one "
        "with nss_wrapper, as PostgreSQL's image does), or use --backend containers")
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
