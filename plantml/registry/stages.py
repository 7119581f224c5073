"""MLflow's stages kept in step with the ``production`` and ``staging`` aliases.

Moving one of those aliases also moves MLflow's stage of the same name (older holders of
that stage are archived), so ``models:/NAME/Production`` and ``models:/NAME@production``
always name the same version, even when two promotions run at the same time: after moving
both, a promotion reads back where the alias ended and settles the stage there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from plantml.errors import TrackingError
from plantml.registry.aliases import ALIAS_STAGES
from plantml.registry.models import alias_of

T = TypeVar("T")

ARCHIVED = "Archived"
#: MLflow's stages that are not the design's aliases, as ``models:/NAME/<stage>`` names them (any case).
OTHER_STAGES = {"archived": ARCHIVED, "none": "None"}

#: Rounds of settling a stage after a promotion before giving up: each round follows a
#: promotion that moved the alias meanwhile, so two at once settle in one or two.
SETTLE_ROUNDS = 5


class StageKeeper:
    """Moves the stages of one registry, through the calls its :class:`~plantml.registry.registry.ModelRegistry` makes.

    ``call`` runs one MLflow call and names ``what`` in its errors; ``registered_model`` and
    ``search_versions`` read a model and its versions through it.
    """

    def __init__(self, client: Any, call: Callable[[Callable[[], Any], str], Any],
                 registered_model: Callable[[str], Any], search_versions: Callable[[str], list[Any]]) -> None:
        self.client = client
        self.call = call
        self.registered_model = registered_model
        self.search_versions = search_versions

    def follow(self, name: str, alias: str, number: str) -> None:
        """After ``alias`` moved to version ``number``: its stage (if it has one) moves there too."""
        if (stage := ALIAS_STAGES.get(alias)) is None:
            return
        self.set_stage(name, number, stage, archive_others=True)
        self._settle(name, alias, stage)
        self._restore_other_stages(name, alias)

    def catch_up(self, name: str, alias: str, number: int) -> None:
        """Move ``alias``'s stage to version ``number``, which holds the alias, unless it has it (or that of
        its other alias): a promotion interrupted after the alias moved may have left the stage behind."""
        if (stage := ALIAS_STAGES.get(alias)) is None:
            return
        registered = self.registered_model(name)
        held = {ALIAS_STAGES[other] for other in ALIAS_STAGES if alias_of(registered, other) == number}
        if self._stage_of(name, str(number)) not in held:
            self.set_stage(name, str(number), stage, archive_others=True)
            self._settle(name, alias, stage)

    def set_stage(self, name: str, number: str, stage: str, *, archive_others: bool = False) -> None:
        with warnings.catch_warnings():  # stages are deprecated; plantml keeps them only for the design's URIs
            warnings.simplefilter("ignore", FutureWarning)
            self.call(lambda: self.client.transition_model_version_stage(name, number, stage, archive_existing_versions=archive_others),
                      f"model {name!r} version {number} stage {stage}")

    def _stage_of(self, name: str, number: str) -> str:
        return self.call(lambda: self.client.get_model_version(name, number), f"model {name!r} version {number}").current_stage

    def _restore_other_stages(self, name: str, moved: str) -> None:
        """MLflow gives a version one stage (that of the alias moved last when it holds both): the version
        ``moved`` left, archived, gets back the stage of the other alias it still holds."""
        registered = self.registered_model(name)
        for other, stage in ALIAS_STAGES.items():
            holder = alias_of(registered, other)
            if other == moved or holder is None or holder == alias_of(registered, moved):
                continue
            if self._stage_of(name, str(holder)) != stage:
                self.set_stage(name, str(holder), stage)

    def _settle(self, name: str, alias: str, stage: str) -> None:
        """Leave ``stage`` on the alias's version only.

        Two promotions at once each archive the holders they saw when their own stage move
        began, so neither may archive the other's version, and the alias ends on whichever
        was written last. Each promotion therefore reads back where the alias is and moves
        the stage there, until it reads a settled state after its own last write.
        """
        for _ in range(SETTLE_ROUNDS):
            holder = alias_of(self.registered_model(name), alias)
            if holder is None:  # the alias was deleted meanwhile: nothing to keep in step
                return
            staged = [int(mv.version) for mv in self.search_versions(name) if mv.current_stage == stage]
            if staged == [holder]:
                return
            for version in staged:
                if version != holder:
                    self.set_stage(name, str(version), ARCHIVED)
            if holder not in staged:
                self.set_stage(name, str(holder), stage)
        raise TrackingError(f"model {name!r} alias {alias!r}: other promotions kept moving it, stage {stage} may not follow it; "
                            "promote again")
