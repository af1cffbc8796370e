"""Repair the source attributes that our SEG and SRs copy, so that what we write stays valid.

highdicom copies, as they are, the root attributes of the source image's Patient and Study
modules (Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study;
sequences with all their items), its Specimen module, its Frame of Reference, its General
Equipment (as contributing equipment), AcquisitionDateTime, the lossy-compression flags and
the Specific Character Set into every SEG and SR. A source that carries a defect there (an
incomplete reference sequence item, an empty code, an ACR-NEMA date, an over-long description)
makes every object we write fail ``dciodvfy``, or makes highdicom refuse to build it.

:func:`repair_source_headers` returns copies of the source headers in which these attributes
are valid, and findings that say what was changed. Which attributes are copied, and their types
(1, 1C, 2, 2C, 3) at every sequence level, come from highdicom's own module tables (the ones it
copies by); value representations, lengths, multiplicities and retired tags from pydicom's data
dictionary and VR validators; the accepted character sets and patient sexes from the checks
highdicom applies. The policy:

* a value is **repaired** only when the repair is certain: a DA, TM or DT written with
  separators (the ACR-NEMA form YYYY.MM.DD / HH:MM:SS, or ISO 8601), a TM with more than 6
  fractional digits, trailing padding or control characters, trailing empty name components,
  a lower-case CS, an AS without zero padding, an IS written as a whole decimal, a DS longer
  than 16 characters (rewritten shorter), an over-long descriptive text (truncated; an
  identifier never is), a code too long for CodeValue (moved to LongCodeValue), a character set
  highdicom does not accept (the copies are written as UTF-8, ISO_IR 192);
* otherwise the attribute is treated as its type allows: a Type 3 or 1C attribute is removed,
  a Type 2 or 2C one is emptied (and a missing Type 2 one is added empty); a sequence item that
  lacks a Type 1 attribute, or whose Type 1 value is empty or invalid, or a code item without a
  code, is dropped, and a sequence left without items is removed or emptied as its own type
  allows; an optional module whose Type 1 attribute cannot be repaired is dropped whole; a
  retired attribute inside a copied item is removed;
* a Type 1 attribute at the root of a mandatory module (StudyInstanceUID, FrameOfReferenceUID)
  identifies what our objects must share with the source: it is never changed, and a defect in
  it is reported as kept.

Findings name attributes by keyword and tag and items by position, never their values, so they
can be recorded in the job as they are. The datasets passed in, and the files in Orthanc, are
never modified.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pydicom
from highdicom._standard_utils import (
    AttributeTypeValues,
    construct_module_tree,
    get_iod_module_map,
    get_sop_class_iod_map,
)
from highdicom.enum import PatientSexValues
from highdicom.valuerep import _check_specific_character_set
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_is_retired, dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag, Tag
from pydicom.uid import CTImageStorage
from pydicom.valuerep import MAX_VALUE_LEN, VALIDATORS, format_number_as_ds

UTF8 = "ISO_IR 192"
"""The character set of a copy whose source declares one highdicom does not accept."""

COPIED_IES = ("Patient", "Study")
"""Information entities whose modules highdicom copies whole (``copy_patient_and_study_information``)."""

COPIED_MODULES = ("specimen", "frame-of-reference", "general-equipment")
"""Further modules highdicom copies from the source image (specimen, frame of reference, and
the acquisition equipment as a contributing equipment item)."""

COPIED_ATTRIBUTES = {
    "general-acquisition": ("AcquisitionDateTime",),
    "general-image": ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"),
}
"""Single attributes of other modules that highdicom copies into the SEG or its equipment item."""

ENUMERATED_VALUES: dict[str, frozenset[str]] = {
    "PatientSex": frozenset(value.value for value in PatientSexValues),  # the check highdicom applies
    # PS3.3 Enumerated Values of the other copied CS attributes (neither highdicom nor pydicom ship them):
    "QualityControlSubject": frozenset({"YES", "NO"}),  # C.7.1.1 Patient
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),  # C.7.1.1 Patient
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),  # C.7.2.2 Patient Study
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),  # C.7.2.2 Patient Study
    "LongitudinalTemporalEventType": frozenset({"ENROLLMENT", "BASELINE"}),  # C.7.2.3 Clinical Trial Study
    "LossyImageCompression": frozenset({"00", "01"}),  # C.7.6.1.1.5 General Image
    "UniversalEntityIDType": frozenset({"DNS", "EUI64", "ISO", "URI", "UUID", "X400", "X500"}),  # 10.14
    "ContextGroupExtensionFlag": frozenset({"Y", "N"}),  # 8.8 Code Sequence Macro
}
"""Copied attributes whose values must be one of an enumeration (dciodvfy reports any other as an error)."""

NEVER_REMOVED = {"LossyImageCompression": "removing it would declare the source images not lossy compressed"}
"""Optional attributes kept (and reported) when invalid and unrepairable, and why."""

_TYPE_1 = {AttributeTypeValues.REQUIRED}
_MUST_HAVE_VALUE = {AttributeTypeValues.REQUIRED, AttributeTypeValues.CONDITIONALLY_REQUIRED}
_TYPE_2 = {AttributeTypeValues.REQUIRED_EMPTY_IF_UNKNOWN, AttributeTypeValues.CONDITIONALLY_REQUIRED_EMPTY_IF_UNKNOWN}
_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}
_MULTILINE_VRS = {"ST", "LT", "UT"}
_SINGLE_LINE_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # every C0 control but ESC (code extensions)
_MULTILINE_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # TAB, LF, FF, CR and ESC allowed
_DESCRIPTIVE = re.compile(r"(Description|Comments?|Meaning|History|Address|Occupation|Alerts|Allergies|Name|"
                          r"Diagnoses\w*|Reason\w*)$")
"""Keywords of text attributes that describe (may be truncated) rather than identify (never truncated)."""
_SEPARATED_DA = re.compile(r"^(\d{4})[.\-/](\d{2})[.\-/](\d{2})$")
_SEPARATED_TM = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?$")
_LONG_FRACTION_TM = re.compile(r"^(\d{6})\.(\d{7,})$")
_ISO_DT = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?)?(?:([+-]\d{2}):?(\d{2}))?$")
_LOOSE_AS = re.compile(r"^(\d{1,3})\s*([DWMYdwmy])$")
_IS_RANGE = (-(2**31), 2**31 - 1)
_CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")


@dataclasses.dataclass(frozen=True)
class RepairedHeaders:
    """Copies of one series' source headers whose copied attributes are valid, and what was changed.

    Attributes:
        headers: one copy per source header, same order; elements that needed no change are
            shared with the source datasets (neither may be modified in place).
        findings: what was repaired, emptied, removed or dropped (or kept though invalid), once
            per distinct finding, with "(in k of n instances)" when not every instance had it.
            Keywords, tags and item positions only, never a value.
    """

    headers: list[pydicom.Dataset]
    findings: list[str]


def repair_source_headers(headers: Sequence[pydicom.Dataset]) -> RepairedHeaders:
    """Copies of ``headers`` whose attributes copied into a SEG or SR are valid (see the module docstring).

    Args:
        headers: the source image datasets of one series (headers suffice).

    Returns:
        The repaired copies and the findings.
    """
    counts: Counter[str] = Counter()
    copies = []
    for header in headers:
        copy, findings = _repair_header(header)
        copies.append(copy)
        counts.update(dict.fromkeys(findings, 1))
    total = len(headers)
    findings = [finding if count == total else f"{finding} (in {count} of {total} instances)"
                for finding, count in counts.items()]
    return RepairedHeaders(headers=copies, findings=findings)


@dataclasses.dataclass(frozen=True)
class CopiedAttribute:
    """One attribute of highdicom's module tree.

    Attributes:
        keyword: its data dictionary keyword.
        tag: its tag.
        type: its type (1, 1C, 2, 2C, 3) at this place of the module.
        item: for a sequence, the attributes of its items by tag (empty when the tree lists none).
    """

    keyword: str
    tag: BaseTag
    type: AttributeTypeValues
    item: dict[BaseTag, CopiedAttribute]

    @property
    def label(self) -> str:
        """``"Keyword (gggg,eeee)"``."""
        return f"{self.keyword} {self.tag}"


@dataclasses.dataclass(frozen=True)
class CopiedModule:
    """The copied part of one module of the source IOD.

    Attributes:
        key: highdicom's module key (``"general-study"``).
        mandatory: the module is mandatory (M) in the source IOD.
        attributes: its copied root attributes by tag.
    """

    key: str
    mandatory: bool
    attributes: dict[BaseTag, CopiedAttribute]

    @property
    def name(self) -> str:
        """``"General Study"``."""
        return " ".join(word.capitalize() for word in self.key.split("-"))


@functools.lru_cache(maxsize=16)
def copied_modules(sop_class_uid: str) -> tuple[CopiedModule, ...]:
    """The modules (or parts of modules) highdicom copies from a source image of this SOP class.

    A SOP class highdicom does not know is read as CT Image Storage (the node segments CT).
    """
    iods = get_sop_class_iod_map()
    iod = iods.get(sop_class_uid) or iods[CTImageStorage]
    modules = []
    for module in get_iod_module_map()[iod]:
        key = module["key"]
        if module["ie"] in COPIED_IES or key in COPIED_MODULES:
            modules.append(CopiedModule(key, module["usage"] == "M", _tree_level(construct_module_tree(key))))
        elif key in COPIED_ATTRIBUTES:
            attributes = _tree_level(construct_module_tree(key))
            modules.append(CopiedModule(key, False, {tag: attribute for tag, attribute in attributes.items()
                                                     if attribute.keyword in COPIED_ATTRIBUTES[key]}))
    return tuple(modules)


def _tree_level(node: dict[str, Any]) -> dict[BaseTag, CopiedAttribute]:
    """One level of highdicom's module tree as :class:`CopiedAttribute` objects by tag."""
    level = {}
    for keyword, child in node.get("attributes", {}).items():
        tag = tag_for_keyword(keyword)
        if tag is not None:
            level[Tag(tag)] = CopiedAttribute(keyword, Tag(tag), child["type"], _tree_level(child))
    return level


_CODE_MEANING = Tag("CodeMeaning")
_LONG_CODE_VALUE = Tag("LongCodeValue")


class _Dropped(Exception):
    """A sequence item or an optional module cannot be kept; the message says why."""


def _repair_header(header: pydicom.Dataset) -> tuple[pydicom.Dataset, list[str]]:
    """One repaired copy of ``header`` and its findings."""
    copy = pydicom.Dataset()
    for element in header:
        copy.add(element)
    if hasattr(header, "file_meta"):
        copy.file_meta = header.file_meta
    findings: list[str] = []
    _repair_character_set(copy, findings)
    for module in copied_modules(str(header.get("SOPClassUID", CTImageStorage))):
        present = copy.keys() & module.attributes.keys()
        if not module.mandatory and not present:
            continue
        module_findings: list[str] = []
        try:
            repaired = _repair_level(copy, module.attributes, "", module_findings, module.mandatory)
        except _Dropped as why:
            for tag in present:
                del copy[tag]
            findings.append(f"{module.name} module dropped: {why}")
            continue
        for tag in present - repaired.keys():
            del copy[tag]
        for element in repaired:
            copy[element.tag] = element
        findings.extend(module_findings)
    return copy, findings


def _repair_character_set(copy: pydicom.Dataset, findings: list[str]) -> None:
    """A character set highdicom or pydicom refuses becomes ISO_IR 192: the text values are written as UTF-8."""
    if not copy.get("SpecificCharacterSet"):
        return
    element = copy["SpecificCharacterSet"]
    terms = list(element.value) if element.VM > 1 else [element.value]
    try:
        _check_specific_character_set(terms if len(terms) > 1 else terms[0])
        accepted = all(term in python_encoding for term in terms)
    except (ValueError, TypeError):
        accepted = False
    if not accepted:
        copy.SpecificCharacterSet = UTF8
        findings.append(f"SpecificCharacterSet {element.tag} is not a character set highdicom accepts: replaced by "
                        f"{UTF8} (the copied text is written as UTF-8)")


def _repair_level(dataset: pydicom.Dataset, attributes: dict[BaseTag, CopiedAttribute], where: str,
                  findings: list[str], keep_type1: bool) -> pydicom.Dataset:
    """A repaired copy of the attributes of ``dataset`` described by ``attributes`` (one module-tree level).

    ``where`` is empty at the root of a module (only the module's attributes are copied) and
    names the sequence item otherwise (every attribute of an item is copied: the ones the tree
    does not list are checked as Type 3, and removed when retired). At the root of a mandatory
    module (``keep_type1``) an unrepairable Type 1 attribute is kept and reported; anywhere else
    it raises :class:`_Dropped`.
    """
    is_code = bool(where) and _CODE_MEANING in attributes
    if is_code:
        dataset = _move_long_code_value(dataset, where, findings)
    present = dataset.keys()
    repaired = pydicom.Dataset()
    for tag in sorted(attributes.keys() - present):
        attribute = attributes[tag]
        if attribute.type in _TYPE_1:
            if not keep_type1:
                raise _Dropped(f"lacks {attribute.label}")
            findings.append(f"{_label(where, attribute.label)} is missing (Type 1); the objects we write lack it too")
        elif attribute.type == AttributeTypeValues.REQUIRED_EMPTY_IF_UNKNOWN:
            vr = dictionary_VR(tag)
            repaired.add(DataElement(tag, vr, [] if vr == "SQ" else None))
            findings.append(f"{_label(where, attribute.label)} is missing (Type 2): added empty")
    for tag in sorted(present if where else present & attributes.keys()):
        element = dataset[tag]
        attribute = attributes.get(tag)
        if attribute is None:
            if not tag.is_private and _is_retired(tag):
                findings.append(f"{_label(where, _element_label(element))} is retired: removed")
                continue
            attribute = CopiedAttribute(element.keyword, tag, AttributeTypeValues.OPTIONAL, {})
        kept = _repair_element(element, attribute, where, findings, keep_type1)
        if kept is not None:
            repaired.add(kept)
    if is_code:
        if not any(repaired.get(keyword) for keyword in _CODE_VALUES):
            raise _Dropped("it has no CodeValue, LongCodeValue or URNCodeValue")
        if (repaired.get("CodeValue") or repaired.get("LongCodeValue")) and not repaired.get("CodingSchemeDesignator"):
            raise _Dropped("its code has no CodingSchemeDesignator")
    return repaired


def _move_long_code_value(item: pydicom.Dataset, where: str, findings: list[str]) -> pydicom.Dataset:
    """A code item whose CodeValue exceeds SH's 16 characters, with that code in LongCodeValue instead."""
    code_value = str(item.get("CodeValue") or "")
    if len(code_value) <= MAX_VALUE_LEN["SH"] or _LONG_CODE_VALUE in item:
        return item
    moved = pydicom.Dataset()
    for element in item:
        if element.keyword != "CodeValue":
            moved.add(element)
    moved.LongCodeValue = code_value
    findings.append(f"{_label(where, 'CodeValue (0008,0100)')} is longer than 16 characters: moved to "
                    "LongCodeValue (0008,0119)")
    return moved


def _is_retired(tag: BaseTag) -> bool:
    try:
        return dictionary_is_retired(tag)
    except KeyError:  # not in the dictionary: not known as retired
        return False


def _label(where: str, name: str) -> str:
    """``name`` after the item it lies in."""
    return f"{where} > {name}" if where else name


def _element_label(element: DataElement) -> str:
    return f"{element.keyword} {element.tag}" if element.keyword else str(element.tag)


def _repair_element(element: DataElement, attribute: CopiedAttribute, where: str, findings: list[str],
                    keep_type1: bool) -> DataElement | None:
    """The element to keep (itself, repaired or emptied), or None when it is removed."""
    label = _label(where, _element_label(element))
    if element.VR == "SQ":
        return _repair_sequence(element, attribute, label, findings, keep_type1)
    if element.is_empty and attribute.type in _MUST_HAVE_VALUE:
        return _unrepairable(element, label, "is empty", attribute.type, findings, keep_type1)
    problem, value, repair = _check_element(element)
    if problem is None:
        return element
    if repair is not None:
        findings.append(f"{label} {problem}: {repair}")
        return DataElement(element.tag, element.VR, value)
    return _unrepairable(element, label, problem, attribute.type, findings, keep_type1)


def _repair_sequence(element: DataElement, attribute: CopiedAttribute, label: str, findings: list[str],
                     keep_type1: bool) -> DataElement | None:
    """The sequence without its incomplete items, or what its type allows when none is left."""
    items = list(element.value or [])
    kept = []
    for position, item in enumerate(items, start=1):
        item_findings: list[str] = []
        try:
            kept.append(_repair_level(item, attribute.item, f"{label} item {position}", item_findings, False))
        except _Dropped as why:
            findings.append(f"{label} item {position} dropped: {why}")
            continue
        findings.extend(item_findings)
    if kept:
        return DataElement(element.tag, "SQ", kept)
    if items:
        return _unrepairable(element, label, "has no valid item left", attribute.type, findings, keep_type1)
    if attribute.type in _TYPE_1:
        return _unrepairable(element, label, "is empty", attribute.type, findings, keep_type1)
    return element


def _unrepairable(element: DataElement, label: str, problem: str, type_: AttributeTypeValues,
                  findings: list[str], keep_type1: bool) -> DataElement | None:
    """What the attribute's type allows for a value that cannot be repaired."""
    if type_ in _TYPE_1:
        if not keep_type1:
            raise _Dropped(f"{label.rsplit(' > ', 1)[-1]} {problem}")
        findings.append(f"{label} {problem} (Type 1): kept, it identifies what our objects share with the "
                        "source; they inherit this defect")
        return element
    if element.keyword in NEVER_REMOVED:
        findings.append(f"{label} {problem}: kept, {NEVER_REMOVED[element.keyword]}; the objects we write inherit "
                        "this defect")
        return element
    if type_ in _TYPE_2:
        findings.append(f"{label} {problem}: emptied (Type {type_.value})")
        return DataElement(element.tag, element.VR, [] if element.VR == "SQ" else None)
    findings.append(f"{label} {problem}: removed (Type {type_.value})")
    return None


def _check_element(element: DataElement) -> tuple[str | None, Any, str | None]:
    """``(problem, repaired value, what the repair did)``: all None when the element is valid,
    the last two None when it cannot be repaired for certain."""
    if element.VR not in _STRING_VRS or element.is_empty:
        return None, None, None
    values = [str(value) for value in (element.value if element.VM > 1 else [element.value])]
    if not _multiplicity_allowed(element.tag, len(values)):
        return f"has {len(values)} values where its VM is {dictionary_VM(element.tag)}", None, None
    repaired_values, problems, repairs = [], [], []
    for value in values:
        problem, repaired, repair = _check_value(element.VR, element.keyword, value)
        if problem is not None and repaired is None:
            return problem, None, None
        repaired_values.append(value if problem is None else repaired)
        if problem is not None and problem not in problems:
            problems.append(problem)
            repairs.append(repair)
    if not problems:
        return None, None, None
    value = repaired_values[0] if len(repaired_values) == 1 else repaired_values
    return " and ".join(problems), value, "; ".join(dict.fromkeys(repairs))


def _multiplicity_allowed(tag: BaseTag, count: int) -> bool:
    """``count`` values fit the data dictionary's VM of ``tag`` (an unknown tag allows any)."""
    try:
        spec = dictionary_VM(tag)
    except KeyError:
        return True
    low, _, high = spec.partition("-")
    if not low.isdigit():
        return True
    if not high:
        return count == int(low)
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return count >= int(low) and count % step == 0
    return int(low) <= count <= int(high)


def _check_value(vr: str, keyword: str, value: str) -> tuple[str | None, str | None, str | None]:
    """One value of a string VR: ``(problem, repaired, repair)``, all None when it is valid."""
    if vr in _TEXT_VRS:
        problem = _text_problem(vr, value)
        return (None, None, None) if problem is None else _repair_text(vr, keyword, value, problem)
    problem = _value_problem(vr, keyword, value)
    if problem is None:
        return None, None, None
    repaired, repair = _repair_value(vr, keyword, value)
    if repaired is None or _value_problem(vr, keyword, repaired) is not None:
        return problem, None, None
    return problem, repaired, repair


def _value_problem(vr: str, keyword: str, value: str) -> str | None:
    """Why a value of a non-text string VR is invalid, or None."""
    if vr not in VALIDATORS or not VALIDATORS[vr](vr, value)[0]:
        return f"is not a valid {vr} value" if vr in VALIDATORS else None
    if vr == "IS" and not _IS_RANGE[0] <= int(value) <= _IS_RANGE[1]:
        return "is out of the IS range"
    if keyword in ENUMERATED_VALUES and value not in ENUMERATED_VALUES[keyword]:
        return "is not one of its enumerated values"
    return None


def _repair_value(vr: str, keyword: str, value: str) -> tuple[str | None, str | None]:
    """A certain repair of a non-text value, or ``(None, None)``."""
    text = value.strip()
    if vr == "DA" and (match := _SEPARATED_DA.match(text)):
        return "".join(match.groups()), "separators removed (YYYY.MM.DD written as YYYYMMDD)"
    if vr == "TM" and (match := _SEPARATED_TM.match(text)):
        hours, minutes, seconds, fraction = match.groups()
        return f"{hours}{minutes}{seconds or ''}{(fraction or '')[:7]}", "separators removed (HH:MM:SS written as HHMMSS)"
    if vr == "TM" and (match := _LONG_FRACTION_TM.match(text)):
        return f"{match.group(1)}.{match.group(2)[:6]}", "fraction truncated to 6 digits"
    if vr == "DT" and (match := _ISO_DT.match(text)):
        year, month, day, hours, minutes, seconds, fraction, offset_hours, offset_minutes = match.groups()
        offset = f"{offset_hours}{offset_minutes}" if offset_hours else ""
        return (f"{year}{month}{day}{hours or ''}{minutes or ''}{seconds or ''}{fraction or ''}{offset}",
                "separators removed (ISO 8601 written as YYYYMMDDHHMMSS)")
    if vr == "CS" and text.upper() != text:
        return text.upper(), "upper-cased"
    if vr == "CS" and text.isdigit() and text.zfill(2) in ENUMERATED_VALUES.get(keyword, ()):
        return text.zfill(2), "zero-padded"
    if vr == "AS" and (match := _LOOSE_AS.match(text)):
        return f"{int(match.group(1)):03d}{match.group(2).upper()}", "written as nnnX"
    if vr in ("IS", "DS"):
        try:
            number = float(text)
        except ValueError:
            return None, None
        if not math.isfinite(number):
            return None, None
        if vr == "IS" and number.is_integer():
            return str(int(number)), "written as an integer"
        if vr == "DS":
            return format_number_as_ds(number), "rewritten in at most 16 characters"
    return None, None


def _text_problem(vr: str, value: str) -> str | None:
    """Why a text value (SH, LO, ST, LT, UC, UT, PN) is invalid, or None."""
    control = _MULTILINE_CONTROL if vr in _MULTILINE_VRS else _SINGLE_LINE_CONTROL
    if control.search(value):
        return "holds control characters"
    if vr == "PN":
        groups = value.split("=")
        if len(groups) > 3:
            return "has more than 3 component groups"
        if any(group.count("^") > 4 for group in groups):
            return "has more than 5 name components"
        if any(len(group) > 64 for group in groups):
            return "has a component group longer than 64 characters"
        return None
    limit = MAX_VALUE_LEN.get(vr)
    if limit is not None and len(value) > limit:
        return f"is longer than {limit} characters ({vr})"
    return None


def _repair_text(vr: str, keyword: str, value: str, problem: str) -> tuple[str, str | None, str | None]:
    """Strip trailing padding and empty name components; truncate descriptive text."""
    control = _MULTILINE_CONTROL if vr in _MULTILINE_VRS else _SINGLE_LINE_CONTROL
    repaired = value
    while repaired and (repaired[-1] == " " or control.match(repaired[-1])):
        repaired = repaired[:-1]
    repairs = ["trailing padding removed"] if repaired != value else []
    if vr == "PN":
        groups = [group.rstrip("^ ") for group in repaired.split("=")]
        while len(groups) > 1 and not groups[-1]:
            groups.pop()
        if "=".join(groups) != repaired:
            repaired = "=".join(groups)
            repairs.append("trailing empty name components removed")
    limit = MAX_VALUE_LEN.get(vr)
    if limit is not None and len(repaired) > limit and (vr in _MULTILINE_VRS or _DESCRIPTIVE.search(keyword)):
        repaired = repaired[:limit].rstrip()
        repairs.append(f"truncated to {limit} characters")
    if _text_problem(vr, repaired) is not None:
        return problem, None, None
    return problem, repaired, "; ".join(repairs)
