"""Alias names: the design's stage words mapped to aliases, MLflow's rules checked early.

MLflow deprecated registry stages in favour of aliases. The design's words ``Production``
and ``Staging`` become the aliases ``production`` and ``staging`` in any letter case, and
those two aliases keep MLflow's stage of the same name in step (see :data:`ALIAS_STAGES`),
so the design's stage URIs keep working. Every other name must follow MLflow's alias rules, checked here so that
the user gets one line naming the alias rather than a server traceback.

Each alias's history is kept on the registered model, as the tag
``plantml.alias.<alias>.history``: a JSON list of the versions the alias was moved to,
newest last. A promotion pushes, a rollback pops, so rollbacks walk back through the
promotions (1 -> 2 -> 1 rolls back to 2, then 1) instead of following a per-version
pointer that a second promotion of the same version overwrites.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone

from plantml.errors import RegistryError
from plantml.text import quoted

#: The prefix of the tags that record alias moves (on versions) and histories (on models).
TAG_PREFIX = "plantml.alias"
#: ``moved_from``'s value when the alias pointed nowhere before.
NO_VERSION = "none"

PRODUCTION = "production"
STAGING = "staging"

#: The design's stage words, in lower case, and the alias each one means.
STAGE_ALIASES = {"production": PRODUCTION, "staging": STAGING}

#: The MLflow registry stage kept in step with each of those aliases, so that the design's
#: ``models:/NAME/Production`` resolves to the same version as ``models:/NAME@production``.
ALIAS_STAGES = {PRODUCTION: "Production", STAGING: "Staging"}

# Same rules as mlflow.utils.validation (alphanumerics, "_" and "-"; at most 255
# characters; "latest" and "v<digits>" reserved), restated so that checking a name
# needs neither mlflow's import time nor a server round trip.
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_VERSION_ALIAS_RE = re.compile(r"^[vV]\d+$")
MAX_ALIAS_LENGTH = 255


def normalize_alias(alias: str) -> str:
    """Return the alias ``alias`` means, or raise :class:`RegistryError` naming it.

    ``Production``/``STAGING`` and friends map to ``production``/``staging``; other
    names are returned unchanged once they pass MLflow's alias rules.
    """
    name = (alias or "").strip()
    if name.lower() in STAGE_ALIASES:
        return STAGE_ALIASES[name.lower()]
    if not name:
        raise RegistryError("alias '': an alias name cannot be empty")
    if name.lower() == "latest":
        raise RegistryError(f"alias {name!r}: 'latest' is reserved by MLflow (it always means the newest version)")
    if _VERSION_ALIAS_RE.match(name):
        raise RegistryError(f"alias {name!r}: 'v<digits>' names are reserved by MLflow for versions")
    if not _ALIAS_RE.match(name):
        raise RegistryError(f"alias {quoted(name)}: only letters, digits, '_' and '-' are allowed")
    if len(name) > MAX_ALIAS_LENGTH:
        raise RegistryError(f"alias {name[:20]!r}...: longer than {MAX_ALIAS_LENGTH} characters")
    return name


#: MLflow stores a registered-model tag value in a 5000-character column (its API allows
#: more, PostgreSQL then refuses); the oldest promotions are dropped to stay inside it.
MAX_HISTORY_CHARS = 5000


def history_tag(alias: str) -> str:
    """The registered-model tag key holding ``alias``'s history."""
    return f"{TAG_PREFIX}.{alias}.history"


def read_history(tags: Mapping[str, str], alias: str) -> list[int] | None:
    """The versions ``alias`` was moved to, oldest first; None when no history is recorded (or it is unreadable)."""
    text = tags.get(history_tag(alias))
    if text is None:
        return None
    try:
        versions = json.loads(text)
    except ValueError:
        return None
    if not isinstance(versions, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in versions):
        return None
    return versions


def encode_history(versions: list[int]) -> str:
    """``versions`` as the tag's JSON, the oldest entries dropped until it fits :data:`MAX_HISTORY_CHARS`."""
    kept = list(versions)
    text = json.dumps(kept, separators=(",", ":"))
    while len(text) > MAX_HISTORY_CHARS:
        del kept[: max(1, len(kept) // 10)]
        text = json.dumps(kept, separators=(",", ":"))
    return text


def pushed(history: list[int], version: int) -> list[int]:
    """``history`` with ``version`` as its newest entry (not repeated if it is the newest already)."""
    return history if history and history[-1] == version else [*history, version]


def rollback_target(history: list[int], current: int) -> tuple[list[int], int | None]:
    """Pop ``current`` off ``history``: the history left and the version to go back to (None: nothing earlier).

    When the alias was moved outside plantml (``current`` is not the newest entry),
    the newest recorded version is the one to go back to.
    """
    left = history[:-1] if history and history[-1] == current else list(history)
    return left, (left[-1] if left else None)


def alias_tag(alias: str, what: str) -> str:
    """The model-version tag key recording ``what`` (``moved_from``...) for ``alias``."""
    return f"{TAG_PREFIX}.{alias}.{what}"


def moved_now() -> str:
    """When an alias moves: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
