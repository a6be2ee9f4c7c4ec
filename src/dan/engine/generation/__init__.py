"""Generation: the denoising runs on a loaded pipeline.

txt2img (``txt2img.py``), img2img and inpainting (``img2img.py``, masks in ``masks.py``), the
hires fix (``hires.py``), A1111 prompt weighting (``prompts.py``), samplers (``samplers.py``)
and step previews (``preview.py``).
"""
