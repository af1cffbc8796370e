"""The AbscessNode section: defaults, validation messages naming the key, round trip to workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.config import CHECKOUT, KEYS, ConfigError, NodeConfig, SeriesRules, WorkerSettings
from dicom_node.private_files import read_private_file, write_private_file
from tooling.readme import config_table


def test_repository_orthanc_json_is_valid_and_documented():
    section = json.loads((CHECKOUT / "orthanc.json").read_text())["AbscessNode"]
    config = NodeConfig.from_section(section)
    assert config.similar_cases_aet == "ABSCESS_SIMILAR"
    readme = (CHECKOUT / "README.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in readme, f"README does not document AbscessNode.{key}"
    assert config_table() in readme, "the README's configuration table is stale: python -m tooling config-table"


def test_defaults():
    config = NodeConfig.from_section(None)
    assert config.enabled and config.worker_count == 1 and config.device == "auto"
    assert config.segmentation_type == "BINARY"
    assert config.series_rules == SeriesRules()
    assert config.allowed_similar_cases_aets == ()


@pytest.mark.parametrize(("section", "message"), [
    ({"Bogus": 1}, "AbscessNode.Bogus: unknown key"),
    ({"WorkerCount": "2"}, "AbscessNode.WorkerCount: expected a whole number"),
    ({"WorkerCount": -1}, "AbscessNode.WorkerCount: -1 is outside"),
    ({"Device": "tpu"}, "AbscessNode.Device: expected one of auto, cpu, cuda"),
    ({"Enabled": "yes"}, "AbscessNode.Enabled: expected true or false"),
    ({"SegmentationType": "LABELMAP"}, "AbscessNode.SegmentationType: expected one of BINARY, FRACTIONAL"),
    ({"SimilarCasesAet": "WAY_TOO_LONG_AE_TITLE"}, "AbscessNode.SimilarCasesAet"),
    ({"AllowedSimilarCasesAets": ["OK", "BAD\\AE"]}, "AbscessNode.AllowedSimilarCasesAets[1]"),
    ({"ForwardTo": "pacs"}, "AbscessNode.ForwardTo: expected a list"),
    ({"SeriesRules": {"MinSlice": 3}}, "AbscessNode.SeriesRules.MinSlice: unknown key"),
    ({"SeriesRules": {"MinSlices": 50, "MaxSlices": 10}}, "MinSlices (50) is larger than MaxSlices (10)"),
    ({"SeriesRules": {"Prefer": "newest"}}, "AbscessNode.SeriesRules.Prefer"),
    ({"Threshold": 1.5}, "AbscessNode.Threshold: 1.5 is outside"),
    ({"IndexVectorEncoding": "pq"}, "AbscessNode.IndexVectorEncoding: expected one of flat, sq8"),
])
def test_bad_values_name_the_key(section, message):
    with pytest.raises(ConfigError) as raised:
        NodeConfig.from_section(section)
    assert message in str(raised.value)


def test_relative_paths_resolve_against_the_checkout_and_case_is_normalised():
    config = NodeConfig.from_section({"WeightsPath": "w/x.pt", "Device": "CPU", "SegmentationType": "fractional",
                                      "SeriesRules": {"Modalities": ["ct"]}})
    assert config.weights_path == CHECKOUT / "w" / "x.pt"
    assert config.device == "cpu" and config.segmentation_type == "FRACTIONAL"
    assert config.series_rules.modalities == ("CT",)


def test_worker_settings_round_trip(tmp_path: Path):
    config = NodeConfig.from_section({"WorkerCount": 3, "ForwardTo": ["pacs"], "AllowedSimilarCasesAets": ["VIEWER"],
                                      "SeriesRules": {"MinSlices": 5, "ExcludeDescriptions": ["scout"]}})
    path = tmp_path / "settings.json"
    write_private_file(path, WorkerSettings(config, "http://127.0.0.1:1", "token", "worker-0").to_json())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = WorkerSettings.from_json(read_private_file(path))
    assert again.node == config and again.authorization == "token"
