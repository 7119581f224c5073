"""The command line and the pytest plugin of the containers backend (no Docker daemon needed)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from plantml.cli.stack import stack as stack_command


def test_stack_up_offers_both_backends():
    result = CliRunner().invoke(stack_command, ["up", "--help"])
    assert result.exit_code == 0
    assert "[local|containers]" in result.output


def test_stack_up_offers_a_data_dir_and_a_fast_mode_that_says_what_it_costs():
    result = CliRunner().invoke(stack_command, ["up", "--help"])
    assert "--data-dir" in result.output
    assert "a crash loses acknowledged writes" in " ".join(result.output.split())


def test_build_images_and_prune_are_commands():
    for name in ("build-images", "prune"):
        result = CliRunner().invoke(stack_command, [name, "--help"])
        assert result.exit_code == 0, result.output


def test_build_images_calls_the_builder_with_the_options(monkeypatch):
    from plantml.stack import images

    calls = []
    monkeypatch.setattr(images, "build_images", lambda only, force, report: calls.append((only, force)) or {})
    result = CliRunner().invoke(stack_command, ["build-images", "--only", "postgres", "--force"])
    assert result.exit_code == 0, result.output
    assert calls == [(("postgres",), True)]


def test_from_registry_outside_a_source_checkout_says_so_in_one_line(tmp_path):
    from plantml.errors import StackError
    from plantml.stack import images

    with pytest.raises(StackError) as refused:
        images.pull_registry_images(tmp_path / "compose")
    assert str(refused.value) == (f"mlflow: --from-registry builds {tmp_path / 'compose' / 'mlflow.Dockerfile'}, which "
                                  "only a source checkout of plantml has: run it from one")


def test_the_containers_stack_without_docker_errors_every_test_and_skips_none(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///no/such/docker.sock")
    pytester.makepyfile(
        "def test_one(mlflow_stack):\n    assert mlflow_stack\n"
        "def test_two(tracking_uri):\n    assert tracking_uri\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--stack", "containers")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*docker: no Docker daemon answers*"])


def test_image_options_reach_the_containers_stack(pytester: pytest.Pytester):
    pytester.makepyfile(
        "from plantml.testing.plugin import _backend_options\n"
        "def test_options(pytestconfig):\n"
        "    assert _backend_options(pytestconfig) == {'images': {'postgres_image': 'pg:1', 'container_network': 'auto'}, 's3_flavour': 'minio'}\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--stack", "containers", "--postgres-image", "pg:1",
                                "--s3-flavour", "minio")
    result.assert_outcomes(passed=1)
