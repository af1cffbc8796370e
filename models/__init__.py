"""Segmentation models of abscess-node: VM-UNet, selective-scan backends, CT preprocessing,
checkpoints and the :class:`~models.segmenter.Segmenter` (the worker's entry point).

``vmunet`` (the network), ``scan`` / ``_scan_numba`` (selective-scan backends), ``preprocessing``
(HU windows, resizing), ``weights`` (checkpoints, :class:`~models.weights.AlgorithmInfo`),
``segmenter`` (probabilities + slice/ROI embeddings), ``training`` (``[train]`` extra).
Importing this package is light: numba and mamba-ssm are imported only when a scan
backend that needs them runs. May import torch, MONAI and numba; never :mod:`index`,
:mod:`dicom_node` or the tooling, and knows nothing of DICOM.
"""

from models.vmunet import VMUNet

__all__ = ["VMUNet"]
