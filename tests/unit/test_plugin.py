"""The pytest plugin: markers, the gpu skip, and a stack that cannot start failing (never skipping)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


def test_the_markers_are_registered(pytester: pytest.Pytester):
    result = pytester.runpytest("--markers")
    for marker in ("integration:", "gpu:", "slow:"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}*"])


def test_a_gpu_test_is_skipped_with_its_reason_without_cuda(pytester: pytest.Pytester):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the gpu test would run")
    pytester.makepyfile("import pytest\n@pytest.mark.gpu\ndef test_on_cuda():\n    assert False\n")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no CUDA device available*"])


def test_run_on_gpu_sh_loads_the_plugin_once_also_where_plantml_is_installed():
    """Its pytest names the plugin by module (the GPU runner has plantml only on PYTHONPATH); where plantml is
    installed, as here, the entry point must not load it a second time: pytest would stop before any test."""
    root = Path(__file__).resolve().parents[2]
    args = re.search(r"python3 -m pytest (.+?) 2>&1", (root / "benchmarks" / "run_on_gpu.sh").read_text()).group(1)
    out = subprocess.run([sys.executable, "-m", "pytest", *shlex.split(args), "--collect-only"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]


def test_a_stack_that_cannot_start_errors_every_test_and_skips_none(pytester: pytest.Pytester, monkeypatch):
    import signal

    monkeypatch.setenv("PLANTML_PG_BINDIR", "/no/such/folder")
    pytester.makepyfile(
        "def test_one(mlflow_stack):\n    assert mlflow_stack\n"
        "def test_two(tracking_uri):\n    assert tracking_uri\n"
    )
    before = signal.getsignal(signal.SIGTERM)
    result = pytester.runpytest("-p", "no:cacheprovider")  # in this process, as pytest.main from an IDE
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*postgres: PLANTML_PG_BINDIR=/no/such/folder holds no initdb*"])
    # the session's SIGTERM teardown ends with it: was left raising KeyboardInterrupt in the calling process
    assert signal.getsignal(signal.SIGTERM) is before


def test_stack_option_rejects_an_unknown_backend(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--stack", "cloud")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_a_session_that_starts_no_stack_keeps_its_own_sigterm_handling(pytester: pytest.Pytester):
    pytester.makepyfile(
        "import signal\n"
        "def test_untouched():\n"
        "    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_plugins_stack_options_are_rows_of_the_settings_table(pytester: pytest.Pytester, monkeypatch):
    from plantml.settings import VARIABLES
    from plantml.testing.plugin import STACK_OPTIONS, option_name

    monkeypatch.setenv("PLANTML_S3_IMAGE", "env/s3:9")
    pytester.makepyfile("def test_default(pytestconfig):\n    assert pytestconfig.getoption('--s3-image') == 'env/s3:9'\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert {v.name for v in STACK_OPTIONS} >= {"PLANTML_POSTGRES_IMAGE", "PLANTML_S3_IMAGE", "PLANTML_MLFLOW_IMAGE",
                                               "PLANTML_S3_FLAVOUR", "PLANTML_CONTAINER_NETWORK"}
    assert all(variable is VARIABLES[variable.name] for variable in STACK_OPTIONS)
    assert option_name(VARIABLES["PLANTML_CONTAINER_NETWORK"]) == "--container-network"


def test_an_unknown_backend_in_plantml_stack_is_a_usage_error_naming_the_variable(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("PLANTML_STACK", "bogus")
    pytester.makepyfile("def test_x(mlflow_stack):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*PLANTML_STACK='bogus': expected one of local, containers, external*"])


@pytest.mark.parametrize("how", ["conftest", "-p"])
def test_a_project_that_names_the_plugin_module_loads_it_once(pytester: pytest.Pytester, how):
    # what a project does to be explicit (or with PYTEST_DISABLE_PLUGIN_AUTOLOAD); the installed entry point loads it too
    if how == "conftest":
        pytester.makeconftest('pytest_plugins = ["plantml.testing.plugin"]\n')
    pytester.makepyfile("def test_x(experiment_name):\n    assert experiment_name.startswith('test_test_x_')\n")
    result = pytester.runpytest("-p", "no:cacheprovider", *(["-p", "plantml.testing.plugin"] if how == "-p" else []))
    result.assert_outcomes(passed=1)


def test_an_s3_flavour_that_is_none_is_a_usage_error_before_any_test(pytester: pytest.Pytester):
    """Was: the session ran, and every stack test errored at its setup with the same ConfigError."""
    pytester.makepyfile("def test_x(mlflow_stack):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--s3-flavour", "foo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--s3-flavour 'foo': expected one of seaweedfs, minio*"])


def test_dash_p_no_turns_the_plugin_off(pytester: pytest.Pytester):
    """The README's way out for a project that installs plantml but wants none of its fixtures or options."""
    pytester.makepyfile("def test_x(mlflow_stack):\n    pass\n")
    off = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:plantml.testing.plugin")
    off.assert_outcomes(errors=1)
    off.stdout.fnmatch_lines(["*fixture 'mlflow_stack' not found*"])
    unknown = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:plantml.testing.plugin", "--stack", "local")
    assert unknown.ret == pytest.ExitCode.USAGE_ERROR
    unknown.stderr.fnmatch_lines(["*unrecognized arguments: --stack*"])


def test_a_downstream_projects_integration_tests_are_marked_and_its_runs_journal_apart(pytester: pytest.Pytester):
    """The README's promises for any project that installs plantml, not only plantml's own (its conftest did both)."""
    pytester.mkdir("tests")
    pytester.mkdir("tests/integration")
    pytester.path.joinpath("tests", "integration", "test_marked.py").write_text(
        "import os, tempfile\n"
        "def test_journal_apart():\n"
        "    folder = os.environ['PLANTML_JOURNAL_DIR']\n"
        "    assert os.path.basename(folder).startswith('.plantml-test-journal.staging-') and os.path.isdir(folder)\n")
    pytester.path.joinpath("tests", "test_unmarked.py").write_text("def test_plain():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-m", "integration", "tests")
    result.assert_outcomes(passed=1, deselected=1)


def test_behind_a_proxy_the_sessions_loopback_traffic_skips_it_and_the_callers_variables_come_back(
        pytester: pytest.Pytester, monkeypatch):
    """A CI runner's HTTP_PROXY would get every test's request to 127.0.0.1 (and a remote proxy cannot reach it):
    the session adds the loopback to NO_PROXY, for its tests and their subprocesses, and takes it away at its end."""
    import os

    for name in ("no_proxy", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("no_proxy", ".corp")
    pytester.makepyfile(
        "import os, subprocess, sys\n"
        "def test_loopback_is_direct():\n"
        "    import requests.utils\n"
        "    assert requests.utils.should_bypass_proxies('http://127.0.0.1:5000/api', None)\n"
        "    child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"NO_PROXY\"])'],\n"
        "                           capture_output=True, text=True, check=True)\n"
        "    assert child.stdout.strip() == '.corp,127.0.0.1,localhost,::1,[::1]'\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert (os.environ.get("no_proxy"), os.environ.get("NO_PROXY")) == (".corp", None)


def test_a_session_killed_with_minus_9_leaves_a_journal_folder_the_next_plantml_process_sweeps(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
):
    """Was: ``tempfile.mkdtemp`` made it, and a killed session's journals (and whatever its runs wrote there) stayed in
    the temporary folder for good, one folder per killed session."""
    import os
    import tempfile

    from plantml.staging import scratch_folder

    temp = tmp_path / "tmp"
    temp.mkdir()
    pytester.makepyfile(
        "import os, signal\n"
        "def test_killed():\n"
        "    with open(os.path.join(os.environ['PLANTML_JOURNAL_DIR'], 'run.journal'), 'w') as f:\n"
        "        f.write('a run the killed session was journalling')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setenv("TMPDIR", str(temp))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == -9
    (left,) = temp.iterdir()
    assert left.name.startswith(".plantml-test-journal.staging-") and (left / "run.journal").is_file()

    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with scratch_folder("plantml-model") as folder:  # any plantml process's temporary folder, here a model load's
        assert os.listdir(temp) == [folder.name]
    assert os.listdir(temp) == []
