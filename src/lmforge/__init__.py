"""lmforge: configurable, tracked, reproducible language-model training."""

__version__ = "0.1.0"
