"""The README's configuration table, generated from the one declaration of every key.

``python -m tooling config-table`` prints it; ``tests/unit/dicom_node/test_config.py`` checks the
README holds exactly this table, so documentation and code cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dicom_node.config import CHECKOUT, KEYS, NodeConfig, SeriesRules, rules_section
from models.lesion_rules import PlausibilityRules

HEADER = "| key | default | meaning |\n|---|---|---|"


def _default(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value.relative_to(CHECKOUT)) if value.is_relative_to(CHECKOUT) else str(value)
    elif isinstance(value, (SeriesRules, PlausibilityRules)):
        value = rules_section(value)
    return json.dumps(value, default=list).replace("|", "\\|")


def config_table() -> str:
    """The Markdown table of the ``AbscessNode`` keys: name, default, meaning."""
    defaults = NodeConfig()
    rows = [f"| `{json_key}` | `{_default(getattr(defaults, key.attribute))}` | {key.description} |"
            for json_key, key in KEYS.items()]
    return "\n".join([HEADER, *rows])
