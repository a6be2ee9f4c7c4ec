"""The engine: the only package that imports torch and diffusers.

Importing ``dan.engine`` itself stays cheap; the torch-backed engine lives in
``dan.engine.sd`` and is imported by :func:`dan.engine.base.load_engine` only when a worker
starts.
"""
