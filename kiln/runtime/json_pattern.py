"""A JSON Schema `pattern` compiled for structured output (kiln.runtime.json_schema): the regular expression as an
automaton over the characters a string is written in, so that a sequence's string only ever holds characters after
which the pattern can still match.

JSON Schema's patterns are ECMA-262 regular expressions that match anywhere in the string unless anchored. The
syntax taken here is their regular core: literal characters, `.`, the escapes `\\d \\D \\w \\W \\s \\S` and escaped
punctuation, classes `[...]` (ranges, negation, those escapes inside), groups `(...)` and `(?:...)`, alternation
`|`, the quantifiers `? * + {n} {n,} {n,m}` (lazy or not: the same strings), and `^` and `$` at the ends. What
matches depends on more than the characters (back references, look-around, `\\b`) is refused, naming it.

The string is written in printable ASCII without a quote or a backslash (WRITABLE): JSON needs no escape for those,
so each byte is one character. A pattern that only strings outside them match is refused.
"""

from __future__ import annotations

import string

WRITABLE = frozenset(b for b in range(0x20, 0x7F) if b not in b'"\\')
_CLASSES = {"d": frozenset(string.digits.encode()),
            "w": frozenset((string.ascii_letters + string.digits + "_").encode()),
            "s": frozenset(b" \t\n\r\f\v")}
MAX_STATES = 2000  # an automaton past this (long counted repeats, say) is refused


class PatternError(ValueError):
    pass


class Pattern:
    """A pattern's automaton: states 0..n-1, `moves[s]` its (bytes, next state) edges, `empty[s]` its ε-edges;
    `start` and the accepting state. A position in a string is the set of states it may be in, kept to those from
    which the accepting state can still be reached (`_coreachable`)."""

    def __init__(self, pattern: str):
        self.moves: list[list[tuple[frozenset, int]]] = []
        self.empty: list[list[int]] = []
        try:
            first, last = _Parser(pattern, self).parse()
        except IndexError:
            raise PatternError("it ends inside an escape or a class") from None
        self.start, self.accept = first, last
        self._coreachable = self._reaching_accept()
        self.begin = self._closure({self.start})
        if not self.begin:
            raise PatternError("no string of printable ASCII characters without '\"' or '\\' matches it")

    def state(self) -> int:
        if len(self.moves) >= MAX_STATES:
            raise PatternError(f"its automaton passes {MAX_STATES} states (a long counted repeat?)")
        self.moves.append([])
        self.empty.append([])
        return len(self.moves) - 1

    def step(self, states: frozenset, b: int) -> frozenset:
        """The live states after the character b (empty: the pattern can no longer match)."""
        return self._closure({t for s in states for chars, t in self.moves[s] if b in chars})

    def accepts(self, states: frozenset) -> bool:
        return self.accept in states

    def _closure(self, states: set) -> frozenset:
        todo, seen = list(states), set(states)
        while todo:
            for t in self.empty[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(s for s in seen if s in self._coreachable)

    def _reaching_accept(self) -> set:
        back: list[list[int]] = [[] for _ in self.moves]
        for s, edges in enumerate(self.moves):
            for chars, t in edges:  # (an edge's characters are writable ones: none, where it can never be taken)
                if chars:
                    back[t].append(s)
            for t in self.empty[s]:
                back[t].append(s)
        seen, todo = {self.accept}, [self.accept]
        while todo:
            for s in back[todo.pop()]:
                if s not in seen:
                    seen.add(s)
                    todo.append(s)
        return seen


class _Parser:
    """Recursive descent over the pattern, building Thompson's automaton: each piece is a (first, last) pair of
    states joined by ε-edges."""

    def __init__(self, text: str, automaton: Pattern):
        self.text, self.at, self.nfa = text, 0, automaton

    def parse(self) -> tuple[int, int]:
        anchored_start = self._take("^")
        first, last = self._alternation()
        anchored_end = self.at == len(self.text) - 1 and self._take("$")
        if self.at != len(self.text):
            raise PatternError(f"{self.text[self.at]!r} at {self.at} is not supported")
        if not anchored_start:  # (unanchored: anything before the match)
            first = self._join(self._any(), (first, last))[0]
        if not anchored_end:
            last = self._join((first, last), self._any())[1]
        return first, last

    def _take(self, c: str) -> bool:
        if self.text.startswith(c, self.at):
            self.at += len(c)
            return True
        return False

    def _edge(self, chars: frozenset) -> tuple[int, int]:
        a, b = self.nfa.state(), self.nfa.state()
        self.nfa.moves[a].append((chars & WRITABLE, b))
        return a, b

    def _empty(self) -> tuple[int, int]:
        a = self.nfa.state()
        return a, a

    def _join(self, x: tuple, y: tuple) -> tuple[int, int]:
        self.nfa.empty[x[1]].append(y[0])
        return x[0], y[1]

    def _any(self) -> tuple[int, int]:
        """Any characters, any number of them."""
        return self._repeat(lambda: self._edge(WRITABLE), 0, None)

    def _alternation(self) -> tuple[int, int]:
        branches = [self._sequence()]
        while self._take("|"):
            branches.append(self._sequence())
        if len(branches) == 1:
            return branches[0]
        first, last = self.nfa.state(), self.nfa.state()
        for a, b in branches:
            self.nfa.empty[first].append(a)
            self.nfa.empty[b].append(last)
        return first, last

    def _sequence(self) -> tuple[int, int]:
        piece = self._empty()
        while self.at < len(self.text) and self.text[self.at] not in "|)" and not (
                self.text[self.at] == "$" and self.at == len(self.text) - 1):
            start = self.at
            copies = [self._atom()]  # (each further copy a quantifier needs is the atom parsed again from start)
            low, high = self._quantifier()
            after = self.at

            def copy(start=start, copies=copies):
                if copies:
                    return copies.pop()
                self.at = start
                return self._atom()

            piece = self._join(piece, self._repeat(copy, low, high))
            self.at = after
        return piece

    def _repeat(self, make, low: int, high: int | None) -> tuple[int, int]:
        piece = self._empty()
        for _ in range(low):
            piece = self._join(piece, make())
        if high is None:  # then any number more
            loop = make()
            self.nfa.empty[loop[1]].append(loop[0])
            skip = self.nfa.state()
            self.nfa.empty[piece[1]].extend([loop[0], skip])
            self.nfa.empty[loop[1]].append(skip)
            return piece[0], skip
        end = self.nfa.state()
        self.nfa.empty[piece[1]].append(end)
        for _ in range(high - low):  # each optional copy may be the last
            piece = self._join(piece, make())
            self.nfa.empty[piece[1]].append(end)
        return piece[0], end

    def _quantifier(self) -> tuple[int, int | None]:
        bounds = {"?": (0, 1), "*": (0, None), "+": (1, None)}
        c = self.text[self.at] if self.at < len(self.text) else ""
        if c in bounds:
            self.at += 1
            low, high = bounds[c]
        elif c == "{":
            close = self.text.find("}", self.at)
            body = self.text[self.at + 1:close] if close > 0 else ""
            low_text, comma, high_text = body.partition(",")
            if not low_text.isdigit() or high_text and not high_text.isdigit():
                raise PatternError(f"'{{{body}' at {self.at} is not a repeat count")
            low, high = int(low_text), (int(high_text) if high_text else None) if comma else int(low_text)
            if high is not None and high < low:
                raise PatternError(f"'{{{body}}}' at {self.at}: the largest count is below the smallest")
            self.at = close + 1
        else:
            return 1, 1
        self._take("?")  # (lazy: the same strings)
        return low, high

    def _atom(self) -> tuple[int, int]:
        c = self.text[self.at]
        self.at += 1
        if c == "(":
            if self._take("?"):
                if not self._take(":"):
                    raise PatternError(f"'(?' at {self.at - 2}: only non-capturing groups '(?:' are supported "
                                       "(look-around is not)")
            inner = self._alternation()
            if not self._take(")"):
                raise PatternError(f"a group opened at {self.at} is not closed")
            return inner
        if c == "[":
            return self._edge(self._class())
        if c == ".":
            return self._edge(WRITABLE - {ord("\n"), ord("\r")})
        if c == "\\":
            return self._edge(self._escape())
        if c in "*+?{)$^|":
            raise PatternError(f"{c!r} at {self.at - 1} has nothing before it to act on")
        return self._edge(frozenset(c.encode()) if c.isascii() else frozenset())

    def _escape(self) -> frozenset:
        c = self.text[self.at] if self.at < len(self.text) else ""
        self.at += 1
        if c.lower() in _CLASSES:
            chars = _CLASSES[c.lower()]
            return frozenset(range(128)) - chars if c.isupper() else chars
        if c and not c.isalnum() and c.isascii():
            return frozenset(c.encode())
        raise PatternError(f"the escape '\\{c}' at {self.at - 2} is not supported")

    def _class(self) -> frozenset:
        negated = self._take("^")
        if self.text.startswith("]", self.at):  # ('[]' matches nothing in ECMA-262, ']' itself in Python's re)
            raise PatternError(f"a class at {self.at} is empty or begins with ']': write a ']' member as '\\]'")
        chars: set[int] = set()
        while self.at < len(self.text) and self.text[self.at] != "]":
            low = self._class_member()
            if isinstance(low, frozenset):
                chars |= low
            elif self.text.startswith("-", self.at) and not self.text.startswith("-]", self.at):
                self.at += 1
                high = self._class_member()
                if isinstance(high, frozenset) or high < low:
                    raise PatternError(f"a class range ending at {self.at - 1} is not a range of characters")
                chars |= set(range(low, high + 1))
            else:
                chars.add(low)
        if not self._take("]"):
            raise PatternError("a class '[' is not closed")
        return frozenset(range(128)) - chars if negated else frozenset(chars)

    def _class_member(self) -> int | frozenset:
        c = self.text[self.at]
        self.at += 1
        if c == "\\":
            return self._escape() if self.text[self.at].lower() in _CLASSES else next(iter(self._escape()))
        if not c.isascii():
            raise PatternError(f"the class character {c!r} at {self.at - 1} is not ASCII")
        return ord(c)
