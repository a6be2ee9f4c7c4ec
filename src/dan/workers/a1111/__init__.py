"""A node backend that runs DAN tasks on an AUTOMATIC1111 (or Forge) instance over its HTTP API.

``dan node --backend a1111 --a1111-url URL`` serves a DAN server with the models and the GPU of
an instance that already runs (started with ``--api``): no model file is read and no torch is
imported on the node. The pieces, each a small module:

- ``client``: the instance's ``/sdapi/v1`` (and ``/controlnet``) endpoints over httpx, with its
  errors sorted into a task's failure (EngineError) and the instance being down
  (A1111Unreachable, which hands the task back);
- ``inventory``: the instance's checkpoints, LoRAs, upscalers and ControlNet models, identified
  by sha256 (a ModelLookup for the worker loop, and the files the node reports);
- ``payloads``: a DAN task as the instance's request bodies;
- ``engine``: the Engine over all three, relaying progress, previews and cancellation;
- ``node``: the node process, which waits for the instance whenever it is down.
"""
