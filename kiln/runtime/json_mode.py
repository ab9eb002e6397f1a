"""JSON mode: a sequence's output held to one JSON object (OpenAI's `response_format: {"type": "json_object"}`).

At each step a sequence in JSON mode may sample only the tokens whose bytes continue a valid JSON object, and once
the object is closed only its stop tokens (EOS). The rule is a pushdown recognizer of RFC 8259's grammar on bytes
(`step`: a state and one byte -> the next state, or None where the byte breaks the JSON), walked along a trie of
the vocabulary's token bytes so that a byte refused refuses every token that continues it. A response revisits a
few states (inside a string, after a value, ...), so each state's mask is computed once and shared by every
request of the engine (JsonVocab).

Two bounds keep a small model from looping where JSON allows it forever, and keep the states finite: at most
MAX_WHITESPACE whitespace bytes in a row between tokens of the JSON, and at most MAX_DEPTH nested containers.
"""

from __future__ import annotations

import functools

import torch

MAX_WHITESPACE = 24  # bytes in a row: a pretty-printed line's newline and indent fit
MAX_DEPTH = 32
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPED = frozenset(b'"\\/bfnrt')
LITERAL_TAILS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

# A state is (mode, stack, arg): stack the open containers, "o" an object and "a" an array, innermost last; arg
# the mode's own: the whitespace bytes just read (modes between tokens), whether a string is a key, a literal's
# bytes still to come, a number's phase, (key, hex digits to come) in a \u escape, or (key, bytes to come, the
# next one's range) inside a UTF-8 character.
START = ("top", "", 0)
DONE = ("done", "", 0)

# A number's phases: byte -> next phase; the phases marked True may end the number (the byte after it is then read
# as what follows a value).
_NUMBER = {
    "minus": ({**{ord("0"): "zero"}, **{d: "int" for d in b"123456789"}}, False),
    "zero": ({ord("."): "dot", ord("e"): "exp", ord("E"): "exp"}, True),
    "int": ({**{d: "int" for d in DIGITS}, ord("."): "dot", ord("e"): "exp", ord("E"): "exp"}, True),
    "dot": ({d: "frac" for d in DIGITS}, False),
    "frac": ({**{d: "frac" for d in DIGITS}, ord("e"): "exp", ord("E"): "exp"}, True),
    "exp": ({**{d: "exp_int" for d in DIGITS}, ord("+"): "exp_sign", ord("-"): "exp_sign"}, False),
    "exp_sign": ({d: "exp_int" for d in DIGITS}, False),
    "exp_int": ({d: "exp_int" for d in DIGITS}, True),
}


def _space(mode: str, stack: str, ws: int):
    return (mode, stack, ws + 1) if ws < MAX_WHITESPACE else None


def _open(stack: str, kind: str):
    if len(stack) >= MAX_DEPTH:
        return None
    return ("obj_first" if kind == "o" else "arr_first", stack + kind, 0)


def _close(stack: str):
    return DONE if len(stack) == 1 else ("after", stack[:-1], 0)


def _value_start(stack: str, b: int):
    """The state after b, the first byte of a value, or None."""
    if b == ord("{"):
        return _open(stack, "o")
    if b == ord("["):
        return _open(stack, "a")
    if b == ord('"'):
        return ("string", stack, False)
    if b == ord("-"):
        return ("number", stack, "minus")
    if b in DIGITS:
        return ("number", stack, "zero" if b == ord("0") else "int")
    if b in LITERAL_TAILS:
        return ("literal", stack, LITERAL_TAILS[b])
    return None


def _top(stack, ws, b):  # before the object: only an object is a response
    if b in WHITESPACE:
        return _space("top", stack, ws)
    return _open(stack, "o") if b == ord("{") else None


def _value(stack, ws, b):  # after ":" or an array's ","
    return _space("value", stack, ws) if b in WHITESPACE else _value_start(stack, b)


def _obj_first(stack, ws, b):  # after "{": a key or "}"
    if b in WHITESPACE:
        return _space("obj_first", stack, ws)
    if b == ord('"'):
        return ("string", stack, True)
    return _close(stack) if b == ord("}") else None


def _obj_key(stack, ws, b):  # after an object's ",": a key
    if b in WHITESPACE:
        return _space("obj_key", stack, ws)
    return ("string", stack, True) if b == ord('"') else None


def _colon(stack, ws, b):  # after a key
    if b in WHITESPACE:
        return _space("colon", stack, ws)
    return ("value", stack, 0) if b == ord(":") else None


def _arr_first(stack, ws, b):  # after "[": a value or "]"
    if b in WHITESPACE:
        return _space("arr_first", stack, ws)
    return _close(stack) if b == ord("]") else _value_start(stack, b)


def _after(stack, ws, b):  # after a value inside a container: "," or the container's close
    if b in WHITESPACE:
        return _space("after", stack, ws)
    inner = stack[-1]
    if b == ord(","):
        return ("obj_key" if inner == "o" else "value", stack, 0)
    if b == (ord("}") if inner == "o" else ord("]")):
        return _close(stack)
    return None


# UTF-8's lead bytes: lead -> (continuation bytes, the range of the first one); the others' range is 0x80-0xBF.
# (C0, C1 and F5-FF never appear; E0, ED, F0 and F4 narrow their first continuation against overlong forms,
# surrogates and code points past U+10FFFF.)
_UTF8_LEADS = {**{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}, **{b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)},
               0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF),
               **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F)}


def _string(stack, key, b):
    if b == ord('"'):
        return ("colon" if key else "after", stack, 0)
    if b == ord("\\"):
        return ("escape", stack, key)
    if b >= 0x80:
        lead = _UTF8_LEADS.get(b)
        return None if lead is None else ("utf8", stack, (key, *lead))
    return None if b < 0x20 else ("string", stack, key)  # (control characters must be escaped)


def _utf8(stack, arg, b):  # inside a character of several bytes
    key, left, low, high = arg
    if not low <= b <= high:
        return None
    return ("string", stack, key) if left == 1 else ("utf8", stack, (key, left - 1, 0x80, 0xBF))


def _escape(stack, key, b):
    if b == ord("u"):
        return ("hex", stack, (key, 4))
    return ("string", stack, key) if b in ESCAPED else None


def _hex(stack, arg, b):
    key, left = arg
    if b not in HEX:
        return None
    return ("string", stack, key) if left == 1 else ("hex", stack, (key, left - 1))


def _literal(stack, tail, b):
    if b != tail[0]:
        return None
    return ("after", stack, 0) if len(tail) == 1 else ("literal", stack, tail[1:])


def _number(stack, phase, b):
    moves, may_end = _NUMBER[phase]
    if b in moves:
        return ("number", stack, moves[b])
    return _after(stack, 0, b) if may_end else None  # (the byte after a number is what follows the value)


_MODES = {"top": _top, "value": _value, "obj_first": _obj_first, "obj_key": _obj_key, "colon": _colon,
          "arr_first": _arr_first, "after": _after, "string": _string, "utf8": _utf8, "escape": _escape, "hex": _hex,
          "literal": _literal, "number": _number, "done": lambda stack, arg, b: None}


def step(state: tuple, b: int) -> tuple | None:
    """The recognizer's state after byte b, or None where b cannot continue a JSON object."""
    mode, stack, arg = state
    return _MODES[mode](stack, arg, b)


def walk(state: tuple | None, data: bytes, step=step) -> tuple | None:
    """The state after every byte of data (None once one is refused), by `step` (a grammar's)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


class JsonObjectGrammar:
    """Any one JSON object: JSON mode's grammar. A grammar is what JsonVocab and JsonConstraint need of one: its
    start state, its `step`, which of its states are inside a string (where plain tokens keep the state, but for
    its count of characters), and how many plain characters such a state still takes (None: any number); the
    schema grammars of kiln.runtime.json_schema are the others."""

    start = START
    step = staticmethod(step)

    @staticmethod
    def in_plain_string(state: tuple) -> bool:
        return state[0] == "string"

    @staticmethod
    def plain_room(state: tuple) -> int | None:
        return None


JSON_OBJECT = JsonObjectGrammar()


class AfterText:
    """Any text until `tag` has been written, then one value of the `inner` grammar: a reasoning model's thinking,
    free, before its JSON answer (SamplingParams.json_after, "</think>"). Its own states are ("free", "", the
    tag's bytes matched so far); after the tag, the inner grammar's states as they are (DONE included)."""

    def __init__(self, inner, tag: bytes):
        self.inner, self.tag = inner, tag
        self.start = ("free", "", 0)

    def step(self, state: tuple, b: int) -> tuple | None:
        if state[0] != "free":
            return self.inner.step(state, b)
        text = self.tag[:state[2]] + bytes([b])
        if text == self.tag:
            return self.inner.start
        matched = next(k for k in range(len(text), -1, -1) if self.tag.startswith(text[len(text) - k:]))
        return ("free", "", matched)  # (the longest end of the text so far that begins the tag)

    def in_plain_string(self, state: tuple) -> bool:
        return state[0] != "free" and self.inner.in_plain_string(state)

    def plain_room(self, state: tuple) -> int | None:
        return self.inner.plain_room(state)


@functools.lru_cache(maxsize=64)
def after_text(inner, tag: bytes) -> AfterText:
    """The AfterText of (inner, tag), one per pair, so that its masks are kept across requests (JsonVocab)."""
    return AfterText(inner, tag)


# ---------------------------------------------------------------------------- masks
def _trie(tokens: list[tuple[int, bytes]]) -> dict:
    """Nested dicts byte -> node; a node's None key lists the token ids that end there."""
    root: dict = {}
    for tid, data in tokens:
        node = root
        for b in data:
            node = node.setdefault(b, {})
        node.setdefault(None, []).append(tid)
    return root


def _plain_in_string(data: bytes) -> bool:
    """Whether data leaves a string's state as it was: printable ASCII, no quote or backslash."""
    return all(0x20 <= b < 0x80 and b not in b'"\\' for b in data)


class JsonVocab:
    """A vocabulary's token bytes as tries, and the allowed-token mask of each (grammar, state) met so far.

    Inside a string every token of plain bytes (printable ASCII but quote and backslash) keeps the state as it is,
    and they are most of a vocabulary, so a string's mask is those tokens plus a walk of the other tokens' trie;
    a string with a maximum length takes the plain tokens of as many characters as it has room for."""

    MAX_MASKS = 512  # kept masks (a vocab's bools each); all dropped when full, to be made again as met

    def __init__(self, token_bytes: list[bytes | None], vocab_size: int):
        self.vocab_size = vocab_size
        self.token_bytes = token_bytes[:vocab_size]
        tokens = [(i, b) for i, b in enumerate(self.token_bytes) if b]
        self.trie = _trie(tokens)
        plain = [(i, len(b)) for i, b in tokens if _plain_in_string(b)]
        self.string_trie = _trie([(i, b) for i, b in tokens if not _plain_in_string(b)])
        self.plain_length = torch.zeros(vocab_size, dtype=torch.long)  # a plain token's characters (its bytes)
        self.plain_length[[i for i, _ in plain]] = torch.tensor([n for _, n in plain], dtype=torch.long)
        self.plain = self.plain_length > 0
        self._masks: dict[tuple, torch.Tensor] = {}
        self.any_token = torch.zeros(vocab_size, dtype=torch.bool)  # the tokens with bytes (special ones have none)
        self.any_token[[i for i, _ in tokens]] = True
        self._inner_byte: dict[int, list[int]] = {}  # byte -> the tokens that hold it before their last byte
        self._refused: dict[tuple, torch.Tensor | None] = {}  # per (grammar, state, device): ~mask, None if empty

    def allowed(self, state: tuple, grammar=JSON_OBJECT) -> torch.Tensor:
        """Bool [vocab_size]: the tokens whose every byte the grammar takes from `state` (CPU; do not modify)."""
        mask = self._masks.get((grammar, state))
        if mask is None:
            if len(self._masks) >= self.MAX_MASKS:
                self._masks.clear()
            free = isinstance(grammar, AfterText) and state[0] == "free"
            mask = self._free_text_mask(state, grammar) if free else self._walked_mask(state, grammar)
            self._masks[grammar, state] = mask
        return mask

    def _walked_mask(self, state: tuple, grammar) -> torch.Tensor:
        """The tokens the grammar takes from `state`, found by walking the trie (inside a string: the plain tokens,
        which keep the state, and a walk of the others)."""
        in_string = grammar.in_plain_string(state)
        mask = self.plain.clone() if in_string else torch.zeros(self.vocab_size, dtype=torch.bool)
        room = grammar.plain_room(state) if in_string else None
        if room is not None:
            mask &= self.plain_length <= room
        ids: list[int] = []
        _collect(self.string_trie if in_string else self.trie, state, grammar.step, ids)
        mask[ids] = True
        return mask

    def _free_text_mask(self, state: tuple, grammar: AfterText) -> torch.Tensor:
        """Before AfterText's tag every token goes but one that completes the tag before its last byte and then
        breaks the JSON: only tokens holding the tag's last byte before their end are walked (a few hundred, where
        a walk of the whole trie takes a second on a large vocabulary, and again for every schema)."""
        last = grammar.tag[-1]
        if last not in self._inner_byte:
            self._inner_byte[last] = [i for i, b in enumerate(self.token_bytes) if b and last in b[:-1]]
        mask = self.any_token.clone()
        for i in self._inner_byte[last]:
            mask[i] = walk(state, self.token_bytes[i], grammar.step) is not None
        return mask

    def refused(self, state: tuple, grammar, device: torch.device) -> torch.Tensor | None:
        """Bool [vocab_size] on `device`: the tokens `allowed` leaves out, or None where it allows none. Kept per
        device, so a GPU step copies no mask it has met before (do not modify)."""
        key = (grammar, state, device)
        if key not in self._refused:
            if len(self._refused) >= self.MAX_MASKS:
                self._refused.clear()
            mask = self.allowed(state, grammar)
            self._refused[key] = (~mask).to(device) if mask.any() else None
        return self._refused[key]


def _collect(node: dict, state: tuple, step, ids: list[int]) -> None:
    """Append to ids every token under node whose bytes `step` takes from state."""
    for b, child in node.items():
        if b is None:
            continue
        after = step(state, b)
        if after is not None:
            ids.extend(child.get(None, ()))
            _collect(child, after, step, ids)


class JsonConstraint:
    """One sequence's place in its JSON (any object, or a schema's value): the mask for its next token, advanced by
    the tokens it takes."""

    def __init__(self, vocab: JsonVocab, grammar=JSON_OBJECT):
        self.vocab = vocab
        self.grammar = grammar
        self.state: tuple | None = grammar.start

    @property
    def done(self) -> bool:
        return self.state == DONE

    def restrict(self, logits: torch.Tensor, stop_ids) -> torch.Tensor:
        """logits [vocab] with every token that would break the JSON at -inf: once the object is closed, all but
        the stop tokens (EOS); before, the stop tokens too (the object must close before the output ends)."""
        n = logits.shape[-1]
        if not self.done and self.state is not None:
            refused = self.vocab.refused(self.state, self.grammar, logits.device)
            if refused is not None:
                return logits.masked_fill(refused[:n], float("-inf"))
        # closed, or a state no token continues: end rather than break the JSON
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[sorted(t for t in stop_ids if t < n)] = True
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, tokens: list[int]) -> None:
        """Take the sequence's new tokens (a stop token after the object's end changes nothing)."""
        for token in tokens:
            if self.done:
                return
            data = self.vocab.token_bytes[token] if token < len(self.vocab.token_bytes) else None
            self.state = walk(self.state, data, self.grammar.step) if data else None
