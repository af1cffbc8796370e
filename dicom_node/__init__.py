"""DICOM in and out, and the pipeline of one study: the node's business logic.

Config (``config``), job store (``jobs``), child processes (``supervisor``, ``worker``), the
pipeline of one study (``pipeline``: series selection and volume loading in ``series``,
SEG writing in ``seg``, SRs in ``reports``), the Orthanc REST client (``orthanc_client``),
similar-case queries (``similar``), Orthanc's ordinary C-FIND rebuilt (``ordinary_find``),
the job REST routes (``job_routes``) and the command line (``python -m dicom_node``).

May import :mod:`index` and :mod:`models`; never ``orthanc`` (the plugin's module) nor the
tooling. The modules the plugin loads in Orthanc's interpreter (config, jobs, job_routes,
ordinary_find, supervisor, similar.relay, private_files) import no heavy library.
"""

import os

# OpenMP threads (PyTorch, FAISS, the Numba scan kernels) sleep between parallel regions instead
# of spinning. On a node whose cores are shared (Orthanc, the workers, the query service, other
# software), a spinning thread that loses its core stalls every operation of its team: measured
# here, the demo study's 95 slices took 68 s to segment instead of 1.7 s at a load average of 16
# on 2 cores. Set before torch or faiss is imported (the worker and the service import this
# package first); a value the administrator set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
