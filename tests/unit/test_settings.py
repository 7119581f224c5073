"""Settings resolve argument > environment > .env file > default, and never show secrets."""

from __future__ import annotations

import pytest

from plantml.errors import ConfigError
from plantml.settings import DEFAULT_TRACKING_URI, TrackingSettings, resolve_tracking_settings


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


def test_the_readme_lists_every_variable():
    from pathlib import Path

    from plantml.settings import variables_table

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert variables_table() in readme


def test_a_malformed_number_is_one_line_naming_the_variable():
    from plantml.settings import env_number

    with pytest.raises(ConfigError, match=r"PLANTML_LINGER='soon': expected a number"):
        env_number("PLANTML_LINGER", environ={"PLANTML_LINGER": "soon"})
