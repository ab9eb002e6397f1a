"""Sizing the paged KV cache (plan_num_blocks) from one budget, and refusing a cache too small for one sequence."""

from __future__ import annotations

import pytest
import torch

from kiln.config import BuildConfig
from kiln.errors import ConfigError
from kiln.config import KVCacheLayout, PretrainedConfig
from kiln.runtime.kv_cache import PagedKVCache, bytes_per_block, plan_num_blocks

BLOCK_BYTES = 100_000


def test_bytes_per_block_is_keys_and_values_of_every_layer():
    assert bytes_per_block(3, 16, KVCacheLayout(2, 64), torch.float16) == 2 * 3 * 16 * 2 * 64 * 2


def test_latent_attention_caches_one_row_a_token_for_keys_and_values():
    """DeepSeek-V3's shape: one 576-wide row a token and layer (kv_lora_rank 512 + rope 64) on every rank, the
    values read from it, where its 128 heads' expanded keys and values would take 2 x 128 x 192."""
    config = PretrainedConfig(architecture="DeepseekV3ForCausalLM", dtype="bfloat16", vocab_size=64, hidden_size=64,
                              num_hidden_layers=1, num_attention_heads=128, num_key_value_heads=128, head_size=192,
                              intermediate_size=64, mla_kv_lora_rank=512, mla_rope_head_dim=64, mla_v_head_dim=128)
    for tp in (1, 8):
        assert config.kv_cache_layout(tp) == KVCacheLayout(1, 576, values_in_keys=True)
    assert bytes_per_block(61, 32, config.kv_cache_layout(1), torch.bfloat16) == 61 * 32 * 576 * 2
    cache = PagedKVCache([0, 1], 2, 32, config.kv_cache_layout(1), torch.bfloat16, torch.device("cpu"))
    assert cache.v[1] is cache.k[1] and cache.k[0].shape == (2, 32, 1, 576)
    plain = config.replace(mla_kv_lora_rank=0, mla_rope_head_dim=0, mla_v_head_dim=0, num_key_value_heads=8,
                           head_size=128)
    assert plain.kv_cache_layout(2) == KVCacheLayout(4, 128)


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # an explicit size replaces either budget; no GPU is touched
def test_kv_cache_max_tokens_rounds_up_to_whole_blocks(device):
    bc = BuildConfig(max_seq_len=64, tokens_per_block=16, kv_cache_max_tokens=100)
    # ceil(100 / 16)
    assert plan_num_blocks(bc, BLOCK_BYTES, torch.device(device), activation_reserve=10**12, dtype=torch.bfloat16) == 7


def test_cpu_holds_max_batch_size_sequences_of_max_seq_len():
    bc = BuildConfig(max_batch_size=3, max_seq_len=50, tokens_per_block=16)
    # ceil(150 / 16)
    assert plan_num_blocks(bc, BLOCK_BYTES, torch.device("cpu"), activation_reserve=0, dtype=torch.bfloat16) == 10


def test_cpu_cache_is_capped_at_a_quarter_of_ram(monkeypatch):
    pages = {"SC_PAGE_SIZE": 1000, "SC_PHYS_PAGES": 3000}  # 3 MB of RAM: a quarter is 7.5 blocks
    monkeypatch.setattr("kiln.runtime.kv_cache.os.sysconf", pages.__getitem__)
    bc = BuildConfig(max_batch_size=64, max_seq_len=64, tokens_per_block=16)
    assert plan_num_blocks(bc, BLOCK_BYTES, torch.device("cpu"), activation_reserve=0, dtype=torch.bfloat16) == 7


def test_gpu_takes_its_fraction_of_free_memory_less_the_activation_reserve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000_000, 80_000_000))
    bc = BuildConfig(max_seq_len=64, tokens_per_block=16, kv_cache_free_gpu_mem_fraction=0.5)
    # (0.5 * 10 MB - 1 MB) / 100 kB
    assert plan_num_blocks(bc, BLOCK_BYTES, torch.device("cuda"), activation_reserve=1_000_000, dtype=torch.bfloat16) == 40


def test_an_explicit_size_below_one_sequence_names_the_flags_to_change():
    bc = BuildConfig(max_seq_len=64, tokens_per_block=16, kv_cache_max_tokens=40)  # 3 blocks; one sequence needs 4
    with pytest.raises(ConfigError) as e:
        plan_num_blocks(bc, BLOCK_BYTES, torch.device("cpu"), activation_reserve=0, dtype=torch.bfloat16)
    message = str(e.value)
    assert "48 tokens" in message and "max_seq_len 64" in message
    assert "--max-seq-len" in message and "kv_cache_max_tokens" in message
    assert "kv_cache_free_gpu_mem_fraction" not in message  # it would change nothing here


def test_gpu_memory_below_one_sequence_names_the_flags_to_change(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_000_000, 80_000_000))
    bc = BuildConfig(max_seq_len=2048, tokens_per_block=32)  # 64 blocks needed, 9 fit
    with pytest.raises(ConfigError) as e:
        plan_num_blocks(bc, BLOCK_BYTES, torch.device("cuda"), activation_reserve=0, dtype=torch.bfloat16)
    message = str(e.value)
    assert "288 tokens" in message and "max_seq_len 2048" in message
    assert f"{55 * BLOCK_BYTES / 2**30:.2f} GiB short" in message
    for flag in ("--max-seq-len", "--max-num-tokens", "kv_cache_free_gpu_mem_fraction", "--tp-size"):
        assert flag in message
