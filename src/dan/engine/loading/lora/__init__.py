"""LoRAs: kohya-format LoRA and LyCORIS files read once and applied per task, never leaked."""
