"""Real model shapes by name, for synthetic checkpoints and benchmarks (weights are random)."""

from __future__ import annotations

LLAMA_SHAPES = {
    # name: vocab, hidden, layers, heads, kv heads, ffn, tied, rope theta, max positions
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, intermediate_size=5632, tie_word_embeddings=False,
                           rope_theta=10000.0, max_position_embeddings=2048),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False,
                       rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, tie_word_embeddings=False,
                        rope_theta=500000.0, max_position_embeddings=8192),
}

# Other families: the architecture and its Hugging Face config fields (transformers names), for synthetic
# checkpoints and benchmarks of real shapes.
FAMILY_SHAPES = {
    "mistral-7b": dict(architecture="MistralForCausalLM", vocab_size=32768, hidden_size=4096, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                       tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=32768,
                       sliding_window=None),  # Mistral-7B v0.3
    "qwen2.5-7b": dict(architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                       tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=32768),
    # q_norm and k_norm over each head (fused into the rotary launch on the GPU)
    "qwen3-8b": dict(architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                     tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960),
    "gemma-2-9b": dict(architecture="Gemma2ForCausalLM", vocab_size=256000, hidden_size=3584, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, intermediate_size=14336,
                       tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=8192,
                       sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
    "phi-3-mini": dict(architecture="Phi3ForCausalLM", vocab_size=32064, hidden_size=3072, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192,
                       tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=4096,
                       sliding_window=2047),
    "mixtral-8x7b": dict(architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                         num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
                         rope_theta=1000000.0, max_position_embeddings=32768),
    # multi-head latent attention (kv_lora_rank 512), 64 experts of 1408, 6 a token, 2 shared: 31 GB in bf16
    "deepseek-v2-lite": dict(architecture="DeepseekV2ForCausalLM", vocab_size=102400, hidden_size=2048,
                             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                             intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
                             num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                             routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
                             norm_topk_prob=False, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                             v_head_dim=128, qk_nope_head_dim=128, tie_word_embeddings=False,
                             rope_theta=10000.0, max_position_embeddings=163840),
    # OpenAI's gpt-oss-20b in bfloat16 (its release stores the experts in MXFP4): attention sinks, 128-token windows
    # in every other layer, 32 experts of 2880 with biases, 4 a token; 42 GB, so the device's 64 GB disk holds the
    # saved source and an engine of half its layers at most (--synthetic-layers 12)
    "gpt-oss-20b": dict(architecture="GptOssForCausalLM", vocab_size=201088, hidden_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128, tie_word_embeddings=False,
                        max_position_embeddings=131072),
    # 128 experts of 768, 8 a token: 61 GB in bf16, fits one H100 (Mixtral's 93 GB does not)
    "qwen3-30b-a3b": dict(architecture="Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                          rope_theta=1000000.0, max_position_embeddings=40960),
}
