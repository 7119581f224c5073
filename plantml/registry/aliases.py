"""Alias names: the design's stage words mapped to aliases, MLflow's rules checked early.

MLflow deprecated registry stages in favour of aliases. The design's words ``Production``
and ``Staging`` become the aliases ``production`` and ``staging`` in any letter case, and
those two aliases keep MLflow's stage of the same name in step (see :data:`ALIAS_STAGES`),
so the design's stage URIs keep working. Every other name must follow MLflow's alias rules, checked here so that
the user gets one line naming the alias rather than a server traceback.
"""

from __future__ import annotations

import re

from plantml.errors import RegistryError

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
        raise RegistryError(f"alias {name!r}: only letters, digits, '_' and '-' are allowed")
    if len(name) > MAX_ALIAS_LENGTH:
        raise RegistryError(f"alias {name[:20]!r}...: longer than {MAX_ALIAS_LENGTH} characters")
    return name
