"""Script named by ``PythonScript`` in orthanc.json: puts the checkout and its venv on sys.path.

Orthanc's embedded interpreter (Debian's Python 3.11) does not know the project venv; the plugin
itself only imports pure-Python modules (config, job store, REST handlers, supervisor), all heavy
work runs in worker processes started with the venv's own interpreter.
"""

import glob
import os
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)
sys.path.extend(sorted(glob.glob(os.path.join(CHECKOUT, ".venv", "lib", "python3.*", "site-packages"))))

from orthanc_plugin.plugin import register  # noqa: E402

register()
