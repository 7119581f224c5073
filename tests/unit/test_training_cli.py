"""``plantml train`` and ``plantml data synth`` from the command line."""

from __future__ import annotations

import pytest

from plantml.cli import main
from plantml.training import synth


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=12, size=32, seed=0))


@pytest.fixture
def no_tracker(monkeypatch):
    """Fail the test if the command tries to create a tracker."""
    import plantml.cli.train as train_cli

    def refuse(options):
        raise AssertionError("a tracker was created")

    monkeypatch.setattr(train_cli, "_make_tracker", refuse)


TINY = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--weights", "none", "--num-workers", "0"]


@pytest.mark.parametrize("args, expected", [
    (["--backbone", "vgg16"], "'vgg16' is not one of"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "3", "--freeze-backbone", "--unfreeze-epoch", "4"], "--unfreeze-epoch 4"),
    (["--unfreeze-epoch", "2"], "needs --freeze-backbone"),
    (["--weights", "/nowhere/w.pth"], "--weights /nowhere/w.pth"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--run-name", "x" * 251], "run name 'xxxx"),  # PostgreSQL's answer named nothing, after the data was read
    (["--run-name", "a\x00b"], "NUL"),
    # a Latin-1 shell: was accepted, trained, then failed the run's delivery with a codec error (exit 1)
    (["--registered-model-name", "x\udcffy"], "--registered-model-name 'x%FFy': holds bytes that are not UTF-8"),
])
def test_usage_errors_exit_2_with_one_line_and_no_run(capsys, leaves, no_tracker, args, expected):
    code = main(["train", "--data-dir", str(leaves), *args])

    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "missing", "not found"),
    (lambda root: (root / "one" / "only").mkdir(parents=True) or root / "one", "at least two class"),
])
def test_data_errors_exit_2_before_any_run(capsys, tmp_path, no_tracker, make, expected):
    code = main(["train", "--data-dir", str(make(tmp_path)), *TINY])

    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_imagenet_weights_missing_is_one_line_suggesting_none(capsys, leaves, no_tracker, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    code = main(["train", "--data-dir", str(leaves), "--weights", "imagenet"])

    err = capsys.readouterr().err
    assert code == 2 and "--weights none" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("weights", ["auto", "imagenet"])
@pytest.mark.parametrize("damage", ["truncated", "another model's"])
def test_cached_imagenet_weights_that_cannot_be_loaded_are_one_line_naming_the_file(
    capsys, leaves, no_tracker, monkeypatch, tmp_path, weights, damage,
):
    """Was a traceback (``_pickle.UnpicklingError: invalid load key``) for a download cut short or a file of another
    torchvision in torch's cache, with ``--weights auto``: the README's first command."""
    import torch

    from plantml.training.models import WeightsChoice, build_model, imagenet_cache_file

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = imagenet_cache_file("resnet18")
    cached.parent.mkdir(parents=True)
    if damage == "truncated":
        torch.save(build_model("resnet18", 1000, WeightsChoice("none")).state_dict(), cached)
        cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    else:
        torch.save(build_model("mobilenet_v2", 1000, WeightsChoice("none")).state_dict(), cached)

    code = main(["train", "--data-dir", str(leaves), *TINY, "--weights", weights])

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"plantml: error: the ImageNet weights of resnet18 in torch's cache, {cached}: cannot be loaded (")
    assert err.rstrip().endswith("remove the file and fetch it again, or use --weights none")


def test_compile_without_a_cpp_compiler_is_one_line_before_any_run(capsys, leaves, no_tracker, monkeypatch):
    """Was torch's traceback (``InductorError: InvalidCxxCompiler``) at the first batch, the run FAILED: a slim
    container has no compiler. Torch's own setting points at a compiler that is not there."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/g++"))
    code = main(["train", "--data-dir", str(leaves), *TINY, "--compile"])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("plantml: error: --compile: No working C++ compiler found") and \
        err.rstrip().endswith("install one (g++), set CXX to it, or train without --compile") and len(err.splitlines()) == 1


def test_no_mlflow_trains_and_prints_plain_epoch_lines(capsys, leaves):
    code = main(["train", "--data-dir", str(leaves), "--no-mlflow", *TINY, "--epochs", "2"])

    out = capsys.readouterr().out
    assert code == 0
    assert "epoch 1/2" in out and "epoch 2/2" in out and "test_acc" in out
    assert "\r" not in out  # no progress bar when not on a terminal


def test_data_synth_writes_the_set(capsys, tmp_path):
    code = main(["data", "synth", str(tmp_path / "set"), "--per-class", "4", "--size", "24", "--seed", "3"])

    assert code == 0
    assert len(list((tmp_path / "set" / "healthy").glob("*.png"))) == 4
    assert "8 images" in capsys.readouterr().out


def test_data_synth_rejects_a_tiny_count(capsys, tmp_path):
    assert main(["data", "synth", str(tmp_path / "set"), "--per-class", "1"]) == 2


def test_a_tracking_uri_with_a_password_is_never_shown_with_it(capsys, monkeypatch, tmp_path, leaves):
    """``postgres://`` (SQLAlchemy's old name, in Heroku's URLs) is refused in one line naming it, its password masked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgres://alice:s3cret@127.0.0.1:1/mlflow")
    code = main(["train", "--data-dir", str(leaves), *TINY])
    out, err = capsys.readouterr()
    assert code == 2
    assert "s3cret" not in out + err
    assert "alice:***@127.0.0.1:1" in err, err


def test_a_reader_that_goes_away_ends_the_printing_not_the_training(leaves, tmp_path):
    """`plantml train | head -1`: the training goes on to its end, exit 0, and nothing is printed about the pipe."""
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-m", "plantml", "train", "--data-dir", str(leaves), "--no-mlflow", *TINY, "--epochs", "3",
               "--output-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    first = process.stdout.readline()
    process.stdout.close()  # the reader goes away after one line, as head -1 does
    _, stderr = process.communicate(timeout=300)
    assert first.startswith(b"epoch 1/3")
    assert process.returncode == 0, stderr.decode()
    assert (out / "best_model.pth").is_file() and (out / "training_history.json").is_file()
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr


def test_a_reader_of_both_streams_that_goes_away_ends_the_printing_not_the_training(leaves, tmp_path):
    """`plantml train 2>&1 | head -1` (or `|& tee` that died): the run's last line, on stderr, must not end it FAILED."""
    import subprocess
    import sys

    import mlflow

    process = subprocess.Popen([sys.executable, "-m", "plantml", "train", "--data-dir", str(leaves), *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    first = process.stdout.readline()
    process.stdout.close()  # the reader goes away after one line, as head -1 does
    assert process.wait(timeout=300) == 0
    assert first.startswith(b"data: leaves")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert run.info.status == "FINISHED", run.data.tags.get("plantml.error.message")


def test_stdout_on_a_full_disk_ends_the_printing_not_the_training_and_says_so_in_one_line(leaves, tmp_path):
    """`plantml train > train.log` on a full disk (/dev/full): the run ends FINISHED, exit 1, one line naming stdout."""
    import subprocess
    import sys

    import mlflow

    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "plantml", "train", "--data-dir", str(leaves), *TINY],
                              stdout=full, stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == ("plantml: error: standard output: No space left on device; "
                                            "what the command printed there is lost")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [run.info.status for run in runs] == ["FINISHED"]


def test_a_short_command_whose_stdout_is_full_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "plantml", "data", "synth", str(tmp_path / "set"), "--per-class", "3",
                               "--size", "16"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (1, "plantml: error: standard output: No space left on device; "
                                                 "what the command printed there is lost\n")
    assert len(list((tmp_path / "set").rglob("*.png"))) == 6  # the command did its work


@pytest.mark.parametrize("has_bf16", [False, True])
def test_amp_on_a_cpu_without_bf16_instructions_warns_that_it_is_emulated(capsys, leaves, monkeypatch, has_bf16):
    """Was silent: bf16 emulated made the training steps 26 times as long (benchmarks/cpu_amp.py). The CPU's flags
    are read from /proc/cpuinfo; the flag looked for is one every x86 CPU has, or none has."""
    import platform

    from plantml.training import checks

    if platform.machine() not in ("x86_64", "AMD64", "i686"):
        pytest.skip("/proc/cpuinfo lists 'flags' on x86 only")
    monkeypatch.setattr(checks, "_BF16_FLAGS", {"fpu" if has_bf16 else "no_such_flag"})
    code = main(["train", "--data-dir", str(leaves), "--no-mlflow", *TINY, "--amp"])

    err = capsys.readouterr().err
    assert code == 0
    assert ("plantml: warning: --amp on this CPU: it has no bf16 instructions" in err) is not has_bf16, err


def test_a_home_that_is_no_folder_names_the_variable_that_moves_each_folder_train_needs(tmp_path):
    """A service account's HOME (``/nonexistent``, ``/dev/null``): the synthetic set's cache is refused in one line,
    exit 2, naming the variable that puts it elsewhere; with that one set it trains, its run's journal in it too (was:
    refused again, for the journal, until PLANTML_JOURNAL_DIR was set as well), matplotlib's folder in it as well. A
    journal folder that cannot be made names its own variable."""
    import os
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PLANTML_", "MLFLOW_TRACKING", "MPLCONFIGDIR"))},
           "HOME": "/dev/null"}
    cache = {"PLANTML_CACHE_DIR": str(tmp_path / "cache")}
    done = {}
    for name, extra in (("no cache", {}), ("a journal under a file", {**cache, "PLANTML_JOURNAL_DIR": "/dev/null/journal"}),
                        ("a cache", cache)):
        done[name] = subprocess.run([sys.executable, "-m", "plantml", "train", *TINY], env={**env, **extra}, cwd=tmp_path,
                                    capture_output=True, text=True, timeout=300)
    for name in ("no cache", "a journal under a file"):
        assert done[name].returncode == 2 and "Traceback" not in done[name].stderr, done[name].stderr
    assert [done[name].stderr.splitlines()[-1] for name in ("no cache", "a journal under a file")] == [
        "plantml: error: cache folder (PLANTML_CACHE_DIR) /dev/null/.cache/plantml: not a directory",
        "plantml: error: journal folder (PLANTML_JOURNAL_DIR) /dev/null/journal: not a directory"]
    assert done["a cache"].returncode == 0, done["a cache"].stderr
    assert (tmp_path / "cache" / "journal").is_dir() and (tmp_path / "mlflow.db").exists()
    # matplotlib's font cache too, kept for the next run: was a new temporary folder each time, and two lines of warning
    assert "matplotlib" not in done["a cache"].stderr.lower(), done["a cache"].stderr
    assert any((tmp_path / "cache" / "matplotlib").glob("fontlist-*.json"))
