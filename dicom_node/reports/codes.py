"""The coded concepts of the node's SEG and SRs.

Standard codes come from pydicom's concept dictionary (generated from DICOM PS3.16): SNOMED CT
(``SCT``), DICOM (``DCM``), LOINC (``LN``); units are UCUM. Concepts DICOM has no code for
(number of loculi, slice indices, deep neck space as free text, the similar-case retrieval
concepts) use the private coding scheme ``99ABSCESS``, declared in every document's Coding
Scheme Identification Sequence (:data:`CODING_SCHEME`); :data:`PRIVATE_CODES` lists them all.
"""

from __future__ import annotations

from collections.abc import Mapping

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# --- Standard codes (PS3.16) ---------------------------------------------------------------

ABSCESS = codes.SCT.Abscess  # 44132006
"""Abscess, morphologically abnormal structure (CID 7151/7159/7194; SNOMED 128477000 is the
disorder concept, which DICOM does not list for findings or segmented property types)."""
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
NECK = codes.SCT.Neck  # 45048000, CID 4 / 7151
LATERALITY: Mapping[str, Code] = {
    "left": codes.SCT.Left,  # 7771000, CID 244
    "right": codes.SCT.Right,  # 24028007, CID 244
    "midline": codes.SCT.Median,  # 373099004, CID 244
}
"""The finding site's laterality (DICOM CID 244) for a lesion's side."""
VOLUME = codes.SCT.Volume  # 118565006, CID 7469
LONG_AXIS = codes.SCT.LongAxis  # 103339001, CID 7469/7470: longest in-plane diameter
MAXIMUM = codes.SCT.Maximum  # 56851009, CID 7464
ATTENUATION_COEFFICIENT = codes.DCM.AttenuationCoefficient  # 112031, CID 7469 (HU)
MEAN = codes.SCT.Mean  # 373098007, CID 7464
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # 386136009, CID 7464
ABSENT = codes.SCT.Absent  # 272519000, CID 240 Present-Absent
COMMENT = codes.DCM.Comment  # 121106
CT_UNSPECIFIED_BODY_REGION = codes.LN.CTUnspecifiedBodyRegion  # 25045-6, CID 100
STUDY_INSTANCE_UID = codes.DCM.StudyInstanceUID  # 110180
SERIES_INSTANCE_UID = codes.DCM.SeriesInstanceUID  # 112002
STUDY_DATE = codes.DCM.StudyDate  # 111060
PROCEDURE_DESCRIPTION = codes.DCM.ProcedureDescription  # 121065
ACCESSION_NUMBER = codes.DCM.AccessionNumber  # 121022
SUBJECT_ID = codes.DCM.SubjectID  # 121030
TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier  # 112039

UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_LOCULI = Code("{loculi}", "UCUM", "loculi")  # UCUM annotation: a dimensionless count
UNIT_NONE = Code("1", "UCUM", "no units")  # CID 7181

# --- Private codes (99ABSCESS) --------------------------------------------------------------

PRIVATE_CODING_SCHEME = "99ABSCESS"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_CODING_SCHEME, meaning)


NUMBER_OF_LOCULI = _private("LOCULI", "Number of loculi")
FIRST_SLICE_INDEX = _private("FIRSTSLICE", "First slice index (0-based, series order)")
LAST_SLICE_INDEX = _private("LASTSLICE", "Last slice index (0-based, series order)")
LESION_CORE = _private("CORE", "Lesion core (boundary shell excluded)")
DEEP_NECK_SPACE = _private("NECKSPACE", "Deep neck space")
PARAPHARYNGEAL_SPACE = _private("PPS", "Parapharyngeal space")
RETROPHARYNGEAL_SPACE = _private("RPS", "Retropharyngeal space")
PERITONSILLAR_SPACE = _private("PTS", "Peritonsillar space")
CAROTID_SPACE = _private("CS", "Carotid space")
OTHER_NECK_REGION = _private("OTHERNECK", "Neck, outside the named deep neck spaces")
CANDIDATES_REMOVED = _private("RULEGROUP", "Abscess candidates removed by plausibility rules")
RULE_CODES: Mapping[str, Code] = {
    "neck_soft_tissue": _private("RULESOFT", "Candidates removed: not in the neck band's soft tissue"),
    "min_volume": _private("RULEVOL", "Candidates removed: below the minimum volume"),
    "core_attenuation": _private("RULECORE", "Candidates removed: core attenuation not fluid"),
    "rim_enhancement": _private("RULERIM", "Candidates removed: no enhancing rim"),
}
"""One count per plausibility rule (:data:`models.plausibility.RULES`) in the measurement SR."""
UNIT_CANDIDATES = Code("{candidates}", "UCUM", "candidates")
SIMILAR_CASES = _private("SIMCASES", "Similar cases")
SIMILAR_CASE = _private("SIMCASE", "Similar case")
QUERY_PARAMETERS = _private("QUERY", "Similar-case query")
RETRIEVAL_MODE = _private("MODE", "Retrieval mode")
RESULTS_REQUESTED = _private("K", "Number of results requested")
QUERY_FILTERS = _private("FILTERS", "Query filters")
REQUESTED_BY = _private("REQAET", "Requesting AE title")
CASES_FOUND = _private("NFOUND", "Number of similar cases found")
RANK = _private("RANK", "Rank")
SIMILARITY_SCORE = _private("SCORE", "Similarity score")
SLICE_PAIR = _private("SLICEPAIR", "Best-matching slice pair")
QUERY_IMAGE = _private("QIMAGE", "Query image")
QUERY_SLICE_INDEX = _private("QSLICE", "Query slice index (0-based)")
MATCHED_IMAGE = _private("MIMAGE", "Matched image")
MATCHED_SOP_INSTANCE_UID = _private("MSOPUID", "Matched SOP Instance UID")
MATCHED_SLICE_INDEX = _private("MSLICE", "Matched slice index (0-based)")
SLICE_SIMILARITY = _private("SLICESIM", "Slice similarity")
MATCHED_LESION = _private("MLESION", "Matched lesion")

DEEP_NECK_SPACE_SITES: Mapping[str, Code] = {
    "submandibular": codes.SCT.SubmandibularArea,  # 5713008, CID 4 / 7151
    "parapharyngeal": PARAPHARYNGEAL_SPACE,
    "retropharyngeal": RETROPHARYNGEAL_SPACE,
    "peritonsillar": PERITONSILLAR_SPACE,
    "carotid": CAROTID_SPACE,
    "other": OTHER_NECK_REGION,
}
"""The finding site of each deep neck space of :data:`models.anatomy.SPACES` (lower-case keys):
SNOMED CT where PS3.16 lists the concept (submandibular area, 5713008), the declared private
``99ABSCESS`` codes otherwise (DICOM lists no parapharyngeal, retropharyngeal, peritonsillar
or carotid *space* concept; none is invented here)."""

PRIVATE_CODES: tuple[Code, ...] = (
    NUMBER_OF_LOCULI,
    FIRST_SLICE_INDEX,
    LAST_SLICE_INDEX,
    LESION_CORE,
    DEEP_NECK_SPACE,
    PARAPHARYNGEAL_SPACE,
    RETROPHARYNGEAL_SPACE,
    PERITONSILLAR_SPACE,
    CAROTID_SPACE,
    OTHER_NECK_REGION,
    CANDIDATES_REMOVED,
    *RULE_CODES.values(),
    SIMILAR_CASES,
    SIMILAR_CASE,
    QUERY_PARAMETERS,
    RETRIEVAL_MODE,
    RESULTS_REQUESTED,
    QUERY_FILTERS,
    REQUESTED_BY,
    CASES_FOUND,
    RANK,
    SIMILARITY_SCORE,
    SLICE_PAIR,
    QUERY_IMAGE,
    QUERY_SLICE_INDEX,
    MATCHED_IMAGE,
    MATCHED_SOP_INSTANCE_UID,
    MATCHED_SLICE_INDEX,
    SLICE_SIMILARITY,
    MATCHED_LESION,
)
"""Every concept of the ``99ABSCESS`` scheme (DICOM has no code for these)."""

CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_CODING_SCHEME,
    name="abscess-node local concepts",
    version="1",
    responsible_organization="abscess-node project",
)
"""The declaration of ``99ABSCESS`` every SR carries."""
