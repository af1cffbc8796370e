"""No patient identity in logs or job errors: only UIDs leave a job.

The worker knows whose study it processes (Orthanc's study resource names the patient), so it
registers those values for the duration of the job, and every log record and every job error
text passes through :func:`redact`, which replaces them (case-insensitively, and each part of
a person name) by ``[redacted]``. Python warnings (pydicom's value warnings quote the values)
are routed through logging, so they are redacted too; pydicom's reading validation is set to
ignore, so it does not warn about values at all.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

REDACTED = "[redacted]"
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
                        "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientBirthName",
                        "PatientMotherBirthName")
"""Values of these tags never appear in a log line or a job error."""
MIN_LENGTH = 3

_lock = threading.Lock()
_values: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _expand(value: str) -> set[str]:
    """The value and, for person names (``^``-separated), each name part."""
    parts = {value.strip(), value.replace("^", " ").strip()}
    parts.update(part.strip() for part in re.split(r"[\^=\\]", value))
    return {part for part in parts if len(part) >= MIN_LENGTH}


def _compile() -> None:
    global _pattern
    words = sorted(_values, key=len, reverse=True)
    _pattern = re.compile("|".join(re.escape(word) for word in words), re.IGNORECASE) if words else None


@contextlib.contextmanager
def identifiers(values: Iterable[Any]) -> Iterator[None]:
    """Redact these values (and each part of a person name) while the block runs."""
    added = set()
    for value in values:
        if value:
            added |= _expand(str(value))
    with _lock:
        new = added - _values
        _values.update(new)
        _compile()
    try:
        yield
    finally:
        with _lock:
            _values.difference_update(new)
            _compile()


def identifiers_of(tags: Mapping[str, Any]) -> Iterable[Any]:
    """The identifying values among simplified DICOM tags (``PatientMainDicomTags`` and the like)."""
    return [tags.get(keyword) for keyword in IDENTIFYING_KEYWORDS if tags.get(keyword)]


def redact(text: str) -> str:
    """``text`` with every registered identifying value replaced by ``[redacted]``."""
    pattern = _pattern
    return pattern.sub(REDACTED, text) if pattern is not None and text else text


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message and any traceback go out redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _pattern is None:
            return True
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install() -> None:
    """Redact every handler of the root logger, route warnings through logging, quiet pydicom's value checks."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
