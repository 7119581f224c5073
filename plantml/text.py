"""Names that are not UTF-8, made safe for every store, file name and font.

Python decodes a file name's bytes that are not UTF-8 (a folder named in Latin-1, say
``pl\\xe9nts``) as *lone surrogates* (``'pl\\udce9nts'``, PEP 383). No store, JSON
encoder or font takes those. :func:`safe_text` writes each such byte as ``%XX`` (as a URL
would: ``pl%E9nts``) and any other lone surrogate as U+FFFD; other text is unchanged.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"%{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"


def safe_text(text: str) -> str:
    """``text`` with each undecodable file-name byte written as ``%XX`` and any other lone surrogate as U+FFFD."""
    return _SURROGATE.sub(_replace, text) if _SURROGATE.search(text) else text
