"""The paged KV cache: per layer, keys and values in [num_blocks, block_size, heads, width] tensors (the layout the
paged attention kernels read; one tensor for both where the values are read from the keys' rows, as latent
attention's are: kiln.config.KVCacheLayout), sized at start-up from one memory budget."""

from __future__ import annotations

import logging
import os

import torch

from kiln.errors import ConfigError

log = logging.getLogger(__name__)
CPU_MEMORY_FRACTION = 0.25  # of the machine's RAM, at most, for a CPU KV cache


class PagedKVCache:
    def __init__(self, layers, num_blocks: int, block_size: int, layout, dtype: torch.dtype, device: torch.device):
        """layout: kiln.config.KVCacheLayout."""
        check_cache_dtype(dtype, device)
        shape = (num_blocks, block_size, layout.heads, layout.width)
        # empty, not zeros: a slot is always written before it is read, and on the CPU untouched pages of
        # a large cache then cost no resident memory.
        self.k = {i: torch.empty(shape, dtype=dtype, device=device) for i in layers}
        self.v = self.k if layout.values_in_keys else {i: torch.empty(shape, dtype=dtype, device=device)
                                                       for i in layers}
        self.num_blocks, self.block_size = num_blocks, block_size


def check_cache_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """The paged attention kernels convert float8 (e4m3) codes in registers, which needs compute capability 8.9
    (Ada, Hopper) or later; int8 codes work on any GPU."""
    device = torch.device(device)
    if dtype == torch.float8_e4m3fn and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ConfigError(f"an FP8 KV cache needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
                              f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}. "
                              "Quantize with --kv-cache-quant-algo INT8 instead")


def bytes_per_block(num_layers: int, block_size: int, layout, dtype) -> int:
    return layout.tensors * num_layers * block_size * layout.heads * layout.width * dtype.itemsize


def plan_num_blocks(build_config, block_bytes: int, device: torch.device, activation_reserve: int,
                    dtype: torch.dtype) -> int:
    """How many blocks of `dtype` elements (the model's, or int8 / float8 codes) this rank can hold. The
    budget is in bytes, so a 1-byte cache holds twice the tokens of a 16-bit one.

    GPU: kv_cache_free_gpu_mem_fraction of the memory free once the weights are loaded, less a reserve
    for activations. CPU: what max_batch_size sequences of max_seq_len need, capped at a quarter of RAM.
    An explicit kv_cache_max_tokens replaces both. Refuses, saying by how much, when not even one
    max_seq_len sequence fits.
    """
    bc = build_config
    bs = bc.tokens_per_block
    if bc.kv_cache_max_tokens is not None:
        budget, source = -(-bc.kv_cache_max_tokens // bs) * block_bytes, "kv_cache_max_tokens"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * bc.kv_cache_free_gpu_mem_fraction) - activation_reserve
        source = f"{bc.kv_cache_free_gpu_mem_fraction:.0%} of the {free / 2**30:.1f} GiB free on {device}"
    else:
        wanted = -(-bc.max_batch_size * bc.max_seq_len // bs) * block_bytes
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget, source = min(wanted, int(ram * CPU_MEMORY_FRACTION)), "max_batch_size x max_seq_len (CPU)"
    num_blocks = max(0, budget // block_bytes)
    one_sequence = -(-bc.max_seq_len // bs)
    if num_blocks < one_sequence:
        fix = ("--max-seq-len, or raise --kv-cache-max-tokens (kv_cache_max_tokens)" if bc.kv_cache_max_tokens
               is not None else "--max-seq-len or --max-num-tokens, raise --kv-cache-free-gpu-mem-fraction "
               "(kv_cache_free_gpu_mem_fraction), or use more GPUs (--tp-size)")
        raise ConfigError(
            f"the KV cache fits {num_blocks * bs} tokens ({source}), less than one sequence of max_seq_len "
            f"{bc.max_seq_len}: {(one_sequence - num_blocks) * block_bytes / 2**30:.2f} GiB short. Lower {fix}")
    log.info("KV cache (%s): %d blocks of %d tokens = %d tokens (%.2f GiB, from %s); %d sequences of max_seq_len "
             "%d fit", str(dtype).removeprefix("torch."), num_blocks, bs, num_blocks * bs,
             num_blocks * block_bytes / 2**30, source, num_blocks // one_sequence, bc.max_seq_len)
    return num_blocks
