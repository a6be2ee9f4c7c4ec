"""The engine: the only package that imports torch and diffusers.

Importing ``dan.engine`` itself stays cheap; the torch-backed engine lives in
``dan.engine.diffusers_engine`` and is imported by :func:`dan.engine.base.load_engine` only when
a worker starts.

Rooms, by what they do (each sub-package's ``__init__`` only documents; import its modules):

- ``base.py`` the Engine protocol and ``load_engine``; ``fake.py`` its fake;
  ``diffusers_engine.py`` the DiffusersEngine, which wires the rooms below together.
- ``families/`` one object per model family (SD 1.x, SDXL): loading, prompt encoding and the
  pipelines of each, so no other module branches on the family.
- ``loading/`` reading files into modules: checkpoints and their architecture
  (``architecture/``), the pipeline cache, devices, VAEs, embeddings, tokenizers, LoRAs.
- ``generation/`` denoising runs: txt2img (and batches across requests), img2img and
  inpainting, hires fix, prompt weighting, samplers, step previews, masks, and the CPU fast
  path (the UNet compiled per shape).
- ``control/`` ControlNet: the models, their state-dict layout, generation under them, and the
  preprocessors (annotators) that turn a picture into a control map.
- ``upscaling/`` resizers and super-resolution models.
- ``interrogation/`` captions and tags for a picture (BLIP, CLIP ranking, DeepDanbooru).
- ``configs/`` the diffusers configs DAN ships, read by ``loading/`` and ``control/``.
"""
