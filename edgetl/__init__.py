"""edgetl: fine-tune, quantize (QAT), export and verify image classifiers for edge CPUs."""

__version__ = "0.1.0"
