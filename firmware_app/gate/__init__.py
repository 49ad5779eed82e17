"""The input gate: does the model apply to this frame at all?

A model is only known to work on frames like its training data. The gate is built by
``tools/make_gate.py`` from a folder of the model's reference images (nothing in it is specific to a
modality or a phantom), stored beside the model (``gate.npz`` and the manifest's ``[gate]`` table, both
signed in a bundle) and asked per frame, from the first one: ``InputGate.check(pixels) -> GateVerdict``.

- ``descriptor``: a frame -> ~70 features at a fixed working resolution (gray-level and gradient
  histograms, texture at four scales, a coarse layout of brightness and texture, colour, flat black/white);
- ``model``: standardised features (sd floored) -> Mahalanobis distance with a shrunk covariance and the
  largest single z, each relative to the reference data; blank frames are flagged on their own;
- ``build``: reading image folders, fitting, choosing the operating point on held-out frames, the
  ``[gate]`` table and the golden gate scores;
- ``frozen``: ``FrozenDetector`` for live streams that keep showing the same picture.
"""

from firmware_app.gate.frozen import FrozenDetector
from firmware_app.gate.model import REASON_BLANK, REASON_UNLIKE, GateVerdict, InputGate

__all__ = ["FrozenDetector", "GateVerdict", "InputGate", "REASON_BLANK", "REASON_UNLIKE"]
