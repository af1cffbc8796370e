"""Similar-case queries: one service behind C-FIND (Orthanc's and a standalone AE) and REST.

``query`` (the query, its typed answers, the index lock) -> ``request`` (C-FIND identifier,
statuses, private block) -> ``service`` (the handler every front end calls) -> ``on_demand``
(the SR an answer points at); front ends: ``dicom_ae`` (pynetdicom), ``rest`` (REST twin) and
``relay`` (what the Orthanc plugin calls; standard library only, so the plugin stays light).
"""
