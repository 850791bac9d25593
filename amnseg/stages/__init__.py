"""The pipeline stages, one module each: a function from config + input folder to output folder.

``cam`` (classifier, CAMs), ``seeds`` (CRF seeds from CAM or AMN maps), ``amn`` (activation
manipulation network, AMN maps), ``irn`` (boundary network, random walk, pseudo masks) and
``evaluate`` (mIoU and threshold sweeps). Paths come from ``amnseg.layout``, networks from
``amnseg.checkpoints``; ``common`` holds what the stages share.
"""
