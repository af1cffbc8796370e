"""Segmentation models of abscess-node: VM-UNet, selective-scan backends, CT preprocessing,
checkpoints and the :class:`~models.segmenter.Segmenter`.

Importing this package is light: numba and mamba-ssm are imported only when a scan
backend that needs them runs.
"""

from models.vmunet import VMUNet

__all__ = ["VMUNet"]
