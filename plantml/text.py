"""Text made safe to show: names that are not UTF-8, and passwords inside URLs.

Python decodes a file name's bytes that are not UTF-8 (a folder named in Latin-1, say
``pl\\xe9nts``) as *lone surrogates* (``'pl\\udce9nts'``, PEP 383). No store, JSON
encoder or font takes those. :func:`safe_text` writes each such byte as ``%XX`` (as a URL
would: ``pl%E9nts``) and any other lone surrogate as U+FFFD; other text is unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
"""What a secret is shown as."""

_SURROGATE = re.compile("[\ud800-\udfff]")
# the password of scheme://user:password@host, within one word of a longer text
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)\S*@")  # up to the last @: a password may hold one


def _replace(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"%{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"


def safe_text(text: str) -> str:
    """``text`` with each undecodable file-name byte written as ``%XX`` and any other lone surrogate as U+FFFD."""
    return _SURROGATE.sub(_replace, text) if _SURROGATE.search(text) else text


def quoted(value: object) -> str:
    """``repr(value)``, a string's taken after :func:`safe_text`: a name typed in a Latin-1 shell is shown
    ``'pl%E9nts'``, as plantml shows it everywhere, not ``'pl\\udce9nts'``."""
    return repr(safe_text(value) if isinstance(value, str) else value)


_ESCAPED_BYTE = re.compile(r"(\\\\)|\\udc([89a-f][0-9a-f])")


def unescaped_bytes(message: str) -> str:
    """A message that quoted a name with ``repr`` (click's ``No such option '--pl\\udce9nts'``) with each undecodable
    byte's escape written ``%XX`` as :func:`safe_text` writes it; an escaped backslash is left as it is."""
    return _ESCAPED_BYTE.sub(lambda m: m[1] or f"%{m[2].upper()}", message)


NOT_UTF8 = "holds bytes that are not UTF-8 (shown as %XX); give it in UTF-8"
"""The one line's reason for a name typed in a Latin-1 shell, which no store, server or S3 key takes."""


def is_utf8(text: str) -> bool:
    """Whether ``text`` holds no lone surrogate: bytes that were not UTF-8 (a Latin-1 shell's), which no store takes."""
    return _SURROGATE.search(text) is None


_CONTROL = re.compile("[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def shown_text(text: str) -> str:
    """``text`` as one line that can be shown: :func:`safe_text`, and each control character written as an escape (a
    newline as ``\\n``, a tab as ``\\t``, others as ``\\xNN``), so a file named ``bad\\nname.jpg`` stays on the one line
    of the message that names it."""
    text = safe_text(text)
    return _CONTROL.sub(lambda m: _CONTROL_NAMES.get(m.group(), f"\\x{ord(m.group()):02x}"), text) \
        if _CONTROL.search(text) else text


def safe_data(data: Any) -> Any:
    """JSON-like ``data`` (mappings, lists, tuples, scalars) with :func:`safe_text` applied to every string in it, keys
    included: ``json.dumps`` would write a lone surrogate as a ``\\udce9`` escape, which no UTF-8 reader can decode."""
    if isinstance(data, str):
        return safe_text(data)
    if isinstance(data, Mapping):
        return {safe_data(key): safe_data(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [safe_data(item) for item in data]
    return data


def name_text(name: str) -> str:
    """A file name as plantml records it: its bytes read as UTF-8 (others as lone surrogates), whatever the
    locale, so a set has the same classes, keys and digest in a Latin-1 shell as in a UTF-8 one."""
    return os.fsencode(name).decode("utf-8", "surrogateescape")


def file_name(text: str) -> str:
    """The file name whose bytes are ``text`` in UTF-8 (the inverse of :func:`name_text`), in this locale's terms."""
    return os.fsdecode(text.encode("utf-8", "surrogateescape"))


def mask_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by :data:`MASK`.

    A tracking URI may carry one (``postgresql://mlflow:pw@db/mlflow``, ``http://user:pw@host``);
    every error message, repr and printed line that shows a URI passes through here.
    """
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text) if "://" in text else text
