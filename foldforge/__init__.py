"""foldforge: fast training of AlphaFold-family protein structure models."""

__version__ = "0.1.0"
