"""Validation: bad input is refused with a one-line error naming the culprit, before any request."""

from __future__ import annotations

import math
import warnings

import pytest

from plantml.errors import ValidationError
from plantml.tracking import validation as check
from plantml.tracking.validation import NonFiniteMetricWarning, TruncatedValueWarning


@pytest.mark.parametrize("name", ["val_accuracy", "train/loss", "a.b-c d", "time:ms", "épreuve_1"])
def test_valid_names_are_accepted(name: str) -> None:
    assert check.check_name("metric", name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("bad!name", "may only contain"),
        ("a,b", "may only contain"),
        ("../escape", "normalised relative path"),
        ("/absolute", "normalised relative path"),
        ("a//b", "normalised relative path"),
        ("", "normalised relative path"),
        ("x" * 251, "longer than 250"),
    ],
)
def test_invalid_name_error_names_it_and_the_rule(name: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment) as caught:
        check.check_name("param", name)
    assert str(caught.value).startswith("param name")
    assert name[:20] in str(caught.value)


def test_non_string_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        check.check_name("tag", 3)


@pytest.mark.parametrize("value", ["0.5", None, True, [1.0], {"a": 1}])
def test_non_numeric_metric_error_names_the_key(value: object) -> None:
    with pytest.raises(ValidationError, match="metric 'val_loss'"):
        check.metric_value("val_loss", value)


def test_numpy_and_torch_scalars_become_floats() -> None:
    import numpy as np
    import torch

    assert check.metric_value("a", np.float32(0.5)) == 0.5
    assert check.metric_value("a", torch.tensor(0.25)) == 0.25
    assert check.metric_value("a", 3) == 3.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_warns_and_passes_through(value: float) -> None:
    with pytest.warns(NonFiniteMetricWarning, match="metric 'loss'"):
        result = check.metric_value("loss", value)
    assert result == value or (math.isnan(result) and math.isnan(value))


def test_step_must_be_an_integer() -> None:
    assert check.metric_step("k", None) == 0
    assert check.metric_step("k", 7) == 7
    with pytest.raises(ValidationError, match="step 1.5"):
        check.metric_step("k", 1.5)


def test_long_param_value_is_truncated_with_a_warning_naming_the_key() -> None:
    with pytest.warns(TruncatedValueWarning, match="param 'notes'"):
        value = check.param_value("notes", "x" * 7000)
    assert len(value) == check.MAX_PARAM_VAL_LENGTH


def test_param_value_at_the_limit_is_kept_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check.param_value("k", "y" * check.MAX_PARAM_VAL_LENGTH) == "y" * 6000


def test_unserialisable_dict_error_names_the_offending_key() -> None:
    with pytest.raises(ValidationError, match=r"history\.json: value at epochs\[1\]\.model"):
        check.check_json_serialisable({"ok": 1, "epochs": [{"x": 1}, {"model": object()}]}, "history.json")


def test_missing_artifact_file_is_refused(tmp_path) -> None:
    with pytest.raises(ValidationError, match="no such file"):
        check.existing_file(tmp_path / "absent.pth")
    with pytest.raises(ValidationError, match="no such folder"):
        check.existing_dir(tmp_path / "absent")
    with pytest.raises(ValidationError, match="use log_artifacts"):
        check.existing_file(tmp_path)


@pytest.mark.parametrize("path", ["../up", "/root", "a/../../b"])
def test_artifact_path_must_stay_inside_the_run(path: str) -> None:
    with pytest.raises(ValidationError, match="must be relative"):
        check.check_artifact_subpath(path)


def test_run_status_must_be_a_terminal_one() -> None:
    assert check.check_status("FAILED") == "FAILED"
    with pytest.raises(ValidationError, match="RUNNING"):
        check.check_status("RUNNING")


def test_limits_equal_the_installed_mlflow_ones() -> None:
    from mlflow.utils import validation as mlflow_validation

    for name in (
        "MAX_ENTITY_KEY_LENGTH",
        "MAX_PARAM_VAL_LENGTH",
        "MAX_TAG_VAL_LENGTH",
        "MAX_EXPERIMENT_NAME_LENGTH",
        "MAX_PARAMS_TAGS_PER_BATCH",
        "MAX_METRICS_PER_BATCH",
        "MAX_ENTITIES_PER_BATCH",
        "MAX_BATCH_LOG_REQUEST_SIZE",
    ):
        assert getattr(check, name) == getattr(mlflow_validation, name), name


@pytest.mark.parametrize("name", ["ok_name", "bad!name", "../x", "a//b", "./a", "a/", " ", "x" * 251])
def test_name_rule_agrees_with_mlflow(name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_length_limit, _validate_param_name

    try:
        _validate_param_name(name)
        _validate_length_limit("Param key", 250, name)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    try:
        check.check_name("param", name)
        we_accept = True
    except ValidationError:
        we_accept = False
    assert we_accept == mlflow_accepts


@pytest.mark.parametrize("kind, check_value", [("param", check.param_value), ("tag", check.tag_value)])
def test_a_nul_character_is_refused_naming_the_key(kind, check_value) -> None:
    with pytest.raises(ValidationError, match=f"{kind} 'path': value contains a NUL"):
        check_value("path", "plants\x00")


def test_lone_surrogates_from_undecodable_file_names_are_written_as_their_bytes() -> None:
    latin1_folder = b"/data/pl\xe9nts".decode("utf-8", "surrogateescape")  # what Python makes of that name
    assert check.tag_value("dataset_path", latin1_folder) == "/data/pl%E9nts"
    assert check.param_value("odd", "a\ud800b") == "a\ufffdb"
    assert check.param_value("fine", "plénts ✓ 100%") == "plénts ✓ 100%"
    assert check.check_artifact_subpath(b"r\xe9sultats".decode("utf-8", "surrogateescape")) == "r%E9sultats"


@pytest.mark.parametrize("step", [2**63, -(2**63) - 1, 10**30])
def test_a_step_outside_int64_is_refused(step) -> None:
    with pytest.raises(ValidationError, match="outside MLflow's 64-bit range"):
        check.metric_step("loss", step)
    assert check.metric_step("loss", 2**63 - 1) == 2**63 - 1


def test_a_number_too_large_for_a_float_is_refused() -> None:
    with pytest.raises(ValidationError, match="metric 'loss': value 1000.* too large for a float"):
        check.metric_value("loss", 10**400)


@pytest.mark.parametrize("path, key", [(".", None), ("./x", "x"), ("a/./b", "a/b"), ("a//b/", "a/b"), ("a\\b", "a/b")])
def test_artifact_paths_are_normalised_as_object_keys(path: str, key: str | None) -> None:
    # an S3 store answers 400 to a key with a '.' part: it must never reach the journal as it is
    assert check.check_artifact_subpath(path) == key


@pytest.mark.parametrize("name", [".", "./", "a/", ""])
def test_an_artifact_name_that_is_no_file_name_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="must be a non-empty file name"):
        check.check_artifact_name(name, "text")


def test_an_experiment_name_with_bytes_that_are_not_utf8_is_refused_naming_them():
    with pytest.raises(ValidationError, match=r"^experiment name 'pl%E9nts': holds bytes that are not UTF-8"):
        check.check_experiment_name("pl\udce9nts")


@pytest.mark.parametrize(("call", "line"), [
    (lambda t: t.log_params({"pl\udce9nts": 1}), "param name 'pl%E9nts': holds bytes that are not UTF-8"),
    (lambda t: t.log_metric("pl\udce9nts", 1.0), "metric name 'pl%E9nts': holds bytes that are not UTF-8"),
    (lambda t: t.set_tags({"pl\udce9nts": "v"}), "tag name 'pl%E9nts': holds bytes that are not UTF-8"),
    (lambda t: t.log_metric("loss", "pl\udce9nts"), "metric 'loss': value 'pl%E9nts' is not a number"),
    (lambda t: t.log_artifact("pl\udce9nts.txt"), "artifact 'pl%E9nts.txt': no such file"),
], ids=["param", "metric", "tag", "metric value", "artifact"])
def test_a_name_typed_in_a_latin1_shell_is_shown_as_plantml_shows_file_names(call, line, tmp_path, monkeypatch):
    """Was ``'pl\\udce9nts'`` (Python's repr of the lone surrogate), and for a key the rule of the allowed
    characters, which the user's name seems to keep."""
    from plantml import MLflowTracker

    monkeypatch.chdir(tmp_path)
    tracker = MLflowTracker(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with tracker.start_run(), pytest.raises(ValidationError) as raised:
        call(tracker)
    assert str(raised.value).startswith(line)
