"""Export published PyTorch chest X-ray models to ONNX with a model card (needs the ``export`` extra)."""
