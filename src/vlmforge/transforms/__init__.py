"""ONNX -> ONNX precision transforms with declared parameters; each returns a JSON record of what it did."""
