"""Load weights stored in fp32 as bf16 without holding the whole fp32 file and the bf16 copy at once.

transformers reads safetensors through a memory map: asked for bf16 weights from an fp32 file, it touches
every page of the file while it builds the bf16 copy, and all those pages count as the process's memory
until the last tensor is done (the embedded 135M model: a 0.54 GB file plus 0.27 GB of bf16 weights, a
1.5 GiB peak for a 0.27 GB model; a 7B model saved in fp32: 28 GB plus 14 GB). Here the model is loaded in
fp32, which leaves the weights in the map, untouched, and each weight is then cast and its pages of the
map are given back (madvise) before the next one: the peak is the bf16 model plus one fp32 tensor.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform

import torch

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux: drop the pages; a file-backed private map reads them from the file again if touched


def mapped_file_ranges(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files whose name ends with ``suffix`` (Linux)."""
    ranges = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().endswith(suffix):
                start, end = (int(value, 16) for value in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def cast_mapped_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast ``model``'s fp32 parameters to ``dtype`` one at a time, and give back the pages of the weight file's
    memory map that each one was read from (only whole pages inside that tensor, only where the tensor lies in
    a safetensors map, and only on Linux). Parameters that the model keeps in fp32 stay as they are.
    Returns the bytes given back."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:  # as transformers: these stay fp32 when loading in fp16
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    release = None
    if platform.system() == "Linux":
        libc = ctypes.CDLL(None, use_errno=True)
        release = libc.madvise
        release.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ranges = mapped_file_ranges() if release else []
    released = 0
    for name, param in model.named_parameters():
        if param.dtype != torch.float32 or any(f".{module}." in f".{name}." for module in keep):
            continue
        old = param.data
        param.data = old.to(dtype)
        start = old.data_ptr()
        end = start + old.numel() * old.element_size()
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if old.is_contiguous() and last > first and any(low <= start and end <= high for low, high in ranges):
            if release(first, last - first, MADV_DONTNEED) == 0:
                released += last - first
    if hasattr(model, "config"):
        model.config.dtype = dtype
    logger.debug("cast to %s, %.2f GB of the weight file's map given back", dtype, released / 1e9)
    return released
