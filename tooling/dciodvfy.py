"""Validate DICOM instances with dicom3tools' ``dciodvfy`` (the real binary, not a re-implementation).

``dciodvfy`` checks an instance against its IOD (modules, attribute types, value
representations, enumerated values, code sequences and SR content-tree constraints). It prints
the IOD name on stderr, then one line per finding: ``Error - ...`` for violations of the
standard, ``Warning - ...`` for things that are legal but suspicious, and ``Abort - ...`` when
it could not read the input at all.

Every SEG and SR the node writes is checked with :func:`assert_valid` in the tests.

Tolerated warnings
------------------
Exactly one kind, listed in :data:`TOLERATED_WARNINGS`, comes from a limitation of
``dciodvfy`` itself and is tolerated:

* ``Warning - Unrecognized defined term <99...> for value 1 of attribute <Coding Scheme
  Designator>``, only when that designator starts with ``99`` and is declared in the instance's
  Coding Scheme Identification Sequence (0008,0110). PS3.3 section 8.2 reserves designators
  beginning with "99" for private coding schemes, and the SOP Common module's (0008,0110) is
  where an instance declares them; ``dciodvfy`` only compares designators with its built-in
  list of standard schemes and never reads (0008,0110), so it warns on every private code
  however well declared. An undeclared private designator is still reported as a warning.

Tolerated warnings are moved to :attr:`ValidationResult.tolerated_warnings`, never dropped.
Every other warning stays in :attr:`ValidationResult.warnings`, and :func:`assert_valid` fails
on it unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

DCIODVFY = "dciodvfy"
"""Name of the dicom3tools validator executable (looked up on PATH)."""

TIMEOUT_S = 60.0
"""Seconds after which a ``dciodvfy`` run is considered hung."""

TOLERATED_WARNINGS: tuple[re.Pattern[str], ...] = (
    re.compile(
        r"^Warning - Unrecognized defined term <(?P<private_scheme>99[^>]*)> "
        r"for value 1 of attribute <Coding Scheme Designator>$"
    ),
)
"""Warnings that come from limitations of ``dciodvfy`` (see the module docstring).

A pattern with a ``private_scheme`` group only matches when that coding scheme is declared in
the instance's Coding Scheme Identification Sequence.
"""

_ERROR_PREFIXES = ("Error - ", "Abort - ")
_WARNING_PREFIX = "Warning - "


class DciodvfyNotFoundError(RuntimeError):
    """The ``dciodvfy`` executable is not installed (Debian package ``dicom3tools``)."""


class DicomValidationError(AssertionError):
    """``dciodvfy`` reported errors (or, when not allowed, warnings) for an instance.

    Attributes:
        result: The full validation result.
        findings: The lines that made the check fail.
    """

    def __init__(self, source: str, result: ValidationResult, findings: list[str]) -> None:
        self.result = result
        self.findings = findings
        lines = "\n".join(findings)
        super().__init__(f"dciodvfy reported {len(findings)} problem(s) in {source}:\n{lines}")


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    """What ``dciodvfy`` said about one instance.

    Attributes:
        errors: ``Error - ...`` and ``Abort - ...`` lines, plus a synthetic line when
            ``dciodvfy`` exited non-zero without printing any error.
        warnings: ``Warning - ...`` lines not matched by :data:`TOLERATED_WARNINGS`.
        output: Everything ``dciodvfy`` printed (stdout then stderr), for logs and reports.
        iod: The IOD ``dciodvfy`` recognised (first non-finding line, e.g. ``"ComprehensiveSR"``),
            or ``""`` when it printed none.
        tolerated_warnings: Warnings matched by :data:`TOLERATED_WARNINGS`.
        returncode: Exit status of ``dciodvfy``.
    """

    errors: list[str]
    warnings: list[str]
    output: str
    iod: str = ""
    tolerated_warnings: list[str] = dataclasses.field(default_factory=list)
    returncode: int = 0

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors


def _dciodvfy_path() -> str:
    path = shutil.which(DCIODVFY)
    if path is None:
        raise DciodvfyNotFoundError(
            f"{DCIODVFY!r} was not found on PATH; install the Debian package 'dicom3tools' (make install does this)."
        )
    return path


def _is_tolerated(line: str, declared_schemes: frozenset[str]) -> bool:
    for pattern in TOLERATED_WARNINGS:
        match = pattern.search(line)
        if match is None:
            continue
        scheme = match.groupdict().get("private_scheme")
        if scheme is None or scheme in declared_schemes:
            return True
    return False


def declared_coding_schemes(dataset: pydicom.Dataset) -> frozenset[str]:
    """Coding Scheme Designators declared in a dataset's Coding Scheme Identification Sequence."""
    return frozenset(
        str(item.CodingSchemeDesignator)
        for item in dataset.get("CodingSchemeIdentificationSequence", [])
        if "CodingSchemeDesignator" in item
    )


def parse_output(output: str, returncode: int = 0, declared_schemes: frozenset[str] = frozenset()) -> ValidationResult:
    """Split ``dciodvfy`` output into errors and warnings.

    Args:
        output: Combined stdout and stderr of one ``dciodvfy`` run.
        returncode: Its exit status; a non-zero status with no error line becomes an error.
        declared_schemes: Coding schemes declared in the validated instance (see
            :func:`declared_coding_schemes`); private-scheme warnings are tolerated only for these.

    Returns:
        The parsed result.
    """
    errors: list[str] = []
    warnings: list[str] = []
    tolerated: list[str] = []
    iod = ""
    for raw_line in output.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        if line.startswith(_ERROR_PREFIXES):
            errors.append(line)
        elif line.startswith(_WARNING_PREFIX):
            if _is_tolerated(line, declared_schemes):
                tolerated.append(line)
            else:
                warnings.append(line)
        elif not iod and not line.startswith("Usage:"):
            iod = line
    if returncode != 0 and not errors:
        errors.append(f"Error - dciodvfy exited with status {returncode} without an error line")
    return ValidationResult(
        errors=errors,
        warnings=warnings,
        output=output,
        iod=iod,
        tolerated_warnings=tolerated,
        returncode=returncode,
    )


def _run(path: Path, declared_schemes: frozenset[str] | None = None) -> ValidationResult:
    if not path.is_file():
        raise FileNotFoundError(f"No DICOM file to validate at {path}")
    if declared_schemes is None:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):  # dciodvfy will say what is wrong
            declared_schemes = frozenset()
        else:
            declared_schemes = declared_coding_schemes(header)
    completed = subprocess.run(
        [_dciodvfy_path(), os.fspath(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=TIMEOUT_S,
        check=False,
    )
    return parse_output(completed.stdout + completed.stderr, completed.returncode, declared_schemes)


def validate(path_or_dataset: str | os.PathLike[str] | pydicom.Dataset) -> ValidationResult:
    """Run ``dciodvfy`` on a file or an in-memory dataset.

    A dataset is written to a temporary Part 10 file first (with its file meta information
    completed by pydicom), exactly as it would be sent or stored.

    Args:
        path_or_dataset: Path of a DICOM Part 10 file, or a :class:`pydicom.Dataset`.

    Returns:
        The errors, warnings and full output of ``dciodvfy``.

    Raises:
        DciodvfyNotFoundError: ``dciodvfy`` is not installed.
        FileNotFoundError: The path does not name a file.
        TypeError: The argument is neither a path nor a dataset.
    """
    if isinstance(path_or_dataset, pydicom.Dataset):
        with tempfile.TemporaryDirectory(prefix="dciodvfy-") as directory:
            path = Path(directory) / "instance.dcm"
            path_or_dataset.save_as(path, enforce_file_format=True)
            return _run(path, declared_coding_schemes(path_or_dataset))
    if isinstance(path_or_dataset, (str, os.PathLike)):
        return _run(Path(path_or_dataset))
    raise TypeError(f"validate() takes a file path or a pydicom.Dataset, not {type(path_or_dataset).__name__}")


def assert_valid(
    path_or_dataset: str | os.PathLike[str] | pydicom.Dataset,
    allow_warnings: bool = False,
) -> ValidationResult:
    """Validate and raise when ``dciodvfy`` reports errors (or warnings, unless allowed).

    Args:
        path_or_dataset: Path of a DICOM Part 10 file, or a :class:`pydicom.Dataset`.
        allow_warnings: When False (the default), warnings fail like errors.

    Returns:
        The validation result, for further checks or logging.

    Raises:
        DicomValidationError: With the offending ``Error``/``Warning`` lines in its message.
    """
    result = validate(path_or_dataset)
    source = (
        f"{path_or_dataset.get('SOPClassUID', 'dataset')} {path_or_dataset.get('SOPInstanceUID', '')}"
        if isinstance(path_or_dataset, pydicom.Dataset)
        else os.fspath(path_or_dataset)
    )
    findings = result.errors if allow_warnings else result.errors + result.warnings
    if findings:
        raise DicomValidationError(source.strip(), result, findings)
    return result
