"""Check what the tracker is asked to send, before anything leaves the process.

The rules mirror MLflow's own (``mlflow.utils.validation``), so a value that passes here
is one the server accepts, and a value that fails gets a one-line
:class:`~plantml.errors.ValidationError` naming the culprit and the rule, instead of an
HTTP 400 after part of a batch was already written. The limits are copied rather than
imported so that ``import plantml.tracking`` stays fast; a unit test checks they still
equal the installed MLflow's.

Beyond MLflow's own checks, what its stores cannot hold is refused here too: a NUL
character (PostgreSQL's text cannot), a step outside int64, a number too large for a
float. A *lone surrogate*, which is what Python makes of a byte that is not UTF-8 in a
file name (a folder named in Latin-1), cannot be sent either; :func:`plantml.text.safe_text`
writes each such byte as ``%XX`` instead, so such a path is logged readably rather than refused.
"""

from __future__ import annotations

import decimal
import json
import logging
import math
import numbers
import os
import posixpath
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plantml.errors import ValidationError
from plantml.text import NOT_UTF8, is_utf8, quoted, safe_data, safe_text

logger = logging.getLogger(__name__)

_PACKAGE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # plantml/, not plantml_x/


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a :func:`warnings.warn` issued by the function calling this one point at the
    first line outside plantml: the user's ``tracker.log_metric(...)``, however many of plantml's frames (and
    comprehensions, frames of their own) lie between."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_FOLDER):
        frame, level = frame.f_back, level + 1
    return level

MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_EXPERIMENT_NAME_LENGTH = 500
# What MLflow's database columns hold (PostgreSQL refuses more, naming nothing; SQLite keeps it): below its checks.
EXPERIMENT_NAME_COLUMN = 256
MAX_RUN_NAME_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_LOG_REQUEST_SIZE = int(1e6)

# MLflow on POSIX: alphanumerics (Unicode word characters), underscores, dashes, periods,
# spaces, colons and slashes.
_NAME_RE = re.compile(r"^[/\w.\- :]*$")
NAME_RULE = (
    "names may only contain alphanumerics, underscores (_), dashes (-), periods (.), "
    "spaces ( ), colons (:) and slashes (/)"
)
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_ACCEPTED_NAMES: set[str] = set()  # names that passed check_name (str only: a set holds them by value)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class NonFiniteMetricWarning(UserWarning):
    """A metric value is NaN or infinite: MLflow stores it, but charts and searches suffer."""


class TruncatedValueWarning(UserWarning):
    """A param or tag value was longer than MLflow allows and was cut to the limit."""


def check_name(kind: str, name: Any) -> str:
    """Return ``name`` if MLflow accepts it as a ``kind`` (metric, param, tag) key, else raise."""
    if type(name) is str and name in _ACCEPTED_NAMES:  # the same keys come every step: checked once
        return name
    if not isinstance(name, str):
        raise ValidationError(f"{kind} name {quoted(name)}: must be a string, not {type(name).__name__}")
    if not _NAME_RE.match(name):
        raise ValidationError(f"{kind} name {quoted(name)}: {NAME_RULE if is_utf8(name) else NOT_UTF8}")
    normalised = posixpath.normpath(name)
    if normalised != name or normalised == "." or normalised.startswith(("..", "/")):
        raise ValidationError(
            f"{kind} name {quoted(name)}: must be a normalised relative path "
            f"(no empty, '.' or '..' parts, no leading or doubled '/'), it would resolve to {quoted(normalised)}"
        )
    if len(name) > MAX_ENTITY_KEY_LENGTH:
        raise ValidationError(f"{kind} name {quoted(name[:40])}...: longer than {MAX_ENTITY_KEY_LENGTH} characters ({len(name)})")
    if len(_ACCEPTED_NAMES) < 100_000:
        _ACCEPTED_NAMES.add(name)
    return name


#: Tags plantml writes itself, which steer delivery and recovery (``plantml.delivery=complete`` marks a run whose
#: journal must never be replayed over it): a run's own tags by those names would be overwritten, or would lie.
RESERVED_TAGS = ("plantml.delivery", "plantml.recovered", "plantml.rejected", "plantml.heartbeat", "plantml.error")


def check_user_tag_name(name: Any) -> str:
    """:func:`check_name` for a tag the user sets, refusing plantml's own (:data:`RESERVED_TAGS`, and names under them)."""
    checked = check_name("tag", name)
    if any(checked == reserved or checked.startswith(reserved + ".") for reserved in RESERVED_TAGS):
        raise ValidationError(f"tag name {quoted(checked)}: reserved for plantml's own records "
                              f"({', '.join(f'{reserved}*' for reserved in RESERVED_TAGS)}); choose another name")
    return checked


def checked_text(kind: str, key: str, text: str) -> str:
    """``text`` made safe to send (:func:`safe_text`); a NUL character is refused naming ``kind`` ``key``."""
    if "\x00" in text:
        raise ValidationError(f"{kind} {quoted(key)}: value contains a NUL character (\\x00), which MLflow's stores cannot hold")
    return safe_text(text)


def metric_value(key: str, value: Any) -> float:
    """Return ``value`` as a float; warn on NaN or infinity; raise on a non-number or one too large."""
    if type(value) is float and value - value == 0:  # the common case, finite (no ABC check: it costs microseconds)
        return value
    if isinstance(value, decimal.Decimal):  # a Number, not a Real: MLflow takes it as its float
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        value = _unwrap_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(f"metric {quoted(key)}: value {quoted(value)} is not a number ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:
        raise ValidationError(f"metric {quoted(key)}: value {str(value)[:40]}... is too large for a float") from None
    if not math.isfinite(number):
        warnings.warn(
            f"metric {quoted(key)} is {number}: MLflow stores NaN as NaN and infinities as +/-1.79e308",
            NonFiniteMetricWarning,
            stacklevel=caller_stacklevel(),
        )
    return number


def _unwrap_scalar(value: Any) -> Any:
    """A one-element tensor or array becomes its Python number; anything else is returned as is."""
    numel = getattr(value, "numel", None)
    size = numel() if callable(numel) else getattr(value, "size", None)
    item = getattr(value, "item", None)
    if size == 1 and callable(item):
        try:
            return item()
        except (RuntimeError, TypeError, ValueError):  # a tensor with no value (on the meta device): not a number
            return value
    return value


def metric_step(key: str, step: Any) -> int:
    """Return the step as an int (``None`` means 0, MLflow's default); raise on a non-integer."""
    if step is None:
        return 0
    if type(step) is int and INT64_MIN <= step <= INT64_MAX:  # the common case
        return step
    if not isinstance(step, numbers.Integral):
        step = _unwrap_scalar(step)  # a one-element integer tensor or array (``torch.tensor(5)``)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValidationError(f"metric {quoted(key)}: step {step!r} is not an integer")
    if not INT64_MIN <= int(step) <= INT64_MAX:
        raise ValidationError(f"metric {quoted(key)}: step {step} is outside MLflow's 64-bit range [-2**63, 2**63 - 1]")
    return int(step)


def param_value(key: str, value: Any) -> str:
    """The string MLflow stores for a param value (:func:`checked_text`), cut to its limit with a warning."""
    return _truncated("param", key, checked_text("param", key, str(value)), MAX_PARAM_VAL_LENGTH)


def tag_value(key: str, value: Any) -> str:
    """The string MLflow stores for a tag value (:func:`checked_text`), cut to its limit with a warning."""
    return _truncated("tag", key, checked_text("tag", key, str(value)), MAX_TAG_VAL_LENGTH)


def run_name(name: Any) -> str | None:
    """A run name MLflow can store (:func:`checked_text`, at most 250 characters: its database column), or None."""
    if name is None:
        return None
    text = checked_text("run name", str(name), str(name))
    if len(text) > MAX_RUN_NAME_LENGTH:
        raise ValidationError(f"run name {quoted(text[:40])}...: longer than MLflow's {MAX_RUN_NAME_LENGTH} characters ({len(text)})")
    return text


def _truncated(kind: str, key: str, text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    warnings.warn(
        f"{kind} {quoted(key)}: value of {len(text)} characters truncated to MLflow's limit of {limit}",
        TruncatedValueWarning,
        stacklevel=caller_stacklevel(),
    )
    return text[:limit]


def check_mapping(kind: str, values: Any) -> Mapping[str, Any]:
    """Raise unless ``values`` is a mapping (what log_params, log_metrics and set_tags take)."""
    if not isinstance(values, Mapping):
        raise ValidationError(f"{kind}: expected a dict, got {type(values).__name__}")
    return values


def check_json_serialisable(data: Any, name: str) -> None:
    """Raise, naming the first offending key path, unless ``data`` can be written as JSON."""
    try:
        json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as exc:
        where = _offending_path(data, "") or "(top level)"
        raise ValidationError(f"{name}: value at {where} is not JSON-serialisable ({exc})") from None


def _offending_path(data: Any, prefix: str) -> str | None:
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return path
            found = _offending_path(value, path)
            if found is not None:
                return found
        return None
    if isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            found = _offending_path(value, f"{prefix}[{index}]")
            if found is not None:
                return found
        return None
    try:
        json.dumps(data)
    except (TypeError, ValueError):
        return prefix or None
    return None


def check_artifact_subpath(artifact_path: str | None) -> str | None:
    """``artifact_path`` made safe (:func:`checked_text`) if it is a relative path inside the run's artifacts, else raise.

    It is normalised as an object key must be: ``\\`` as ``/``, ``.`` and empty parts dropped
    (``./a//b`` is ``a/b``; ``.`` is the artifacts' root, None). An S3 store refuses a key with
    a ``.`` part (400), which no retry could deliver.
    """
    if artifact_path is None:
        return None
    text = checked_text("artifact path", str(artifact_path), str(artifact_path))
    parts = text.replace("\\", "/").split("/")
    if text.startswith(("/", "\\")) or ".." in parts:
        raise ValidationError(f"artifact path {quoted(text)}: must be relative, without '..' parts")
    kept = [part for part in parts if part not in ("", ".")]
    return "/".join(kept) or None


def check_artifact_name(name: Any, kind: str) -> str:
    """Raise unless ``name`` is a usable artifact file name (``confusion_matrix.png``, ``a/b.json``), normalised."""
    normalised = check_artifact_subpath(name) if isinstance(name, str) and not name.endswith(("/", "\\")) else None
    if normalised is None or normalised.rpartition("/")[2] in ("", "."):
        raise ValidationError(f"{kind} name {quoted(name)}: must be a non-empty file name such as 'history.json'")
    return normalised


#: What MLflow 3 refuses in a logged model's name (``mlflow.utils.validation._validate_logged_model_name``).
LOGGED_MODEL_BAD_CHARS = ("/", ":", ".", "%", '"', "'")


def check_model_name(name: Any) -> str:
    """Raise unless ``name`` is a logged model's name MLflow takes (``model``, ``best_model``): checked
    before the model is saved and sent, not refused by the server afterwards."""
    if not isinstance(name, str) or not name.strip() or "\\" in name or any(c in name for c in LOGGED_MODEL_BAD_CHARS):
        raise ValidationError(f"model name {quoted(name)}: must be a non-empty name without any of / \\ : . % \" ' "
                              "(MLflow's rule for logged models), such as 'model'")
    return check_utf8(name, "model name")


def check_registered_model_name(name: Any, what: str = "registered model name") -> str:
    """Raise unless MLflow's registry takes ``name`` (``mlflow.utils.validation._validate_model_name``): not
    empty, no ``/`` or ``:``, not ``.`` or ``..``; checked before a training or an upload, not refused after it."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(f"{what} {quoted(name)}: must be a non-empty name such as 'plant_classifier'")
    if "/" in name or ":" in name or name in (".", "..") or "\0" in name:
        raise ValidationError(f"{what} {quoted(name)}: MLflow's registry refuses '/', ':' and NUL in a name, and '.' or '..' as one")
    return check_utf8(name, what)


def check_utf8(name: str, what: str) -> str:
    """Raise when ``name`` holds bytes that are not UTF-8 (lone surrogates: a shell in Latin-1): no store takes them,
    and writing them as ``%XX``, as file names are, would rename what the caller names."""
    if not is_utf8(name):
        raise ValidationError(f"{what} {quoted(name)}: {NOT_UTF8}")
    return name


def _local_path(path: Any, what: str) -> Path:
    """``path`` (a str, an ``os.PathLike`` or bytes, as ``os.listdir(b".")`` gives) as a Path, or a ValidationError."""
    try:
        return Path(os.fsdecode(path))
    except TypeError:
        raise ValidationError(f"{what} {quoted(path)}: expected a path (str or os.PathLike), got {type(path).__name__}") from None


def torch_module(model: Any, name: str) -> None:
    """Raise unless ``model`` is a ``torch.nn.Module`` (what MLflow's pytorch flavor saves): a wrong argument is bad
    input, not a failure to save."""
    torch = sys.modules.get("torch")  # without torch imported, nothing is an nn.Module
    if torch is None or not isinstance(model, torch.nn.Module):
        raise ValidationError(f"model {quoted(name)}: expected a torch.nn.Module, got {type(model).__name__}")


def existing_file(path: Any) -> Path:
    """The path of an existing file to upload, or a ValidationError naming it."""
    local = _local_path(path, "artifact")
    if not local.exists():
        raise ValidationError(f"artifact {quoted(str(local))}: no such file")
    if local.is_dir():
        raise ValidationError(f"artifact {quoted(str(local))}: is a folder, use log_artifacts()")
    return local


def existing_dir(path: Any) -> Path:
    """The path of an existing folder to upload, or a ValidationError naming it."""
    local = _local_path(path, "artifact folder")
    if not local.exists():
        raise ValidationError(f"artifact folder {quoted(str(local))}: no such folder")
    if not local.is_dir():
        raise ValidationError(f"artifact folder {quoted(str(local))}: is a file, use log_artifact()")
    return local


#: The most runs MLflow returns from one search.
MAX_SEARCH_RESULTS = 50_000


def search_options(max_results: Any, order_by: Any) -> tuple[int | None, list[str] | None]:
    """``max_results`` (None: MLflow's default) and ``order_by`` (a string or a list of them) as MLflow's search takes them."""
    whole = isinstance(max_results, numbers.Integral) and not isinstance(max_results, bool)
    if max_results is not None and not (whole and 1 <= max_results <= MAX_SEARCH_RESULTS):
        raise ValidationError(f"max_results {max_results!r}: must be a whole number from 1 to {MAX_SEARCH_RESULTS} (MLflow's limit)")
    if isinstance(order_by, str):
        order_by = [order_by]
    if order_by is not None and (not isinstance(order_by, (list, tuple)) or not all(isinstance(o, str) for o in order_by)):
        raise ValidationError(f"order_by {order_by!r}: must be a list of strings such as 'metrics.val_accuracy DESC'")
    return None if max_results is None else int(max_results), None if order_by is None else list(order_by)


def check_status(status: Any) -> str:
    """Return ``status`` if it ends a run in MLflow (FINISHED, FAILED, KILLED), else raise."""
    if status not in RUN_STATUSES:
        raise ValidationError(f"run status {quoted(status)}: must be one of {', '.join(RUN_STATUSES)}")
    return status


def check_experiment_name(name: Any) -> str:
    """Return ``name`` if MLflow accepts it as an experiment name, else raise."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(f"experiment name {quoted(name)}: must be a non-empty string")
    if len(name) > min(MAX_EXPERIMENT_NAME_LENGTH, EXPERIMENT_NAME_COLUMN):
        raise ValidationError(f"experiment name {quoted(name[:40])}...: longer than MLflow's {EXPERIMENT_NAME_COLUMN} characters ({len(name)})")
    return check_utf8(name, "experiment name")


#: MLflow's limits on a dataset input (``mlflow.utils.validation``).
MAX_DATASET_NAME_LENGTH = 500
MAX_DATASET_DIGEST_LENGTH = 36
MAX_DATASET_SOURCE_TYPE_LENGTH = 36
MAX_INPUT_TAG_VALUE_LENGTH = 500


def dataset_fields(name: Any, digest: Any, source: Any, source_type: Any, profile: Any, context: Any) -> dict[str, Any]:
    """The checked fields of a dataset input. A digest longer than MLflow keeps (36 characters, a SHA-256 hex
    has 64) is cut to its first 32 characters; a profile mapping is written as JSON."""
    fields: dict[str, Any] = {}
    limits = {"name": MAX_DATASET_NAME_LENGTH, "source_type": MAX_DATASET_SOURCE_TYPE_LENGTH, "source": 65535,
              "context": MAX_INPUT_TAG_VALUE_LENGTH, "digest": None}
    for field_name, value in (("name", name), ("digest", digest), ("source", source), ("source_type", source_type),
                              ("context", context)):
        if not isinstance(value, str) or not value.strip():
            raise ValidationError(f"data set {field_name} {quoted(value)}: must be a non-empty string")
        text = checked_text("data set", field_name, value)
        limit = limits[field_name]
        if limit is not None and len(text) > limit:
            raise ValidationError(f"data set {field_name} {quoted(text[:40])}...: longer than MLflow's {limit} characters")
        fields[field_name] = text
    if len(fields["digest"]) > MAX_DATASET_DIGEST_LENGTH:
        fields["digest"] = fields["digest"][:32]
    if profile is not None and not isinstance(profile, str):
        check_json_serialisable(profile, "data set profile")
        profile = json.dumps(safe_data(profile), sort_keys=True)
    fields["profile"] = profile
    return fields
