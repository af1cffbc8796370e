"""Case index: lesion descriptors, FAISS HNSW + SQLite store, retrieval modes and evaluation.

No model runs and no DICOM parsing here: numpy arrays and plain Python in, results out.
"""
