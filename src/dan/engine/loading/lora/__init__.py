"""LoRAs: kohya-format files read once and applied per task, never leaked.

``files.py`` reads, checks and caches LoRA files; ``stack.py`` applies plain LoRA layers as
PEFT adapters switched on for one task; ``lycoris.py`` adds LoHa / LoKr layers to the weights
for one task and puts them back exactly.
"""
