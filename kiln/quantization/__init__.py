"""Quantization: the linear-layer methods (one module per algorithm), the quantize workflow, calibration,
AWQ and the quality report. See docs/quantization.md."""

from kiln.quantization.methods import SUPPORTED_ALGOS, apply_quant_config, quant_method_for

__all__ = ["SUPPORTED_ALGOS", "apply_quant_config", "quant_method_for"]
