"""ModelRegistry on a local sqlite store: listing, promotion, rollback, comparison, errors.

Versions are registered straight through a plain ``MlflowClient`` (no model files), which
is all that aliases, tags and comparisons need; loading real models is tested against
the stack in tests/integration/test_registry_roundtrip.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from plantml.errors import RegistryError
from plantml.registry import ModelRegistry, alias_tag, parse_model_uri
from plantml.registry.aliases import history_tag


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder: Path = tmp_path_factory.mktemp("registry")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture(scope="module")
def client(store_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)


@pytest.fixture
def registry(store_uri: str, client: Any) -> ModelRegistry:
    client.search_experiments()  # the store exists (ModelRegistry refuses one that does not), whichever test runs first
    return ModelRegistry(store_uri)


def register_versions(client: Any, count: int, *, accuracies: tuple[float, ...] = (0.8, 0.9, 0.95)) -> str:
    """A fresh registered model with ``count`` versions, each from its own run."""
    name = f"plants_{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    client.create_registered_model(name)
    for index in range(count):
        run = client.create_run(experiment_id, run_name=f"train-{index + 1}")
        client.log_param(run.info.run_id, "lr", str(0.01 / (index + 1)))
        client.log_param(run.info.run_id, "backbone", "mobilenet_v2")
        client.log_metric(run.info.run_id, "val_accuracy", accuracies[index])
        client.set_terminated(run.info.run_id)
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return name


def test_list_models_shows_each_model_with_its_latest_version_and_aliases(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 1, "staging")
    model = next(m for m in registry.list_models() if m.name == name)
    assert model.latest_version == 2
    assert model.aliases == {"staging": 1}


def test_list_versions_shows_run_metrics_and_aliases(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 2, "Production")
    versions = registry.list_versions(name)
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].aliases == ("production",)
    assert versions[1].metrics == {"val_accuracy": 0.9}
    assert versions[0].run_id == client.get_model_version(name, "1").run_id


def test_promote_points_the_alias_and_records_where_it_came_from(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    first = registry.promote(name, 1)
    second = registry.promote(name, 2, "PRODUCTION")
    assert (first.from_version, first.to_version) == (None, 1)
    assert (second.from_version, second.to_version, second.kind) == (1, 2, "promote")
    assert int(client.get_model_version_by_alias(name, "production").version) == 2
    tags = client.get_model_version(name, "2").tags
    assert tags[alias_tag("production", "moved_from")] == "1"
    assert tags[alias_tag("production", "moved_at")] == second.moved_at
    assert client.get_model_version(name, "1").tags[alias_tag("production", "moved_from")] == "none"


def test_promoting_the_current_version_again_changes_nothing(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 1)
    registry.promote(name, 2)
    again = registry.promote(name, 2)
    assert again.kind == "unchanged"
    assert client.get_model_version(name, "2").tags[alias_tag("production", "moved_from")] == "1"


def test_rollback_returns_the_alias_to_the_version_before(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 1)
    registry.promote(name, 2)
    move = registry.rollback(name)
    assert (move.from_version, move.to_version, move.kind) == (2, 1, "rollback")
    assert int(client.get_model_version_by_alias(name, "production").version) == 1
    tags = client.get_model_version(name, "1").tags
    assert tags[alias_tag("production", "rolled_back_from")] == "2"


def test_successive_rollbacks_walk_back_through_the_promotions(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 3)
    for version in (1, 2, 3):
        registry.promote(name, version, "staging")
    assert registry.rollback(name, "Staging").to_version == 2
    assert registry.rollback(name, "staging").to_version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback(name, "staging")


def test_rollback_passes_over_versions_deleted_since_their_promotion_and_names_them(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 4, accuracies=(0.8, 0.85, 0.9, 0.95))
    for version in (1, 2, 3, 4):
        registry.promote(name, version)
    client.delete_model_version(name, "3")
    client.delete_model_version(name, "2")
    move = registry.rollback(name)
    assert (move.to_version, move.from_version, move.skipped) == (1, 4, (3, 2))
    assert int(client.get_model_version_by_alias(name, "production").version) == 1
    assert client.get_model_version(name, "1").current_stage == "Production"
    with pytest.raises(RegistryError, match="no earlier version recorded before version 1 to roll back to$"):
        registry.rollback(name)  # the deleted entries left the history with the rollback


def test_rollback_past_only_deleted_versions_says_they_were_deleted(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 1)
    registry.promote(name, 2)
    client.delete_model_version(name, "1")
    with pytest.raises(RegistryError, match=r"no earlier version .* \(deleted since: version 1\)"):
        registry.rollback(name)
    assert int(client.get_model_version_by_alias(name, "production").version) == 2


def test_a_version_keeping_the_staging_alias_keeps_the_staging_stage_when_production_leaves_it(
        registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 1, "staging")
    registry.promote(name, 1)  # both aliases on version 1: its one stage is Production, the alias moved last
    registry.promote(name, 2)  # production leaves version 1, which still holds staging
    assert client.get_model_version(name, "1").current_stage == "Staging"
    assert client.get_model_version(name, "2").current_stage == "Production"
    assert int(client.get_model_version_by_alias(name, "staging").version) == 1


def test_rollback_without_history_is_a_one_line_error(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 1)
    registry.promote(name, 1)
    with pytest.raises(RegistryError, match=f"model '{name}' alias 'production': no earlier version") as info:
        registry.rollback(name)
    assert "\n" not in str(info.value)


def test_rollback_of_an_unset_alias_names_it(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 1)
    with pytest.raises(RegistryError, match="alias 'champion': not set"):
        registry.rollback(name, "champion")


def test_resolve_accepts_numbers_latest_and_aliases(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 1, "champion")
    assert registry.resolve(name, 1).version == 1
    assert registry.resolve(name, "latest").version == 2
    assert registry.resolve(name, "champion").version == 1
    assert registry.resolve(name, "@champion").version == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r, n: r.get_model("no_such_model"), "registered model 'no_such_model': not found"),
        (lambda r, n: r.get_version(n, 9), "version 9: not found"),
        (lambda r, n: r.resolve(n, "ghost"), "alias 'ghost': not set"),
        (lambda r, n: r.promote(n, 9), "version 9: not found"),
        (lambda r, n: r.promote(n, 1, "latest"), "alias 'latest'"),
        (lambda r, n: r.promote(n, 1, "v2"), "alias 'v2'"),
        (lambda r, n: r.get_version(n, "one"), "version 'one'"),
    ],
    ids=["unknown-model", "unknown-version", "unknown-alias", "promote-unknown-version", "reserved-latest", "reserved-v2", "bad-version"],
)
def test_unknown_or_reserved_names_give_a_one_line_error_naming_them(registry: ModelRegistry, client: Any, call: Any, message: str) -> None:
    name = register_versions(client, 1)
    with pytest.raises(RegistryError, match=message) as info:
        call(registry, name)
    assert "\n" not in str(info.value)


def test_compare_puts_params_and_metrics_side_by_side(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    comparison = registry.compare(name, 1, 2)
    params = {row.key: (row.first, row.second, row.differs) for row in comparison.params}
    metrics = {row.key: (row.first, row.second) for row in comparison.metrics}
    assert params["lr"] == ("0.01", "0.005", True)
    assert params["backbone"] == ("mobilenet_v2", "mobilenet_v2", False)
    assert metrics["val_accuracy"] == (0.8, 0.9)


def test_the_design_stage_words_resolve_to_the_aliases(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    registry.promote(name, 2, "staging")
    assert registry.resolve(name, "Staging").version == 2
    assert registry.resolve(name, "STAGING").version == 2


def test_mlflows_other_stages_resolve_as_mlflow_resolves_them(registry: ModelRegistry, client: Any) -> None:
    """``models:/NAME/Archived`` (a version promotion archived) and ``/None``: MLflow's newest version in that
    stage, as ``mlflow.pytorch.load_model`` reads the URI; they were taken for aliases and refused."""
    name = register_versions(client, 3)
    registry.promote(name, 1)
    registry.promote(name, 2)  # archives version 1

    assert registry.resolve(name, "Archived").version == 1
    assert registry.resolve(name, "archived").version == 1
    assert registry.resolve(name, "None").version == 3
    assert parse_model_uri(f"models:/{name}/Archived") == (name, "Archived")
    registry.promote(name, 3, "Staging")
    with pytest.raises(RegistryError, match=f"^model '{name}': no version in stage 'None'$"):
        registry.resolve(name, "None")


def test_the_registry_leaves_mlflows_global_tracking_uri_alone(registry: ModelRegistry, client: Any) -> None:
    import mlflow

    before = mlflow.get_tracking_uri()
    name = register_versions(client, 2)
    registry.promote(name, 2)
    registry.list_versions(name)
    registry.compare(name, 1, 2)
    assert mlflow.get_tracking_uri() == before


def test_production_and_staging_keep_mlflows_stage_in_step_and_custom_aliases_do_not(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 3)
    registry.promote(name, 1, "Production")
    registry.promote(name, 2, "staging")
    registry.promote(name, 3, "champion")
    assert {v.version: v.stage for v in registry.list_versions(name)} == {1: "Production", 2: "Staging", 3: "None"}
    registry.promote(name, 2, "production")
    assert {v.version: v.stage for v in registry.list_versions(name)} == {1: "Archived", 2: "Production", 3: "None"}
    registry.rollback(name)  # version 2 still holds staging: it gets the Staging stage back, not Archived
    assert {v.version: v.stage for v in registry.list_versions(name)} == {1: "Production", 2: "Staging", 3: "None"}


def test_stage_moves_show_no_deprecation_warning(registry: ModelRegistry, client: Any) -> None:
    import warnings

    name = register_versions(client, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        registry.promote(name, 1, "Production")


def test_registry_calls_use_the_s3_keys_in_force_not_the_first_ones_read(registry: ModelRegistry,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 caches the first keys it read from the environment for the whole process, and MLflow
    caches its S3 clients by endpoint: a registry call after the keys changed (a second stack in
    the same process) must not be sent the old ones."""
    from mlflow.store.artifact.s3_artifact_repo import _get_s3_client

    def keys_of_a_new_client() -> str:
        return _get_s3_client(s3_endpoint_url="http://127.0.0.1:9")._request_signer._credentials.access_key

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-stack")
    registry.list_models()
    assert keys_of_a_new_client() == "first-stack"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second-stack")
    registry.list_models()
    assert keys_of_a_new_client() == "second-stack"


@pytest.mark.parametrize(
    ("promotions", "rollbacks"),
    [((1, 2, 1), (2, 1)), ((1, 2, 3, 2), (3, 2, 1))],
    ids=["unset-1-2-1", "1-2-3-2"],
)
def test_rollbacks_walk_back_through_a_history_where_a_version_was_promoted_twice(
    registry: ModelRegistry, client: Any, promotions: tuple[int, ...], rollbacks: tuple[int, ...]
) -> None:
    name = register_versions(client, 3)
    for version in promotions:
        registry.promote(name, version, "staging")
    assert [registry.rollback(name, "staging").to_version for _ in rollbacks] == list(rollbacks)
    with pytest.raises(RegistryError, match="no earlier version") as info:
        registry.rollback(name, "staging")
    assert "\n" not in str(info.value)
    assert int(client.get_model_version_by_alias(name, "staging").version) == rollbacks[-1]
    assert {v.version for v in registry.list_versions(name) if v.stage == "Staging"} == {rollbacks[-1]}


def test_the_alias_history_is_a_json_list_on_the_registered_model(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    for version in (1, 2, 1):
        registry.promote(name, version, "champion")
    assert client.get_registered_model(name).tags[history_tag("champion")] == "[1,2,1]"
    registry.rollback(name, "champion")
    assert client.get_registered_model(name).tags[history_tag("champion")] == "[1,2]"


def test_an_alias_promoted_before_the_history_existed_rolls_back_by_its_version_tags(registry: ModelRegistry, client: Any) -> None:
    """What older plantml left: the alias and per-version moved_from tags, no history on the model."""
    name = register_versions(client, 2)
    client.set_model_version_tag(name, "2", alias_tag("champion", "moved_from"), "1")
    client.set_registered_model_alias(name, "champion", "2")
    assert registry.rollback(name, "champion").to_version == 1
    registry.promote(name, 2, "champion")  # starts the history where the alias was
    assert [registry.rollback(name, "champion").to_version] == [1]
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback(name, "champion")


@pytest.mark.parametrize("odd_name", ["o'brien", 'say "hi"', "both'\"q"])
def test_versions_of_a_model_whose_name_holds_quotes_are_listed(registry: ModelRegistry, client: Any, odd_name: str) -> None:
    """MLflow's filter parser takes no backslash escapes; a LIKE fallback must not pick up look-alike names."""
    name = f"{odd_name}_{uuid.uuid4().hex[:6]}"
    look_alike = name.replace("'", "x").replace('"', "y")
    for model in (name, look_alike):
        client.create_registered_model(model)
        client.create_model_version(model, source="/nowhere/model", run_id=None)
    assert [(v.name, v.version) for v in registry.list_versions(name)] == [(name, 1)]
    registry.promote(name, 1, "Production")
    assert [v.stage for v in registry.list_versions(name)] == ["Production"]


def test_versions_written_v1_mean_the_same_in_compare_resolve_and_promote(registry: ModelRegistry, client: Any) -> None:
    name = register_versions(client, 2)
    comparison = registry.compare(name, "v1", "V2")
    assert (comparison.first.version, comparison.second.version) == (1, 2)
    assert registry.resolve(name, "v2").version == 2
    assert registry.promote(name, "v1", "champion").to_version == 1


def test_promoting_again_after_an_interrupted_promotion_moves_the_stage_to_the_alias(
    store_uri: str, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = register_versions(client, 2)
    ModelRegistry(store_uri).promote(name, 1)
    interrupted = ModelRegistry(store_uri)

    def server_gone(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # Ctrl-C, or the server dying, after the alias moved and before its stage did

    monkeypatch.setattr(interrupted.client, "transition_model_version_stage", server_gone)
    with pytest.raises(KeyboardInterrupt):
        interrupted.promote(name, 2)
    again = ModelRegistry(store_uri).promote(name, 2)
    assert again.kind == "unchanged"
    assert sorted((int(mv.version), mv.current_stage) for mv in client.search_model_versions(f"name='{name}'")) \
        == [(1, "Archived"), (2, "Production")]


def test_a_version_tag_another_promotion_inserted_at_the_same_moment_is_overwritten_not_an_error(
    registry: ModelRegistry, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two promotions of one version at once both insert its ``moved_from`` tag: PostgreSQL refuses the second."""
    from mlflow.exceptions import MlflowException

    name = register_versions(client, 2)
    real = registry.client.set_model_version_tag
    clashes = []

    def clash_once(*args: Any, **kwargs: Any) -> None:
        if not clashes:
            clashes.append(args)
            real(*args, **kwargs)  # the other promotion's insert lands first
            raise MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "model_version_tag_pk"')
        real(*args, **kwargs)

    monkeypatch.setattr(registry.client, "set_model_version_tag", clash_once)
    move = registry.promote(name, 2)
    assert clashes and move.to_version == 2 and int(client.get_model_version_by_alias(name, "production").version) == 2


def test_a_model_pickled_on_a_gpu_loads_through_the_registry_on_a_machine_without_one(
    registry: ModelRegistry, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import torch.serialization

    from plantml.tracking.models import save_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the file loads there anyway")
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 2)
    # what torch writes on a CUDA machine: every tensor's storage tagged cuda:0 (this one has no GPU to put them on)
    monkeypatch.setattr(torch.serialization, "_package_registry", list(torch.serialization._package_registry))
    torch.serialization.register_package(1, lambda storage: "cuda:0", lambda obj, location: None)
    save_model(tmp_path / "model", model, "run", "pickle")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="on a CUDA device"):  # what plain torch.load (and MLflow) say of it here
        torch.load(tmp_path / "model" / "data" / "model.pth", weights_only=False)

    name = f"plants_{uuid.uuid4().hex[:8]}"
    run = client.create_run(client.create_experiment(name, artifact_location=str(tmp_path / "store")))
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    client.create_registered_model(name)
    client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    loaded = registry.load_model(name, 1)
    assert loaded.weight.device.type == "cpu"
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.gpu
def test_a_model_logged_from_a_gpu_is_saved_with_its_weights_on_the_cpu(tmp_path: Path) -> None:
    import torch

    from plantml.tracking.models import save_model

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).cuda()
    save_model(tmp_path / "model", model, "run", "pickle")
    locations: list[str] = []
    torch.load(tmp_path / "model" / "data" / "model.pth", weights_only=False,
               map_location=lambda storage, location: locations.append(location) or storage)
    assert set(locations) == {"cpu"}  # loads where there is no CUDA, and in `mlflow models serve` there
    assert {t.device.type for t in model.state_dict().values()} == {"cuda"}  # the caller's model stays on its GPU
