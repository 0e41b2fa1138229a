"""arqc: certifiably robust mixed-precision quantization, lowered to QDQ ONNX."""

__version__ = "0.1.0"
