"""OPLoRA reproduction pipeline: adaptation methods, SVD cache, diagnostics and export."""

__version__ = "0.1.0"
