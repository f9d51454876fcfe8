"""vlmforge: validated, reproducible ONNX artifact sets for vision-language models."""

__version__ = "0.1.0"
