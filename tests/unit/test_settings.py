"""Settings resolve argument > environment > .env file > default, and never show secrets."""

from __future__ import annotations

import pytest

from plantml.errors import ConfigError, StackError, TrackingError
from plantml.settings import DEFAULT_TRACKING_URI, TrackingSettings, resolve_tracking_settings
from plantml.text import mask_passwords


def test_with_nothing_set_the_default_is_the_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = resolve_tracking_settings(environ={})
    assert settings.tracking_uri == DEFAULT_TRACKING_URI
    assert settings.is_local


def test_an_argument_beats_the_environment_and_the_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=http://from-file:1\n")
    settings = resolve_tracking_settings("http://from-arg:1", environ={"MLFLOW_TRACKING_URI": "http://from-env:1"})
    assert settings.tracking_uri == "http://from-arg:1"


def test_the_environment_beats_the_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=http://from-file:1\nAWS_ACCESS_KEY_ID=file-key\n")
    settings = resolve_tracking_settings(environ={"MLFLOW_TRACKING_URI": "http://from-env:1"})
    assert settings.tracking_uri == "http://from-env:1"
    assert settings.aws_access_key == "file-key"


def test_an_env_file_with_export_lines_is_read(tmp_path):
    env_file = tmp_path / "stack.env"
    env_file.write_text('export MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:9000"\n')
    settings = resolve_tracking_settings(environ={}, env_file=env_file)
    assert settings.s3_endpoint == "http://127.0.0.1:9000"


def test_a_named_env_file_that_is_missing_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.env: not found"):
        resolve_tracking_settings(environ={}, env_file=tmp_path / "nope.env")


@pytest.mark.parametrize("uri", ["localhost:5001", "htp://127.0.0.1:5001"])
def test_a_tracking_uri_with_a_typo_is_refused_naming_it(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="tracking URI"):
        resolve_tracking_settings(uri, environ={})


def test_the_secret_never_shows_in_the_repr():
    settings = TrackingSettings(aws_access_key="key", aws_secret_key="very-secret-value")
    assert "very-secret-value" not in repr(settings)
    assert "key" in repr(settings)


def test_every_source_is_recorded_so_errors_can_name_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=http://from-file:1\n")
    settings = resolve_tracking_settings(experiment_name="x", environ={"AWS_ACCESS_KEY_ID": "k"})
    assert settings.source_of("tracking_uri") == f"MLFLOW_TRACKING_URI in .env in {tmp_path}"
    assert settings.source_of("aws_access_key") == "environment (AWS_ACCESS_KEY_ID)"
    assert settings.source_of("experiment_name") == "argument"
    assert settings.source_of("s3_endpoint") == "default"


def test_a_bad_uri_from_a_env_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=localhost:5001\n")
    with pytest.raises(ConfigError, match=r"from MLFLOW_TRACKING_URI in \.env in "):
        resolve_tracking_settings(environ={})


def test_every_variable_plantml_reads_is_in_the_one_table():
    """No module reads the environment by itself: every read goes through settings.env_value."""
    import re
    from pathlib import Path

    from plantml import settings

    package = Path(settings.__file__).parent
    read_names: set[str] = set()
    for source in package.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        # settings.py reads; tracking/environ.py only saves and restores what a scoped call changes
        if source.name not in ("settings.py", "environ.py"):
            assert not re.search(r"os\.environ\.get\(|os\.getenv\(", text), f"{source} reads the environment itself"
        read_names |= set(re.findall(r"env_(?:value|number|path)\(\s*\"([A-Z0-9_]+)\"", text))
    assert read_names <= set(settings.VARIABLES)


def test_the_settings_document_lists_every_variable():
    from pathlib import Path

    from plantml.settings import variables_table

    documented = (Path(__file__).parents[2] / "docs" / "settings.md").read_text(encoding="utf-8")
    assert variables_table() in documented


def test_a_malformed_number_is_one_line_naming_the_variable():
    from plantml.settings import env_number

    with pytest.raises(ConfigError, match=r"PLANTML_LINGER='soon': expected a number"):
        env_number("PLANTML_LINGER", environ={"PLANTML_LINGER": "soon"})


@pytest.mark.parametrize("variable, text, expected", [
    ("PLANTML_REQUEST_TIMEOUT", "nan", "PLANTML_REQUEST_TIMEOUT='nan': expected a finite number"),
    ("PLANTML_DELIVERY_TIMEOUT", "inf", "PLANTML_DELIVERY_TIMEOUT='inf': expected a finite number"),
    ("PLANTML_REQUEST_TIMEOUT", "0", "PLANTML_REQUEST_TIMEOUT='0': must be above 0"),
    ("PLANTML_LINGER", "-1", "PLANTML_LINGER='-1': must be at least 0"),
    ("PLANTML_MAX_BUFFERED", "0", "PLANTML_MAX_BUFFERED='0': must be at least 1"),
])
def test_a_delivery_setting_out_of_range_is_one_line_naming_the_variable(monkeypatch, variable, text, expected):
    from plantml.tracking.sender import resolve_delivery_settings

    monkeypatch.setenv(variable, text)
    with pytest.raises(ConfigError) as info:
        resolve_delivery_settings()
    assert str(info.value) == expected


@pytest.mark.parametrize("content, expected", [
    (b"X=\xff\n", r"\.env in .*: not UTF-8 \(byte 0xff at offset 2\)"),
    (None, r"\.env in .*: cannot be read \(Input/output error\)"),
])
def test_a_dot_env_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch, content, expected):
    monkeypatch.chdir(tmp_path)
    if content is None:
        (tmp_path / ".env").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO), root included
    else:
        (tmp_path / ".env").write_bytes(content)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(ConfigError, match=expected):
        resolve_tracking_settings()


def test_a_sqlite_uri_with_two_slashes_says_how_many_it_needs():
    with pytest.raises(ConfigError, match=r"'sqlite://relative.db' \(from argument\): a sqlite URI has three slashes"):
        resolve_tracking_settings(tracking_uri="sqlite://relative.db")


@pytest.mark.parametrize("text, shown", [
    ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("'http://alice:p@ss:w0rd@127.0.0.1:1' and http://bob:x@h/api", "'http://alice:***@127.0.0.1:1' and http://bob:***@h/api"),
    ("http://127.0.0.1:5001/api/2.0/runs", "http://127.0.0.1:5001/api/2.0/runs"),
    ("models:/leaf@production s3://bucket/key@1 user@host", "models:/leaf@production s3://bucket/key@1 user@host"),
])
def test_a_password_inside_a_url_is_masked_and_nothing_else(text, shown):
    assert mask_passwords(text) == shown


@pytest.mark.parametrize("uri", ["postgres://alice:s3cret@127.0.0.1/mlflow", "pg://u:s3cret@h/db", "sqlite://u:s3cret@x"])
def test_a_refused_tracking_uri_never_shows_its_password(uri):
    """``postgres://`` (SQLAlchemy's old name, Heroku's URLs) is refused, and the message names it without the password."""
    with pytest.raises(ConfigError) as refused:
        resolve_tracking_settings(environ={"MLFLOW_TRACKING_URI": uri}, env_file=None)
    assert "s3cret" not in str(refused.value)
    assert "(from environment (MLFLOW_TRACKING_URI))" in str(refused.value)


def test_no_plantml_error_shows_a_password_inside_a_url():
    error = TrackingError("http://alice:s3cret@127.0.0.1:1: tracking server not reachable")
    assert str(error) == "http://alice:***@127.0.0.1:1: tracking server not reachable"
    assert "s3cret" not in str(StackError("mlflow", "down", log_tail="connecting to postgresql://u:s3cret@h/db"))


@pytest.mark.parametrize("text, verify", [("true", False), ("1", False), ("TRUE", False), ("false", None), ("0", None), ("", None)])
def test_mlflow_s3_ignore_tls_is_read_as_mlflow_reads_it(text, verify):
    from plantml.settings import s3_tls_verify

    assert s3_tls_verify({"MLFLOW_S3_IGNORE_TLS": text}) is verify


def test_an_mlflow_s3_ignore_tls_mlflow_refuses_is_one_line_naming_it():
    from plantml.settings import s3_tls_verify

    with pytest.raises(ConfigError, match=r"^MLFLOW_S3_IGNORE_TLS='yes': expected true, false, 1 or 0"):
        s3_tls_verify({"MLFLOW_S3_IGNORE_TLS": "yes"})


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, {}),  # no proxy: nothing changes
    ({"NO_PROXY": ""}, {}),
    ({"HTTPS_PROXY": "http://proxy.corp:3128"}, {"no_proxy": "127.0.0.1,localhost,::1,[::1]", "NO_PROXY": "127.0.0.1,localhost,::1,[::1]"}),
    ({"http_proxy": "http://proxy.corp:3128", "no_proxy": ".corp, intranet"},
     {"no_proxy": ".corp,intranet,127.0.0.1,localhost,::1,[::1]", "NO_PROXY": ".corp,intranet,127.0.0.1,localhost,::1,[::1]"}),
    ({"ALL_PROXY": "socks5://proxy.corp:1080", "NO_PROXY": "localhost,127.0.0.1"},
     {"no_proxy": "localhost,127.0.0.1,::1,[::1]", "NO_PROXY": "localhost,127.0.0.1,::1,[::1]"}),
    ({"HTTP_PROXY": "http://proxy.corp:3128", "no_proxy": "127.0.0.1,localhost,::1,[::1]", "NO_PROXY": "127.0.0.1,localhost,::1,[::1]"}, {}),
    ({"HTTP_PROXY": "http://proxy.corp:3128", "NO_PROXY": "*"}, {}),  # no proxy for any host already
])
def test_where_a_proxy_is_set_the_loopback_is_added_to_no_proxy_after_the_users_hosts(environ, expected):
    from plantml.settings import bypass_proxies_for_loopback

    before = dict(environ)
    assert bypass_proxies_for_loopback(environ) == expected
    assert environ == {**before, **expected}


@pytest.mark.parametrize("entry", ["settings", "registry"])
def test_with_the_loopback_added_requests_botocore_and_urllib_skip_the_proxy_for_it_alone(monkeypatch, entry):
    """The three HTTP clients of plantml, MLflow and boto3 (urllib: torch's weight downloads) each decide by their
    own reading of the variables: 127.0.0.1, localhost and [::1] go direct, any other host still through the proxy."""
    import urllib.request

    import botocore.utils
    import requests.utils

    from plantml.settings import bypass_proxies_for_loopback

    for name in ("no_proxy", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("no_proxy", "")  # recorded, so the test's end removes what the function sets
    monkeypatch.setenv("NO_PROXY", "")
    loopback = ["http://127.0.0.1:5000/api", "http://localhost:9000/mlflow", "http://[::1]:8333/"]
    assert not any(requests.utils.should_bypass_proxies(url, None) for url in loopback)
    if entry == "settings":  # what every tracker and command does first
        resolve_tracking_settings(tracking_uri="http://127.0.0.1:5000")
    else:  # a registry given its URI resolves no settings
        from plantml.registry import ModelRegistry

        ModelRegistry("http://127.0.0.1:5000")
    assert all(requests.utils.should_bypass_proxies(url, None) for url in loopback)
    assert all(botocore.utils.should_bypass_proxies(url) for url in loopback)
    assert all(urllib.request.proxy_bypass(url.split("/")[2]) for url in loopback)
    assert requests.utils.get_environ_proxies("http://127.0.0.1:5000/api") == {}
    outside = "http://download.pytorch.org/models/resnet18.pth"
    assert not requests.utils.should_bypass_proxies(outside, None)
    assert requests.utils.get_environ_proxies(outside)["http"] == "http://proxy.corp:3128"
    assert not botocore.utils.should_bypass_proxies(outside) and not urllib.request.proxy_bypass("download.pytorch.org")
    assert bypass_proxies_for_loopback() == {}  # once is enough


@pytest.mark.parametrize(("keys_in", "token_in", "kept"), [
    ("dot_env", "environment", False),  # a stack's .env, a shell after an AWS SSO login
    ("argument", "environment", False),
    ("environment", "environment", True),  # temporary keys with their token, as for real S3
    ("dot_env", "dot_env", True),
    ("environment", "dot_env", False),
])
def test_a_session_token_goes_only_with_keys_from_where_it_came_from(tmp_path, monkeypatch, keys_in, token_in, kept):
    monkeypatch.chdir(tmp_path)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    keys = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    places = {"dot_env": {}, "environment": {}}
    if keys_in != "argument":
        places[keys_in].update(keys)
    places[token_in]["AWS_SESSION_TOKEN"] = "token-of-those-keys"
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in places["dot_env"].items()))
    for name, value in places["environment"].items():
        monkeypatch.setenv(name, value)
    arguments = {"aws_access_key": "key", "aws_secret_key": "secret"} if keys_in == "argument" else {}
    settings = resolve_tracking_settings(**arguments)
    assert settings.aws_session_token == ("token-of-those-keys" if kept else None)
    env = settings.client_env()
    assert (env["AWS_SESSION_TOKEN"], env["AWS_SECURITY_TOKEN"]) == ("token-of-those-keys" if kept else "", "")
    assert "token-of-those" not in repr(settings)


def test_without_keys_the_token_is_left_to_boto3(tmp_path, monkeypatch):
    """Keys from ~/.aws or a cloud role: boto3 finds them with their token, plantml sets neither."""
    monkeypatch.chdir(tmp_path)  # no .env
    env = resolve_tracking_settings(tracking_uri="http://127.0.0.1:1", environ={"AWS_SESSION_TOKEN": "token"}).client_env()
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"} & set(env)
