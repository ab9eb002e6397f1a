"""A reasoning model's answer split into its thinking and its content (kiln.serve.reasoning), finished and while
it streams: what a stream sends is always a beginning of what the finished answer holds. The server end to end,
with a thinking chat template and the openai client, is in test_server.py."""

from __future__ import annotations

import pytest

from kiln.serve.reasoning import Thinking, reasons

QWEN3_LIKE = "{% for m in messages %}{{ m.content }}{% endfor %}<think>\n\n</think>\n\n"


@pytest.mark.parametrize("opened,text,want", [
    (False, "<think>\nHmm, red.\n</think>\n\nRed.", ("\nHmm, red.\n", "Red.")),
    (False, "  <think>x</think>y", ("x", "y")),
    (False, "Red.", (None, "Red.")),  # (no thinking: Qwen3 with enable_thinking false)
    (False, "<think>\nstill going", ("\nstill going", "")),  # (cut by max_tokens: all thinking)
    (False, "", (None, "")),
    (True, "Hmm.</think>Red.", ("Hmm.", "Red.")),  # (DeepSeek-R1: the prompt opened the block)
    (True, "Hmm, and more", ("Hmm, and more", "")),
    (False, "<think>a</think>b</think>c", ("a", "b</think>c")),
])
def test_an_answer_splits_into_thinking_and_content(opened, text, want):
    assert Thinking(opened).split(text) == want


@pytest.mark.parametrize("opened,text", [
    (False, "<think>\nHmm, red.\n</think>\n\nRed is a colour."), (False, "  Red is a colour."),
    (True, "Let me think.</think>\n\nRed."), (False, "<thinking is not the tag"), (False, "<think></think>"),
])
def test_a_stream_sends_only_beginnings_of_the_finished_parts(opened, text):
    thinking = Thinking(opened)
    final_reasoning, final_content = thinking.split(text)
    for end in range(len(text) + 1):
        reasoning, content = thinking.split(text[:end], finished=False)
        assert (final_reasoning or "").startswith(reasoning or ""), (end, reasoning)
        assert final_content.startswith(content), (end, content)
    assert thinking.split("<th", finished=False) == ((None, "") if not opened else ("<th", ""))
    assert thinking.split("x</thi", finished=False)[0] in (None, "x")  # (a closing tag may be coming)


def test_a_reasoning_model_is_told_by_its_template():
    assert reasons(QWEN3_LIKE) and not reasons("{{ messages }}") and not reasons(None)
    assert Thinking.of("<|im_start|>assistant\n<think>\n").opened
    assert not Thinking.of("<|im_start|>assistant\n").opened  # (Qwen3 thinking: the answer opens the block)
    assert Thinking.of("<|im_start|>assistant\n<think>\n\n</think>\n\n") is None  # (closed: all content)
