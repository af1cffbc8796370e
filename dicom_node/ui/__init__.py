"""The pages the node serves itself, under ``/abscess-node/ui/`` (behind Orthanc's authentication).

* ``index.html`` — the queue dashboard: jobs by state, each job's series choice, seconds per
  stage, attempts, errors and forwards; retry / cancel / re-run; links to OHIF and Orthanc Explorer.
* ``similar.html?study=<Orthanc study id>`` — the similar-case gallery of one study.

Plain HTML, CSS and JavaScript files of this package: no build step, and nothing loaded from
outside the node (a hospital network reaches nothing else); the Content-Security-Policy sent
with every page says so to the browser as well. Their data comes from the node's JSON routes.
Loaded by the plugin inside Orthanc: standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
FILE_NAME = re.compile(r"^[a-z0-9-]+\.(html|js|css|svg)$")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
"""Sent with every page and asset: same-origin only, never framed, no referrer with UIDs in it."""


def static_file(name: str) -> tuple[bytes, str] | None:
    """The content and media type of one file of the pages (``""`` is the dashboard), or None.

    Only plain file names of this package's ``static`` folder are served (no path, no dot-dot).
    """
    name = name or INDEX
    if not FILE_NAME.match(name):
        return None
    path = STATIC / name
    if not path.is_file():
        return None
    return path.read_bytes(), MEDIA_TYPES[path.suffix]


def viewer_index(orthanc_config: Mapping[str, Any], base_directory: Path) -> bytes | None:
    """The OHIF index page that ``ServeFolders`` serves as ``/ohif/index.html`` (for ``/ohif/``, which
    ServeFolders itself answers 404), or None when the viewer is not laid out (``make viewer``)."""
    folders = (orthanc_config.get("ServeFolders") or {}).get("Folders") or {}
    folder = folders.get("/ohif")
    if not isinstance(folder, str):
        return None
    path = Path(folder) if Path(folder).is_absolute() else base_directory / folder
    index = path / "index.html"
    return index.read_bytes() if index.is_file() else None
