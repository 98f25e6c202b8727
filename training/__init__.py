"""Training and evaluation of the background U-Net: data pairs, ``fit``, ``evaluate``, recipes.

- :mod:`training.data` builds (fold -> target) pairs from real frames, synthetic
  patterns or Tiled runs, with the paper's dataset steps (outlier discard, method
  similarity report, split, augmentation) and provenance for the model card.
- ``python -m training.fit`` trains a model and writes ``model.keras`` + ``model.json``.
- ``python -m training.evaluate MODEL`` scores a model in the layout of the paper's
  Tables 1-3 and draws a figure in the spirit of its Figure 5.

This package imports :mod:`live_bgsub`; :mod:`live_bgsub` never imports it.
"""
