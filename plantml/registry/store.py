"""What the registry needs of MLflow's store beyond a client (:mod:`plantml.tracking.stores` opens it).

MLflow's filter parser takes no escapes in quoted names, and two promotions at once can
both insert the same row (an alias, a model tag): the store then refuses the second.
"""

from __future__ import annotations

import re

#: How a store says another write inserted the same row first (PostgreSQL through psycopg2, SQLite).
_INSERT_CLASH = ("uniqueviolation", "duplicate key value violates unique constraint", "unique constraint failed")


def name_filter(name: str) -> str:
    """An MLflow filter matching model ``name`` (and maybe others, to drop by exact name).

    MLflow's filter parser takes no escapes inside quotes (``'it\\'s'`` matches nothing):
    a name holding ``'`` is quoted with ``"``; one holding both becomes a ``LIKE``
    pattern with ``_`` for each quote and backslash (PostgreSQL's ``LIKE`` escape).
    """
    if "'" not in name:
        return f"name='{name}'"
    if '"' not in name:
        return f'name="{name}"'
    return "name LIKE '" + re.sub(r"['\"\\\\]", "_", name) + "'"


def is_insert_clash(exc: BaseException) -> bool:
    """True when the store refused a write because another one inserted the same row at the same moment."""
    return any(words in str(exc).lower() for words in _INSERT_CLASH)
