"""DAN: an open Stable Diffusion image-generation network."""

__version__ = "0.1.0"
