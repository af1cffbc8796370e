"""Developer tooling, not part of the installed node: sample data, conversion, demo, test harness.

Used by ``make demo``, ``tests/`` and ``bench/``: registry sample data (``sample_data``),
NIfTI -> DICOM conversion (``convert``), synthetic CT fixtures (``synthetic_ct``), the demo
(``demo``, ``preview``), the Orthanc test harness (``orthanc_harness``), the dciodvfy wrapper
(``dciodvfy``), phantom abscesses in real CT (``phantoms``), retrieval cohorts and their
evaluation (``cohort``, ``retrieval_eval``) and synthetic embeddings (``synthetic_embeddings``).
May import every product package; no product package imports it (import-linter contract).
"""
