"""Alias names: the design's stage words map to aliases; MLflow's rules are enforced early."""

from __future__ import annotations

import pytest

from plantml.errors import RegistryError
from plantml.registry import normalize_alias, parse_model_uri


@pytest.mark.parametrize("word", ["Production", "production", "PRODUCTION", " Production "])
def test_production_in_any_case_means_the_production_alias(word: str) -> None:
    assert normalize_alias(word) == "production"


@pytest.mark.parametrize("word", ["Staging", "staging", "STAGING"])
def test_staging_in_any_case_means_the_staging_alias(word: str) -> None:
    assert normalize_alias(word) == "staging"


@pytest.mark.parametrize("alias", ["champion", "challenger-2", "canary_eu"])
def test_other_valid_aliases_are_kept_as_written(alias: str) -> None:
    assert normalize_alias(alias) == alias


@pytest.mark.parametrize("alias", ["latest", "Latest", "v1", "V12"])
def test_reserved_alias_names_are_rejected_naming_the_alias(alias: str) -> None:
    with pytest.raises(RegistryError, match=f"alias '{alias}'.*reserved") as info:
        normalize_alias(alias)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("alias", ["with space", "dot.ted", "slash/ed", "é!"])
def test_aliases_with_forbidden_characters_are_rejected(alias: str) -> None:
    with pytest.raises(RegistryError, match="only letters, digits"):
        normalize_alias(alias)


def test_an_empty_alias_is_rejected() -> None:
    with pytest.raises(RegistryError, match="empty"):
        normalize_alias("")


def test_an_overlong_alias_is_rejected() -> None:
    with pytest.raises(RegistryError, match="longer than 255"):
        normalize_alias("a" * 256)


def test_the_alias_rules_match_the_installed_mlflow() -> None:
    from mlflow.utils import validation

    assert validation._REGISTERED_MODEL_ALIAS_VERSION_REGEX.pattern == r"^[vV]\d+$"
    assert validation.MAX_REGISTERED_MODEL_ALIAS_LENGTH == 255


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/plants/1", ("plants", "1")),
        ("models:/plants/latest", ("plants", "latest")),
        ("models:/plants@production", ("plants", "@production")),
        ("models:/plants@Production", ("plants", "@Production")),
    ],
)
def test_model_uris_split_into_name_and_reference(uri: str, expected: tuple[str, str]) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize("uri", ["models:/", "runs:/abc/model", "models:/a/b/c", "plants"])
def test_malformed_model_uris_are_rejected(uri: str) -> None:
    with pytest.raises(RegistryError, match="model URI"):
        parse_model_uri(uri)


def test_a_long_alias_history_drops_its_oldest_promotions_to_fit_mlflows_tag_column() -> None:
    import json

    from plantml.registry.aliases import MAX_HISTORY_CHARS, encode_history

    versions = list(range(1, 5001))
    kept = json.loads(encode_history(versions))
    assert len(encode_history(versions)) <= MAX_HISTORY_CHARS
    assert kept == versions[-len(kept):] and len(kept) > 500


@pytest.mark.parametrize("text", ["not json", "{}", "[1, \"2\"]", "[0]", "[true]"])
def test_an_unreadable_alias_history_counts_as_none(text: str) -> None:
    from plantml.registry.aliases import history_tag, read_history

    assert read_history({history_tag("production"): text}, "production") is None
