"""Orthanc's ordinary C-FIND answers, rebuilt from its REST API (pure functions, testable).

Registering a find callback in orthanc-python replaces Orthanc's whole C-FIND SCP, so the
plugin answers every query that is not a similar-case query the way Orthanc 1.10's own
``OrthancFindRequestHandler`` does:

* matching: each key with a non-empty value is a constraint handed to Orthanc's own matcher
  (``/tools/find``: single values, ``*``/``?`` wildcards, ``\\``-separated lists, date/time
  ranges, ModalitiesInStudy against the series' Modality); case-sensitive, except person names
  unless ``CaseSensitivePN`` is true (a second ``/tools/find`` with only the PN keys);
  QueryRetrieveLevel, SpecificCharacterSet and group lengths are never constraints;
* answers: RetrieveAETitle (Orthanc's ``DicomAet``), QueryRetrieveLevel as asked, then every
  key of the query (SpecificCharacterSet aside) with the resource's value or empty; values come
  from the main DICOM tags of the resource and its parents, or, when the query names a tag
  that is not a main DICOM tag, from one instance of the resource; the computed keys
  (ModalitiesInStudy, SOPClassesInStudy, NumberOfPatient/Study/SeriesRelated*) are counted;
* ``LimitFindResults`` / ``LimitFindInstances`` cut the answers and mark them incomplete.

Orthanc's own filter (``DicomAlwaysAllowFind``, ``DicomModalities``) runs before any find
callback, so the rule "only known modalities may C-FIND" is kept without code here. Not
reproduced: the ``IncomingFindRequestFilter`` Lua callback and sequences as return keys
(Orthanc 1.10 copies them from the stored JSON; here they come back empty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

Rest = Callable[..., Any]
"""``get(path) -> JSON`` or ``post(path, body) -> JSON`` (in the plugin: orthanc.RestApiGet/Post + json)."""

LEVELS = {"PATIENT": "Patient", "STUDY": "Study", "SERIES": "Series", "IMAGE": "Instance", "INSTANCE": "Instance"}
PARENT = {"Instance": "Series", "Series": "Study", "Study": "Patient"}
QUERY_RETRIEVE_LEVEL = "0008,0052"
SPECIFIC_CHARACTER_SET = "0008,0005"
RETRIEVE_AE_TITLE = "0008,0054"
MODALITIES_IN_STUDY = "0008,0061"
SOP_CLASSES_IN_STUDY = "0008,0062"
PATIENT_COUNTERS = {"0020,1200": "studies", "0020,1202": "series", "0020,1204": "instances"}
STUDY_SERIES, STUDY_INSTANCES, SERIES_INSTANCES = "0020,1206", "0020,1208", "0020,1209"
COMPUTED = {MODALITIES_IN_STUDY, SOP_CLASSES_IN_STUDY, *PATIENT_COUNTERS, STUDY_SERIES, STUDY_INSTANCES, SERIES_INSTANCES}

# Orthanc 1.10's main DICOM tags per level (the ones its database answers without the files).
MAIN_TAGS = {
    "Patient": {"0010,0010", "0010,0020", "0010,0030", "0010,0040", "0010,1000"},
    "Study": {"0008,0020", "0008,0030", "0020,0010", "0008,1030", "0008,0050", "0020,000d", "0032,1060",
              "0008,0080", "0032,1032", "0008,0090"},
    "Series": {"0008,0021", "0008,0031", "0008,0060", "0008,0070", "0008,1010", "0008,103e", "0018,0015",
               "0018,0024", "0018,1030", "0020,0011", "0018,1090", "0020,1002", "0020,0105", "0054,0081",
               "0054,0101", "0020,000e", "0020,0037", "0054,1000", "0008,1070", "0040,0254", "0018,1400",
               "0018,0010"},
    "Instance": {"0008,0012", "0008,0013", "0020,0012", "0054,1330", "0020,0013", "0028,0008", "0020,0100",
                 "0008,0018", "0020,0032", "0020,4000", "0020,0037"},
}


class FindError(ValueError):
    """A query Orthanc itself would refuse (no or unknown QueryRetrieveLevel)."""


@dataclasses.dataclass(frozen=True)
class FindQuery:
    """A C-FIND identifier as Orthanc hands it to a find callback.

    Attributes:
        level: Orthanc's level name (Patient, Study, Series, Instance).
        level_value: QueryRetrieveLevel as the client sent it (echoed in the answers).
        keys: every key of the identifier, in order: (``gggg,eeee`` lower-case hex, value).
    """

    level: str
    level_value: str
    keys: tuple[tuple[str, str], ...]

    @property
    def constraints(self) -> dict[str, str]:
        """Keys with a value, except those Orthanc never matches on."""
        return {tag: value for tag, value in self.keys
                if value and tag not in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET) and not tag.endswith(",0000")}


def tag_key(group: int, element: int) -> str:
    """Orthanc's tag notation, e.g. ``0010,0010``."""
    return f"{group:04x},{element:04x}"


def parse_query(tags: Sequence[tuple[int, int, str]]) -> FindQuery:
    """Build the query from ``(group, element, value)`` triples.

    Raises:
        FindError: QueryRetrieveLevel missing or not PATIENT/STUDY/SERIES/IMAGE.
    """
    keys = tuple((tag_key(group, element), (value or "").strip()) for group, element, value in tags)
    level_value = dict(keys).get(QUERY_RETRIEVE_LEVEL)
    if level_value is None:
        raise FindError("C-FIND request without the tag 0008,0052 (QueryRetrieveLevel)")
    level = LEVELS.get(level_value.strip().upper())
    if level is None:
        raise FindError(f"C-FIND at unsupported level {level_value!r}")
    return FindQuery(level, level_value, keys)


def is_person_name(tag: str) -> bool:
    """Whether the DICOM dictionary gives the tag the PN value representation."""
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(int(tag.replace(",", ""), 16)) == "PN"
    except KeyError:  # private or unknown: not a person name
        return False


def _ids(found: list[Any]) -> list[str]:
    return [item if isinstance(item, str) else item["ID"] for item in found]


def matching_resources(query: FindQuery, post: Rest, case_sensitive_pn: bool = False) -> list[str]:
    """Orthanc ids of the resources matching the query (Orthanc's own matcher, in its order)."""
    constraints = query.constraints
    names = {tag: value for tag, value in constraints.items() if is_person_name(tag)}
    others = {tag: value for tag, value in constraints.items() if not is_person_name(tag)}
    if case_sensitive_pn:
        others, names = constraints, {}
    found = _ids(post("/tools/find", {"Level": query.level, "Query": others, "CaseSensitive": True}))
    if names:
        allowed = set(_ids(post("/tools/find", {"Level": query.level, "Query": names, "CaseSensitive": False})))
        found = [resource for resource in found if resource in allowed]
    return found


def _plural(level: str) -> str:
    return {"Patient": "patients", "Study": "studies", "Series": "series", "Instance": "instances"}[level]


def _tag_of_name(name: str) -> str | None:
    """``gggg,eeee`` of a keyword as Orthanc's REST API names main DICOM tags (None if unknown)."""
    from pydicom.datadict import tag_for_keyword

    if "," in name:
        return name.lower()
    tag = tag_for_keyword(name)
    return None if tag is None else tag_key(tag >> 16, tag & 0xFFFF)


class _Resources:
    """Cached REST reads of one C-FIND."""

    def __init__(self, get: Rest) -> None:
        self.get = get
        self.cache: dict[str, Any] = {}

    def read(self, path: str) -> Any:
        if path not in self.cache:
            self.cache[path] = self.get(path)
        return self.cache[path]

    def main_tags(self, level: str, resource: str) -> dict[str, str]:
        """Main DICOM tags of the resource and all its parents, as ``gggg,eeee`` -> value."""
        values: dict[str, str] = {}
        while True:
            body = self.read(f"/{_plural(level)}/{resource}")
            for section in ("MainDicomTags", "PatientMainDicomTags"):
                for name, value in (body.get(section) or {}).items():
                    tag = _tag_of_name(name)
                    if tag:
                        values.setdefault(tag, value if isinstance(value, str) else "")
            if level not in PARENT:
                return values
            parent_key = "Parent" + PARENT[level]
            resource, level = body[parent_key], PARENT[level]

    def children(self, level: str, resource: str) -> list[str]:
        child = {"Patient": "studies", "Study": "series", "Series": "instances"}[level]
        return [item["ID"] for item in self.read(f"/{_plural(level)}/{resource}/{child}")]

    def instance_tags(self, level: str, resource: str) -> dict[str, str]:
        """All string tags of one instance of the resource (Orthanc's stored DICOM-as-JSON)."""
        instance = resource
        while level != "Instance":
            children = self.children(level, instance)
            if not children:
                return {}
            instance, level = children[0], {"Patient": "Study", "Study": "Series", "Series": "Instance"}[level]
        tags = self.read(f"/instances/{instance}/tags")
        return {tag.lower(): entry["Value"] for tag, entry in tags.items()
                if isinstance(entry, dict) and entry.get("Type") == "String"}


def _counters(query: FindQuery, resources: _Resources, resource: str) -> dict[str, str]:
    asked = {tag for tag, _ in query.keys}
    counts: dict[str, str] = {}
    if query.level == "Patient" and asked & set(PATIENT_COUNTERS):
        studies = resources.children("Patient", resource)
        series = [s for study in studies for s in resources.children("Study", study)]
        instances = [i for s in series for i in resources.children("Series", s)]
        for tag, kind in PATIENT_COUNTERS.items():
            if tag in asked:
                counts[tag] = str(len({"studies": studies, "series": series, "instances": instances}[kind]))
    elif query.level == "Study" and asked & {STUDY_SERIES, STUDY_INSTANCES, MODALITIES_IN_STUDY, SOP_CLASSES_IN_STUDY}:
        series = resources.children("Study", resource)
        if STUDY_SERIES in asked:
            counts[STUDY_SERIES] = str(len(series))
        if MODALITIES_IN_STUDY in asked:
            modalities = {resources.main_tags("Series", s).get("0008,0060", "") for s in series} - {""}
            counts[MODALITIES_IN_STUDY] = "\\".join(sorted(modalities))
        if asked & {STUDY_INSTANCES, SOP_CLASSES_IN_STUDY}:
            instances = [i for s in series for i in resources.children("Series", s)]
            if STUDY_INSTANCES in asked:
                counts[STUDY_INSTANCES] = str(len(instances))
            if SOP_CLASSES_IN_STUDY in asked:
                classes = {resources.read(f"/instances/{i}/metadata/SopClassUid") for i in instances}
                counts[SOP_CLASSES_IN_STUDY] = "\\".join(sorted(c for c in classes if isinstance(c, str) and c))
    elif query.level == "Series" and SERIES_INSTANCES in asked:
        counts[SERIES_INSTANCES] = str(len(resources.children("Series", resource)))
    return counts


def _needs_instance(query: FindQuery) -> bool:
    main = set().union(*MAIN_TAGS.values())
    return any(tag not in main and tag not in COMPUTED and tag not in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET)
               and not tag.endswith(",0000") for tag, _ in query.keys)


def build_answer(query: FindQuery, values: dict[str, str], counters: dict[str, str], retrieve_aet: str) -> dict[str, str]:
    """One answer as ``gggg,eeee`` -> value, with exactly the keys Orthanc's C-FIND returns."""
    answer = {RETRIEVE_AE_TITLE: retrieve_aet}
    for tag, _ in query.keys:
        if tag == QUERY_RETRIEVE_LEVEL:
            answer[tag] = query.level_value
        elif tag != SPECIFIC_CHARACTER_SET:
            answer[tag] = values.get(tag, "")
    answer.update(counters)
    return answer


@dataclasses.dataclass
class FindResult:
    """Answers of one ordinary C-FIND and whether the limit cut them (then incomplete)."""

    answers: list[dict[str, str]]
    complete: bool


def ordinary_find(tags: Sequence[tuple[int, int, str]], get: Rest, post: Rest, retrieve_aet: str,
                  case_sensitive_pn: bool = False, limit_results: int = 0, limit_instances: int = 0) -> FindResult:
    """Answer a C-FIND as Orthanc 1.10's own SCP would.

    Args:
        tags: the identifier as ``(group, element, value)`` triples.
        get, post: Orthanc REST access returning parsed JSON.
        retrieve_aet: Orthanc's ``DicomAet``.
        case_sensitive_pn: Orthanc's ``CaseSensitivePN``.
        limit_results, limit_instances: Orthanc's ``LimitFindResults`` / ``LimitFindInstances`` (0: none).

    Raises:
        FindError: no or unknown QueryRetrieveLevel (Orthanc answers a failure then too).
    """
    query = parse_query(tags)
    found = matching_resources(query, post, case_sensitive_pn)
    limit = limit_instances if query.level == "Instance" else limit_results
    complete = not limit or len(found) <= limit
    if limit:
        found = found[:limit]
    resources = _Resources(get)
    from_instance = _needs_instance(query)
    answers = []
    for resource in found:
        values = (resources.instance_tags(query.level, resource) if from_instance
                  else resources.main_tags(query.level, resource))
        answers.append(build_answer(query, values, _counters(query, resources, resource), retrieve_aet))
    return FindResult(answers, complete)
