"""Interrogation: a caption or tags for a picture (``interrogate.py``), from BLIP
(``blip.py``), CLIP ranking (``clip_ranker.py``) and DeepDanbooru (``deepdanbooru.py``).
"""
