"""Flag types the commands share."""

from __future__ import annotations

from typing import Any

import click


class NonBlank(click.ParamType):
    """A text flag that may be left out, not given empty: ``--experiment-name ""`` (an unset shell
    variable) is refused in one line rather than quietly meaning the default."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text.strip():
            self.fail(f"{text!r}: must not be empty (leave the flag out for the default)", param, ctx)
        return text


NON_BLANK = NonBlank()
