"""Glue between Orthanc's embedded Python (orthanc-python 4.0) and the node; see plugin.py."""
