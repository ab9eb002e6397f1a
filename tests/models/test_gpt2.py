"""GPT-2 converted from tiny transformers models matches them: learned absolute positions, Conv1D (transposed)
weights, LayerNorm with bias, GELU-tanh MLP without a gate, tied lm_head.
This file declares the cases; test_family_parity.py runs the shared checks over them."""

from __future__ import annotations

import transformers as tf


# initializer_range 0.2: with transformers' 0.02 these tiny models repeat one token, a weak greedy check
TINY = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=0.2)

CASES = {
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, TINY),
    "gpt2_n_inner_relu": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(TINY, n_inner=96, activation_function="relu")),
}
