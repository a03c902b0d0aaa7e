"""The DICOM view of the library: every slide as one study and series of VL Whole Slide
Microscopy instances.

- ``model``: a slide → its instances (UIDs, datasets, where each frame comes from).
- ``frames``: the bytes of a frame (stored JPEG tiles as they are, other levels encoded once),
  JPEG codestream inspection, and Part 10 / multipart framing.
- ``query``: QIDO-RS parameters and matching, pure functions.
- ``service``: the model cache and UID index the DICOMweb front resolves through.
"""
