"""The AUTOMATIC1111 facade: ``/sdapi/v1`` and the ControlNet extension's ``/controlnet``.

A1111 clients (webuiapi, SillyTavern, Krita and Photoshop plugins, bots) talk to DAN as if it
were a stable-diffusion-webui server: the same paths, field names, defaults and response
shapes. Every request becomes one of DAN's typed orders (``translate``), so it goes through
DAN's queue, keys, fairness and validation like any other; what DAN cannot do is refused with
a 4xx in A1111's error shape naming the field, never silently changed.

- ``schemas``: the wire models, with A1111's names and defaults (unknown fields ignored)
- ``translate``: a request body -> DAN's orders; sampler and scheduler names; ControlNet units
- ``answers``: DAN's records and models -> A1111's responses (info, listings, progress)
- ``routes``/``listings``: the thin routers; ``errors``: A1111's error shape
"""

from __future__ import annotations

SDAPI_PREFIX = "/sdapi/v1"
CONTROLNET_PREFIX = "/controlnet"
PREFIXES = (SDAPI_PREFIX + "/", CONTROLNET_PREFIX + "/")


def is_facade_path(path: str) -> bool:
    """Whether ``path`` is one of the facade's (answered in A1111's shapes)."""
    return path.startswith(PREFIXES)
