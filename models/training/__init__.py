"""Training and evaluation of the segmentation network on a site's own data (product, ``[train]`` extra).

``python -m models.training.train --data <AbscessHeNe layout>`` trains VM-UNet and writes a
checkpoint the node loads (``WeightsPath``); ``python -m models.training.evaluate`` reports
AbscessHeNe's Table I columns. ``data`` reads exactly the AbscessHeNe dataset layout.
May import the rest of :mod:`models`, torch, MONAI and the ``[train]`` extra (matplotlib, thop,
tqdm); never :mod:`dicom_node`, :mod:`index` or the tooling.
"""
