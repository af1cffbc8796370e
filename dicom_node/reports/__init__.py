"""The DICOM SRs the node writes: ``measurement`` (TID 1500 per study) and ``similar_cases``.

``codes`` holds every coded concept (pydicom's dictionary where DICOM has one, the declared
private scheme ``99ABSCESS`` otherwise); ``document`` what both reports share. Builders take
typed objects (:class:`index.lesions.Lesion`, :class:`dicom_node.similar.query.SimilarCase`,
:class:`models.weights.AlgorithmInfo`), validated where they were created.
"""
