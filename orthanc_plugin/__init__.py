"""The glue inside Orthanc's embedded Python (orthanc-python 4.0): callbacks that hand work on.

``entry`` is the script ``orthanc.json`` names (puts the checkout and its venv on sys.path);
``plugin`` registers the callbacks. Every callback only forwards to :mod:`dicom_node`; nothing
here holds logic a test cannot reach without Orthanc. May import the light modules of
:mod:`dicom_node` only (import-linter keeps torch, numpy, FAISS ... out of Orthanc's process).
"""
