"""Edge models: traffic speed and cabinet load forecasting.

The shipped ``*.onnx`` files and their ``*.json`` manifests live beside this file. Everything a
gateway needs (manifest checks, loading) imports without torch; training (``models.train``,
``models.export``) imports torch lazily and needs the ``train`` extra.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = MODELS_DIR / "samples"
SHIPPED = ("traffic", "energy")
