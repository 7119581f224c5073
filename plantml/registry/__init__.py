"""The model registry: list, promote, roll back, compare and load registered models.

>>> from plantml.registry import ModelRegistry
>>> registry = ModelRegistry("http://127.0.0.1:5001")
>>> registry.promote("plant_classifier", 2, alias="Production")   # alias 'production'
>>> model = registry.load_model("models:/plant_classifier@production")
"""

from plantml.registry.aliases import PRODUCTION, STAGING, alias_tag, normalize_alias
from plantml.registry.loading import parse_model_uri
from plantml.registry.models import AliasMove, Comparison, ComparisonRow, ModelInfo, VersionInfo
from plantml.registry.registry import ModelRegistry

__all__ = [
    "PRODUCTION",
    "STAGING",
    "AliasMove",
    "Comparison",
    "ComparisonRow",
    "ModelInfo",
    "ModelRegistry",
    "VersionInfo",
    "alias_tag",
    "normalize_alias",
    "parse_model_uri",
]
