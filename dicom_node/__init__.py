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
