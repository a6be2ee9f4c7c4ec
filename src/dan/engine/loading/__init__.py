"""Loading: files on disk into torch modules, offline.

Checkpoints (``checkpoint.py``, their architecture read from tensor shapes in
``architecture/``), the cache of loaded pipelines (``cache.py``), device and dtype choice, VAE
files, textual-inversion embeddings, the CLIP tokenizers built without the hub, and LoRAs
(``lora/``).
"""
