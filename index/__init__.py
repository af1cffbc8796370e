"""The case index: lesion descriptors, FAISS HNSW + SQLite store, retrieval and its metrics.

``lesions`` (descriptors measured on a mask), ``records`` (what is stored per study and
slice), ``store`` (:class:`~index.store.CaseIndex`: SQLite source of truth, writes, queries),
``vectors`` (the FAISS side: files, consistency check, repair, GPU build), ``retrieval`` (the
ranking of Khun Jush et al.: hit table, late interaction, filters, mixed score) and
``metrics`` (Recall@K, mAP, P@K, localisation ratio).

No model runs and no DICOM parsing here: numpy arrays and plain Python in, results out.
May import numpy, scipy and faiss; never :mod:`models`, :mod:`dicom_node` or the tooling.
"""
