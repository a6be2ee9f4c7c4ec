"""Which torch device and dtype a worker computes on."""

from __future__ import annotations

from pathlib import Path

import torch


def pick_device(setting: str) -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is fastest."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise."""
    if setting != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            setting
        ]
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cuda_memory(device: str) -> tuple[int, int]:
    """Bytes this process's CUDA allocator holds on ``device``, and the device's total."""
    target = torch.device(device)
    return torch.cuda.memory_reserved(target), torch.cuda.get_device_properties(target).total_memory
