"""Reasoning models' thinking, apart from their answer: `message.reasoning_content` (DeepSeek's API and vLLM's name)
beside `message.content` in `kiln serve`'s chat completions.

A chat template that mentions `</think>` (Qwen3, QwQ, DeepSeek-R1 and their distills) marks a reasoning model. Its
answer is `<think>` reasoning `</think>` content; or, where the template opened the block itself at the end of the
prompt (DeepSeek-R1's), reasoning `</think>` content. An answer cut before `</think>` is all reasoning; one with no
`<think>` at its start, or to a prompt that closed the block itself (Qwen3 with `chat_template_kwargs:
{"enable_thinking": false}`, whose template writes an empty block into the prompt), is all content. A stream holds
back what may be the start of either tag. JSON asked of a thinking answer (`response_format`, forced tool calls)
is held to after its `</think>` (SamplingParams.json_after), so the model thinks first.
"""

from __future__ import annotations

import dataclasses

from kiln.serve.tools import tag_start

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def reasons(chat_template: str | None) -> bool:
    return bool(chat_template) and THINK_CLOSE in chat_template


@dataclasses.dataclass(frozen=True)
class Thinking:
    """How a reasoning model's answers split: `opened` where the prompt ends inside the thinking block."""

    opened: bool

    @classmethod
    def of(cls, prompt_text: str) -> Thinking | None:
        """The Thinking of a prompt's answer, or None where the prompt closed the block itself (Qwen3's
        enable_thinking false): that answer is all content."""
        end = prompt_text.rstrip()
        return None if end.endswith(THINK_CLOSE) else cls(end.endswith(THINK_OPEN))

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        """(reasoning or None, content) of an answer; while it is still coming (not `finished`), the parts that
        may be known so far, nothing that may yet turn out to be a tag."""
        body = text
        if not self.opened:
            start = text.lstrip()
            if not start.startswith(THINK_OPEN):
                still_open = not finished and THINK_OPEN.startswith(start)  # ("", "<", "<thi", ...)
                return None, "" if still_open else text
            body = start[len(THINK_OPEN):]
        reasoning, closed, content = body.partition(THINK_CLOSE)
        if closed:
            return reasoning, content.lstrip("\n")
        return reasoning[:len(reasoning) - (0 if finished else tag_start(reasoning, THINK_CLOSE))], ""

