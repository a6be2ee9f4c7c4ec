"""Reading a single-file checkpoint's architecture from its tensor shapes, one module per
family: ``sd15.py`` (SD 1.x) and ``sdxl.py``. Each gives the diffusers configs that build
empty modules the checkpoint's tensors fit.
"""
