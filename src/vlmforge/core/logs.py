"""Logging levels shared by the command line and each matrix cell's own log."""

from __future__ import annotations

import logging


def quiet_noisy_loggers() -> None:
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per skipped node
