"""Segmentation models of abscess-node: VM-UNet, selective-scan backends, CT preprocessing,
checkpoints and the :class:`~models.segmenter.Segmenter` (the worker's entry point).

``vmunet`` (the network), ``scan`` / ``_scan_numba`` (selective-scan backends), ``preprocessing``
(HU windows, resizing), ``weights`` (checkpoints, :class:`~models.weights.AlgorithmInfo`),
``segmenter`` (probabilities + slice/ROI embeddings), ``training`` (``[train]`` extra).
Importing this package is light: torch comes with the network (``models.VMUNet`` is loaded on
first use), numba and mamba-ssm only when a scan backend that needs them runs. May import torch, MONAI and numba; never :mod:`index`,
:mod:`dicom_node` or the tooling, and knows nothing of DICOM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VMUNet"]


def __getattr__(name: str) -> Any:
    """``models.VMUNet`` on first use: importing a light module (``models.lesion_rules``) loads no torch."""
    if name == "VMUNet":
        from models.vmunet import VMUNet

        return VMUNet
    raise AttributeError(f"module 'models' has no attribute {name!r}")
