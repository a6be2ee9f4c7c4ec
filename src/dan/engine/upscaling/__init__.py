"""Upscaling: plain and latent resizers (``upscale.py``) and super-resolution models run tile
by tile (``upscale_models.py``).
"""
