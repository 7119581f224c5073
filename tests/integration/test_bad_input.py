"""Bad input, table-driven: one line naming the culprit, the right exit code, no traceback, no run left RUNNING.

Command-line cases run through ``plantml.cli.main`` (the console script's own function)
against the real stack; library cases call the tracker, the settings and the stack.
Exit code 2 is a usage error (the caller's input), 1 a runtime failure (something out there).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from plantml.cli import main
from plantml.errors import ConfigError, PlantmlError, StackError, ValidationError


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Data folders, each wrong in one way."""
    root = tmp_path_factory.mktemp("bad-data")

    def image(path: Path, colour=(30, 120, 40)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), colour).save(path)

    made = {name: root / name for name in ("one_class", "empty_class", "not_an_image", "too_few")}
    for index in range(6):
        image(made["one_class"] / "healthy" / f"{index}.png")
        image(made["empty_class"] / "healthy" / f"{index}.png")
        image(made["not_an_image"] / "healthy" / f"{index}.png")
        image(made["not_an_image"] / "diseased" / f"{index}.png", (120, 60, 20))
    (made["empty_class"] / "diseased").mkdir()
    (made["not_an_image"] / "diseased" / "notes.png").write_text("this is text, not a PNG")
    image(made["too_few"] / "healthy" / "0.png")
    image(made["too_few"] / "diseased" / "0.png", (120, 60, 20))
    made["a_file"] = root / "plants.txt"
    made["a_file"].write_text("not a folder")
    return made


@dataclass(frozen=True)
class Case:
    """One bad command line: its arguments (``{data}``-style placeholders), exit code, and what the line must name."""

    id: str
    argv: tuple[str, ...]
    exit_code: int
    names: str
    tracked: bool = True  # add --tracking-uri/--experiment-name of the stack


CLI_CASES = [
    Case("negative_epochs", ("train", "--epochs", "-1"), 2, "--epochs"),
    Case("zero_epochs", ("train", "--epochs", "0"), 2, "--epochs"),
    Case("unknown_backbone", ("train", "--backbone", "vgg16"), 2, "vgg16"),
    Case("unfreeze_beyond_last_epoch", ("train", "--epochs", "3", "--freeze-backbone", "--unfreeze-epoch", "5"), 2, "--unfreeze-epoch 5"),
    Case("unfreeze_without_freeze", ("train", "--epochs", "3", "--unfreeze-epoch", "2"), 2, "--unfreeze-epoch"),
    Case("zero_batch_size", ("train", "--batch-size", "0"), 2, "--batch-size"),
    Case("zero_learning_rate", ("train", "--learning-rate", "0"), 2, "--learning-rate"),
    Case("learning_rate_not_a_number", ("train", "--learning-rate", "fast"), 2, "fast"),
    Case("misspelt_flag", ("train", "--epoch", "3"), 2, "--epoch"),
    Case("tiny_image_size", ("train", "--image-size", "8"), 2, "--image-size"),
    Case("split_over_one", ("train", "--val-split", "0.9", "--test-split", "0.5"), 2, "val=0.9"),
    Case("data_folder_missing", ("train", "--data-dir", "{missing}"), 2, "{missing}"),
    Case("data_folder_is_a_file", ("train", "--data-dir", "{a_file}"), 2, "{a_file}"),
    Case("data_folder_one_class", ("train", "--data-dir", "{one_class}"), 2, "two class"),
    Case("data_folder_empty_class", ("train", "--data-dir", "{empty_class}"), 2, "diseased"),
    Case("image_that_is_not_an_image", ("train", "--data-dir", "{not_an_image}"), 2, "notes.png"),
    Case("too_few_images_for_the_split", ("train", "--data-dir", "{too_few}"), 2, "too few"),
    Case("imagenet_weights_not_available", ("train", "--weights", "imagenet"), 2, "--weights none"),
    Case("weights_file_missing", ("train", "--weights", "{missing}.pth"), 2, "{missing}.pth"),
    Case("cuda_without_cuda", ("train", "--device", "cuda"), 2, "--device cuda"),
    Case("tracking_uri_typo", ("train", "--epochs", "1", "--tracking-uri", "htp://127.0.0.1:5001"), 2, "htp://127.0.0.1:5001", tracked=False),
    Case("tracking_server_unreachable", ("train", "--epochs", "1", "--image-size", "16", "--tracking-uri", "http://127.0.0.1:{dead}"), 1, "http://127.0.0.1:{dead}", tracked=False),
    Case("verify_unreachable_server", ("verify", "--tracking-uri", "http://127.0.0.1:{dead}"), 1, "http://127.0.0.1:{dead}", tracked=False),
    Case("registry_unknown_model", ("registry", "--tracking-uri", "{uri}", "promote", "no_such_model", "1"), 2, "no_such_model", tracked=False),
    Case("registry_reserved_alias", ("registry", "--tracking-uri", "{uri}", "promote", "some_model", "1", "--alias", "latest"), 2, "latest", tracked=False),
    Case("registry_bad_model_uri", ("registry", "--tracking-uri", "{uri}", "load-check", "model:/x"), 2, "model:/x", tracked=False),
    Case("stack_unknown_artifact_mode", ("stack", "up", "--artifacts", "mirror"), 2, "mirror", tracked=False),
    Case("synth_too_few_per_class", ("data", "synth", "{missing}", "--per-class", "1"), 2, "--per-class", tracked=False),
    Case("unknown_command", ("trian",), 2, "trian", tracked=False),
]


def _fill(text: str, values: dict[str, str]) -> str:
    return text.format(**values)


@pytest.fixture
def values(folders, mlflow_stack, tmp_path) -> dict[str, str]:
    return {**{k: str(v) for k, v in folders.items()}, "missing": str(tmp_path / "no-such-folder"),
            "dead": str(_dead_port()), "uri": mlflow_stack.tracking_uri}


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_a_bad_command_line_gets_one_line_naming_the_culprit(case, values, mlflow_env, experiment_name, mlflow_client, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env or mlflow.db of the caller's is read or written
    monkeypatch.setenv("PLANTML_CACHE_DIR", str(tmp_path / "cache"))
    argv = [_fill(arg, values) for arg in case.argv]
    if case.tracked:
        argv += ["--tracking-uri", mlflow_env.tracking_uri, "--experiment-name", experiment_name]

    code = main(argv)

    captured = capsys.readouterr()
    err = captured.out + captured.err  # verify reports on stdout (its ✗ line), the others on stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.exit_code, err
    assert len(lines) == 1, err
    assert _fill(case.names, values) in lines[0]
    assert "Traceback" not in err
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    if experiment is not None:  # a run may exist only if it ended
        runs = mlflow_client.search_runs([experiment.experiment_id])
        assert all(run.info.status != "RUNNING" for run in runs)


def test_debug_shows_the_traceback_instead(values, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, "-m", "plantml", "--debug", "train", "--data-dir", values["missing"]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "DataError" in result.stderr


def test_the_console_script_exits_with_the_usage_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "plantml", "train", "--epochs", "-1"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--epochs" in result.stderr


# -- the library: tracker, settings, stack ----------------------------------------------------


@pytest.fixture
def tracker(mlflow_env, experiment_name):
    from plantml.tracking import MLflowTracker

    tracker = MLflowTracker(experiment_name=experiment_name)
    tracker.start_run(run_name="bad_input")
    yield tracker
    tracker.end_run()


LIBRARY_CASES = [
    ("metric_name_with_forbidden_character", lambda t: t.log_metric("val acc!", 1.0), ValidationError, "val acc!"),
    ("metric_value_not_numeric", lambda t: t.log_metric("loss", "low"), ValidationError, "loss"),
    ("param_changed_within_a_run", lambda t: (t.log_param("lr", 0.1), t.log_param("lr", 0.2)), ValidationError, "lr"),
    ("dict_not_json", lambda t: t.log_dict({"ok": 1, "when": object()}, "h.json"), ValidationError, "when"),
    ("artifact_path_missing", lambda t: t.log_artifact("/no/such/model.pth"), ValidationError, "/no/such/model.pth"),
    ("artifact_folder_missing", lambda t: t.log_artifacts("/no/such/logs"), ValidationError, "/no/such/logs"),
    ("param_name_with_dotdot", lambda t: t.log_param("../etc", 1), ValidationError, "../etc"),
]


@pytest.mark.parametrize("call, error, names", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_bad_tracker_input_is_refused_naming_the_culprit(tracker, call, error, names):
    with pytest.raises(error) as refused:
        call(tracker)
    message = str(refused.value)
    assert names in message and "\n" not in message
    assert refused.value.exit_code == 2


def test_a_huge_param_is_truncated_with_a_warning_naming_it(tracker, mlflow_client):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_param("notes", "x" * 100_000)
    run_id = tracker.run_id
    tracker.end_run()  # delivery is complete once the run has ended
    assert any("notes" in str(w.message) for w in caught)
    assert 0 < len(mlflow_client.get_run(run_id).data.params["notes"]) < 100_000


def test_a_tracking_uri_typo_in_the_environment_is_a_config_error(monkeypatch, tmp_path):
    from plantml.tracking import MLflowTracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "localhost:5001")
    with pytest.raises(ConfigError, match="localhost:5001"):
        MLflowTracker()


def test_a_bucket_that_does_not_exist_is_named(mlflow_env, monkeypatch):
    from plantml.stack import ExternalStack

    monkeypatch.setenv("PLANTML_S3_BUCKET", "no-such-bucket")
    with pytest.raises(StackError, match="bucket 'no-such-bucket'.*does not exist"):
        ExternalStack().start()


def test_every_user_facing_error_is_a_plantml_error_with_an_exit_code():
    for error in (ConfigError, ValidationError, StackError):
        assert issubclass(error, PlantmlError) and error.exit_code in (1, 2)
