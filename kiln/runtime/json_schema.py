"""Structured output: a sequence's output held to one value of a JSON Schema (OpenAI's `response_format:
{"type": "json_schema", ...}`, SamplingParams.json_schema).

The schema is compiled into a table of nodes, and a grammar over bytes walks them as JSON mode's recognizer walks
any object (kiln.runtime.json_mode: the same masks over the vocabulary's trie, the same string and number rules).
Every output it lets through validates against the schema; it writes a part of what the schema allows, as OpenAI's
strict mode does:
- an object's keys come in the order of its `properties`, a required one never skipped, an optional one written or
  not, and no key beyond them (whatever `additionalProperties` says); an object with no `properties` takes any
  JSON object;
- `enum` and `const` values are written as `json.dumps` spells them;
- a number with bounds (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`) or a `multipleOf` is
  written without an exponent, and each digit only where the number can still end within them on a multiple
  (`Bounds.reaches`; multiples exactly, as decimals: 0.3 is a multiple of 0.1);
- a string with `minLength` or `maxLength` counts its characters (code points, as the validator does) and writes
  none as a \\u escape (a surrogate pair would count as two);
- a string with a `pattern` is written in printable ASCII without a quote or backslash, each character one after
  which the pattern can still match (kiln.runtime.json_pattern: the syntax it takes).
Alternatives (`anyOf`, `oneOf`, a list of types) are followed side by side, byte by byte, until all but one have
failed (two objects that differ in a `const` property's value, say: a tool call's name). Keywords that constrain
what the grammar cannot hold to (`uniqueItems`, `not`, ...) are refused with the schema path that
holds them. Annotations (`title`, `description`, `format`, `default`, `examples`, ...) are read past.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from fractions import Fraction

from kiln.errors import ConfigError
from kiln.runtime.json_mode import _NUMBER, DONE, MAX_WHITESPACE, WHITESPACE, JSON_OBJECT, START
from kiln.runtime.json_pattern import WRITABLE, Pattern, PatternError

# Keywords that assert what the grammar does not enforce: refused, since an output could then break the schema.
UNSUPPORTED = ("uniqueItems", "patternProperties", "propertyNames",
               "minProperties", "maxProperties", "not", "allOf", "if", "then", "else", "dependentRequired",
               "dependentSchemas", "prefixItems", "contains", "minContains", "maxContains", "unevaluatedProperties",
               "unevaluatedItems")
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_STRING_START = ("string", "a", False)  # json_mode's state inside a value string (its stack unread here)
_FIRST_BYTES = {"object": b"{", "any_object": b"{", "array": b"[", "string": b'"', "number": b"-0123456789",
                "bounded": b"-0123456789", "sized_string": b'"', "pattern_string": b'"'}
# A number's bound keywords -> (a lower bound?, inclusive?)
BOUND_KEYWORDS = {"minimum": (True, True), "exclusiveMinimum": (True, False), "maximum": (False, True),
                  "exclusiveMaximum": (False, False)}

# Nodes, by index in SchemaGrammar.nodes:
#   ("object", ((key as JSON bytes, node, required), ...))   ("any_object",)
#   ("array", item node, min items, max items or None)       ("string",)
#   ("number", integer only)                                  ("options", (JSON bytes, ...))  enum, const, literals
#   ("bounded", integer only, Bounds)  a number within bounds, its bytes so far in its state
#   ("sized_string", min length, max length or None)  its characters so far counted in its state
#   ("pattern_string", Pattern)  its pattern's automaton, the states it may be in held in its state
#   ("choice", (node, ...))  alternatives, followed side by side in an ("either", (), (state, ...)) state


class SchemaGrammar:
    """A JSON Schema compiled for the recognizer: `step` takes one byte; a state is (mode, frames, arg), frames the
    open containers ("o", node, next property) and ("a", node, items so far), innermost last."""

    def __init__(self, schema: dict):
        self.nodes: list[tuple] = []
        self._refs: dict[str, int] = {}
        root = self._compile(schema, "#", schema)
        if not self._first_bytes(root) <= set(b"{["):  # (a number at the top would never know it had ended)
            raise ConfigError("json_schema: the top value must be an object or an array")
        self.start = ("value", (), (root, 0))

    # ---- compiling -------------------------------------------------------------------------------

    def _add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _compile(self, schema, path: str, root: dict) -> int:
        if schema is True or schema == {}:
            raise ConfigError(f"json_schema at {path}: a value of any type is not supported; give it a 'type'")
        if not isinstance(schema, dict):
            raise ConfigError(f"json_schema at {path}: a schema must be an object, got {schema!r}")
        refused = [k for k in UNSUPPORTED if k in schema]
        if refused:
            raise ConfigError(f"json_schema at {path}: {refused[0]!r} is not supported (kiln enforces type, "
                              "properties, required, items, minItems, maxItems, minimum, maximum, their exclusive "
                              "forms, multipleOf, minLength, maxLength, pattern, enum, const, anyOf, oneOf and local "
                              "$ref); drop it, or check the output yourself")
        if "$ref" in schema:
            return self._ref(schema["$ref"], path, root)
        if "const" in schema:
            return self._add(("options", (_json_bytes(schema["const"]),)))
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise ConfigError(f"json_schema at {path}: 'enum' must be a non-empty list")
            return self._add(("options", tuple(dict.fromkeys(_json_bytes(v) for v in schema["enum"]))))
        alternatives = schema.get("anyOf", schema.get("oneOf"))
        if alternatives is not None:
            base = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
            return self._choice([self._compile({**base, **alt}, f"{path}/anyOf/{i}", root)
                                 for i, alt in enumerate(alternatives)])
        kind = schema.get("type")
        if isinstance(kind, list):
            return self._choice([self._compile({**schema, "type": k}, f"{path}/type/{k}", root) for k in kind])
        if kind not in TYPES:
            raise ConfigError(f"json_schema at {path}: 'type' must be one of {list(TYPES)} (or a list of them), got "
                              f"{kind!r}")
        return getattr(self, f"_{kind}")(schema, path, root)

    def _ref(self, ref, path: str, root: dict) -> int:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise ConfigError(f"json_schema at {path}: only local references ('#/$defs/Name') are supported, got "
                              f"{ref!r}")
        if ref not in self._refs:  # (a placeholder first: a recursive schema refers to itself)
            self._refs[ref] = self._add(("choice", ()))
            target = root
            for part in ref[2:].split("/"):
                if not isinstance(target, dict) or part not in target:
                    raise ConfigError(f"json_schema at {path}: {ref!r} names nothing in the schema")
                target = target[part]
            self.nodes[self._refs[ref]] = ("choice", (self._compile(target, ref, root),))
        return self._refs[ref]

    def _choice(self, alternatives: list[int]) -> int:
        return self._add(("choice", tuple(alternatives)))

    def _first_bytes(self, node: int) -> set[int]:
        kind, *rest = self.nodes[node]
        if kind == "options":
            return {option[0] for option in rest[0]}
        if kind == "choice":
            return set().union(*(self._first_bytes(alt) for alt in rest[0]))
        return set(_FIRST_BYTES[kind])

    def _object(self, schema, path, root) -> int:
        properties = schema.get("properties")
        if not properties:
            return self._add(("any_object",))
        required = schema.get("required", [])
        missing = [name for name in required if name not in properties]
        if missing:
            raise ConfigError(f"json_schema at {path}: required {missing[0]!r} is not among its properties")
        props = tuple((_json_bytes(name), self._compile(sub, f"{path}/properties/{name}", root), name in required)
                      for name, sub in properties.items())
        return self._add(("object", props))

    def _array(self, schema, path, root) -> int:
        if "items" not in schema:
            raise ConfigError(f"json_schema at {path}: an array needs 'items'")
        low, high = _sizes(schema, "minItems", "maxItems", path)
        return self._add(("array", self._compile(schema["items"], f"{path}/items", root), low, high))

    def _string(self, schema, path, root) -> int:
        if "pattern" in schema:
            return self._pattern_string(schema, path)
        if "minLength" not in schema and "maxLength" not in schema:
            return self._add(("string",))
        low, high = _sizes(schema, "minLength", "maxLength", path)
        return self._add(("sized_string", low, high))

    def _pattern_string(self, schema, path) -> int:
        pattern = schema["pattern"]
        if "minLength" in schema or "maxLength" in schema:
            raise ConfigError(f"json_schema at {path}: a pattern with minLength or maxLength is not supported; give "
                              "the lengths in the pattern ('^.{2,8}$')")
        if not isinstance(pattern, str):
            raise ConfigError(f"json_schema at {path}: 'pattern' must be a string, got {pattern!r}")
        try:
            return self._add(("pattern_string", Pattern(pattern)))
        except PatternError as e:
            raise ConfigError(f"json_schema at {path}: pattern {pattern!r}: {e}") from None

    def _number(self, schema, path, root, integer: bool = False) -> int:
        bounds = Bounds.of(schema, path, integer)
        return self._add(("number", integer) if bounds is None else ("bounded", integer, bounds))

    def _integer(self, schema, path, root) -> int:
        return self._number(schema, path, root, integer=True)

    def _boolean(self, schema, path, root) -> int:
        return self._add(("options", (b"true", b"false")))

    def _null(self, schema, path, root) -> int:
        return self._add(("options", (b"null",)))

    # ---- recognizing -----------------------------------------------------------------------------

    def in_plain_string(self, state: tuple) -> bool:
        return state[0] == "string" and state[2][0] == "string" or \
            state[0] == "sized_string" and state[2][1][0] == "string"

    def plain_room(self, state: tuple) -> int | None:
        """How many more characters a sized string's state takes (None: any number, or not such a state)."""
        if state[0] != "sized_string":
            return None
        node, _, count = state[2]
        high = self.nodes[node][2]
        return None if high is None else high - count

    def step(self, state: tuple, b: int) -> tuple | None:
        mode, frames, arg = state
        return getattr(self, f"_on_{mode}")(frames, arg, b)

    def _on_done(self, frames, arg, b):
        return None

    def _on_either(self, frames, states, b):  # alternatives still alive, each its own state
        return _either(self.step(state, b) for state in states)

    def _on_value(self, frames, arg, b):  # a value of node, after ws whitespace bytes
        node, ws = arg
        if b in WHITESPACE:
            return ("value", frames, (node, ws + 1)) if ws < MAX_WHITESPACE else None
        return self._begin(frames, node, b)

    def _begin(self, frames, node: int, b: int):
        """The state after b, the first byte of a value of node, or None."""
        kind, *rest = self.nodes[node]
        if kind == "choice":
            return _either(self._begin(frames, alt, b) for alt in rest[0])
        if b not in self._first_bytes(node):
            return None
        if kind == "object":
            return ("key", frames + (("o", node, 0),), (0, False))
        if kind == "any_object":
            return ("any_object", frames, JSON_OBJECT.step(START, b))
        if kind == "array":
            return ("items", frames + (("a", node, 0),), 0)
        if kind == "string":
            return ("string", frames, _STRING_START)
        if kind == "number":
            return ("number", frames, (rest[0], _number_phase(b)))
        if kind == "sized_string":
            return ("sized_string", frames, (node, _STRING_START, 0))
        if kind == "pattern_string":
            return ("pattern_string", frames, (node, rest[0].begin))
        if kind == "bounded":
            written = bytes([b])
            return ("bounded", frames, (node, _number_phase(b), written)) if rest[1].reaches(written, rest[0]) \
                else None
        return self._on_options(frames, (rest[0], 0), b)

    def _value_done(self, frames):
        """The state after a value closes inside frames (an array counts it)."""
        if not frames:
            return DONE
        kind, node, count = frames[-1]
        return ("after", frames[:-1] + ((kind, node, count + 1),) if kind == "a" else frames, 0)

    def _candidates(self, node: int, pos: int) -> list[int]:
        """The properties whose key may come next: from pos up to and with the first required one."""
        props = self.nodes[node][1]
        out = []
        for i in range(pos, len(props)):
            out.append(i)
            if props[i][2]:
                break
        return out

    def _on_key(self, frames, arg, b):  # in an object, before a key (after "{" or ","): ws whitespace bytes
        ws, after_comma = arg
        _, node, pos = frames[-1]
        if b in WHITESPACE:
            return ("key", frames, (ws + 1, after_comma)) if ws < MAX_WHITESPACE else None
        if b == ord('"'):
            keys = tuple(self._candidates(node, pos))
            return ("key_bytes", frames, (keys, 1)) if keys else None
        if b == ord("}") and not after_comma and not self._required_left(node, pos):
            return self._value_done(frames[:-1])
        return None

    def _required_left(self, node: int, pos: int) -> bool:
        return any(required for _, _, required in self.nodes[node][1][pos:])

    def _on_key_bytes(self, frames, arg, b):  # inside a key: the candidates' JSON spellings, prefix-free
        keys, matched = arg
        _, node, _ = frames[-1]
        props = self.nodes[node][1]
        keys = tuple(i for i in keys if len(props[i][0]) > matched and props[i][0][matched] == b)
        if not keys:
            return None
        if len(keys) == 1 and len(props[keys[0]][0]) == matched + 1:  # the key's closing quote
            i = keys[0]
            return ("colon", frames[:-1] + (("o", node, i + 1),), (props[i][1], 0))
        return ("key_bytes", frames, (keys, matched + 1))

    def _on_colon(self, frames, arg, b):
        node, ws = arg
        if b in WHITESPACE:
            return ("colon", frames, (node, ws + 1)) if ws < MAX_WHITESPACE else None
        return ("value", frames, (node, 0)) if b == ord(":") else None

    def _on_after(self, frames, ws, b):  # after a value in the innermost container
        if b in WHITESPACE:
            return ("after", frames, ws + 1) if ws < MAX_WHITESPACE else None
        kind, node, count = frames[-1]
        if kind == "o":
            if b == ord(",") and self._candidates(node, count):
                return ("key", frames, (0, True))
            if b == ord("}") and not self._required_left(node, count):
                return self._value_done(frames[:-1])
            return None
        _, item, low, high = self.nodes[node]
        if b == ord(",") and (high is None or count < high):
            return ("value", frames, (item, 0))
        if b == ord("]") and count >= low:
            return self._value_done(frames[:-1])
        return None

    def _on_items(self, frames, ws, b):  # after "[": an item or "]"
        if b in WHITESPACE:
            return ("items", frames, ws + 1) if ws < MAX_WHITESPACE else None
        _, item, low, high = self.nodes[frames[-1][1]]
        if b == ord("]"):
            return self._value_done(frames[:-1]) if low == 0 else None
        return self._begin(frames, item, b) if high != 0 else None

    def _on_string(self, frames, inner, b):  # json_mode's string rules; its closing quote ends the value
        inner = JSON_OBJECT.step(inner, b)
        if inner is None:
            return None
        return self._value_done(frames) if inner[0] == "after" else ("string", frames, inner)

    def _on_any_object(self, frames, inner, b):  # json_mode's object rules
        inner = JSON_OBJECT.step(inner, b)
        if inner is None:
            return None
        return self._value_done(frames) if inner == DONE else ("any_object", frames, inner)

    def _on_number(self, frames, arg, b):
        integer, phase = arg
        moves, may_end = _NUMBER[phase]
        after = moves.get(b)
        if after is not None and not (integer and after in ("dot", "exp")):
            return ("number", frames, (integer, after))
        if not may_end:
            return None
        done = self._value_done(frames)  # (the byte after a number is what follows the value)
        return None if done == DONE else self.step(done, b)

    def _on_bounded(self, frames, arg, b):  # a number within bounds: no exponent, only digits it can end after
        node, phase, written = arg
        _, integer, bounds = self.nodes[node]
        moves, may_end = _NUMBER[phase]
        after = moves.get(b)
        if after is not None and after != "exp" and not (integer and after == "dot"):
            return ("bounded", frames, (node, after, written + bytes([b]))) if bounds.reaches(
                written + bytes([b]), integer) else None
        if not may_end or not bounds.holds(Fraction(written.decode())):
            return None
        done = self._value_done(frames)
        return None if done == DONE else self.step(done, b)

    def _on_sized_string(self, frames, arg, b):  # json_mode's string rules, its characters counted
        node, inner, count = arg
        _, low, high = self.nodes[node]
        if inner[0] == "string":  # (between characters: b closes the string or begins one)
            if b == ord('"'):
                return self._value_done(frames) if count >= low else None
            if high is not None and count >= high:
                return None
        if inner[0] == "escape" and b == ord("u"):
            return None
        inner = JSON_OBJECT.step(inner, b)
        if inner is None:
            return None
        if inner[0] == "string":  # a character complete (counted up to min length only, where none is the most)
            count = count + 1 if high is not None else min(count + 1, low)
        return ("sized_string", frames, (node, inner, count))

    def _on_pattern_string(self, frames, arg, b):  # printable ASCII only, each character one the pattern can take
        node, states = arg
        pattern = self.nodes[node][1]
        if b == ord('"'):
            return self._value_done(frames) if pattern.accepts(states) else None
        states = pattern.step(states, b) if b in WRITABLE else None
        return ("pattern_string", frames, (node, states)) if states else None

    def _on_options(self, frames, arg, b):  # one of several exact JSON texts (enum, const, true, null, ...)
        options, matched = arg
        going = tuple(o for o in options if len(o) > matched and o[matched] == b)
        if going:
            if len(going) == 1 and len(going[0]) == matched + 1:
                return self._value_done(frames)
            return ("options", frames, (going, matched + 1))
        if any(len(o) == matched for o in options):  # one ended here, another went on: b follows the value
            done = self._value_done(frames)
            return None if done == DONE else self.step(done, b)
        return None


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A number's bounds from its schema: low and high (None: none), each inclusive or not, and the step its values
    are multiples of (multipleOf; None: any)."""

    low: Fraction | None
    low_inclusive: bool
    high: Fraction | None
    high_inclusive: bool
    step: Fraction | None = None

    @classmethod
    def of(cls, schema: dict, path: str, integer: bool) -> Bounds | None:
        """The schema's bounds, or None where it has none; ConfigError where they are not numbers or leave no
        value."""
        given = {k: schema[k] for k in (*BOUND_KEYWORDS, "multipleOf") if k in schema}
        if not given:
            return None
        for keyword, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
                    value in (float("inf"), float("-inf")) or keyword == "multipleOf" and value <= 0:
                raise ConfigError(f"json_schema at {path}: {keyword!r} must be a finite number"
                                  f"{', above 0' if keyword == 'multipleOf' else ''}, got {value!r} (a boolean "
                                  "exclusiveMinimum is draft 4's; give the bound itself)")
        # (a float's shortest decimal, as written in the schema: multipleOf 0.1 is 1/10)
        ends = [(Fraction(repr(v)), *BOUND_KEYWORDS[k]) for k, v in given.items() if k != "multipleOf"]
        # the tightest of each side: the larger lower bound, the smaller upper one, exclusive before inclusive
        low = max(((v, inclusive) for v, lower, inclusive in ends if lower), key=lambda end: (end[0], not end[1]),
                  default=(None, False))
        high = min(((v, inclusive) for v, lower, inclusive in ends if not lower), default=(None, False))
        step = Fraction(repr(given["multipleOf"])) if "multipleOf" in given else None
        bounds = cls(low[0], low[1], high[0], high[1], step)
        if not bounds.meets(bounds.low, True, bounds.high, True, integer):
            raise ConfigError(f"json_schema at {path}: no {'integer' if integer else 'number'} lies within its "
                              f"bounds {given}")
        return bounds

    def holds(self, x: Fraction) -> bool:
        return (self.low is None or x > self.low or x == self.low and self.low_inclusive) and \
            (self.high is None or x < self.high or x == self.high and self.high_inclusive) and \
            (self.step is None or (x / self.step).denominator == 1)

    def meets(self, a, a_closed: bool, b, b_closed: bool, integer: bool) -> bool:
        """Whether the interval from a to b (None: unbounded; each end closed or not) shares a value (an integer,
        with `integer`) with these bounds."""
        lo, lo_closed = _tighter((a, a_closed), (self.low, self.low_inclusive), max)
        hi, hi_closed = _tighter((b, b_closed), (self.high, self.high_inclusive), min)
        # the spacing of the values allowed: multiples of the step, integers, or (None) any number. An integer is a
        # multiple of p/q (lowest terms) where it is one of p.
        spacing = self.step if not integer else Fraction(1 if self.step is None else self.step.numerator)
        if lo is None or hi is None:
            return True
        if spacing is None:
            return lo < hi or lo == hi and lo_closed and hi_closed
        first = math.ceil(lo / spacing) * spacing
        first += spacing if first == lo and not lo_closed else 0
        return first < hi or first == hi and hi_closed

    def reaches(self, written: bytes, integer: bool) -> bool:
        """Whether a number begun as `written` (JSON's syntax, no exponent) can still end within the bounds: the
        values its continuations can take are, by magnitude, one interval once it has a '.' and otherwise
        [m 10^k, (m + 1) 10^k) for each count k of digits still to come; a '-' mirrors them."""
        text = written.decode()
        negative, digits = text.startswith("-"), text.lstrip("-")
        whole, dot, fraction = digits.partition(".")
        if not whole:  # ("-" alone: any value <= 0)
            return self.meets(None, False, Fraction(0), True, integer)
        if dot:
            start = Fraction(digits if fraction else whole)
            intervals = [(start, start + Fraction(1, 10 ** len(fraction)))]
        elif whole == "0":
            intervals = [(Fraction(0), Fraction(1))]
        else:
            m = int(whole)
            # (past the bounds' largest magnitude one more digit decides it: every later interval lies further out)
            far = max((abs(b) for b in (self.low, self.high) if b is not None), default=Fraction(0))
            intervals, k = [], 0
            while not intervals or m * 10 ** (k - 1) <= far:
                intervals.append((Fraction(m * 10 ** k), Fraction((m + 1) * 10 ** k)))
                k += 1
            if self.high is None and not negative or self.low is None and negative:
                return True  # (digits enough reach past any bound on the other side)
        if negative:
            return any(self.meets(-b, False, -a, True, integer) for a, b in intervals)
        return any(self.meets(a, True, b, False, integer) for a, b in intervals)


def _number_phase(b: int) -> str:
    """The phase (json_mode._NUMBER) of a number whose first byte is b."""
    return "minus" if b == ord("-") else "zero" if b == ord("0") else "int"


def _sizes(schema: dict, low_key: str, high_key: str, path: str) -> tuple[int, int | None]:
    """(min, max or None) of minItems/maxItems or minLength/maxLength; ConfigError unless 0 <= min <= max."""
    low, high = schema.get(low_key, 0), schema.get(high_key)

    def count(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    if not count(low) or high is not None and (not count(high) or high < low):
        raise ConfigError(f"json_schema at {path}: {low_key} and {high_key} must be integers, 0 <= min <= max, "
                          f"got {low!r} and {high!r}")
    return low, high


def _tighter(x: tuple, y: tuple, pick) -> tuple:
    """Of two interval ends (value or None for unbounded, closed), the tighter under pick (max for lower ends, min
    for upper ones); at equal values the end is closed only if both are."""
    if x[0] is None or y[0] is None:
        return y if x[0] is None else x
    if x[0] == y[0]:
        return x[0], x[1] and y[1]
    return x if pick(x[0], y[0]) == x[0] else y


def _either(states) -> tuple | None:
    """The alternatives' states that took the byte, as one state: None when none did, the survivor when one did,
    else ("either", (), states), flat and without repeats (alternatives that met again go on as one)."""
    alive: dict[tuple, None] = {}
    for state in states:
        if state is not None:
            alive.update(dict.fromkeys(state[2] if state[0] == "either" else (state,)))
    if len(alive) <= 1:
        return next(iter(alive), None)
    return ("either", (), tuple(alive))


def _json_bytes(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=64)
def _grammar(schema_text: str) -> SchemaGrammar:
    return SchemaGrammar(json.loads(schema_text))


def schema_grammar(schema: dict) -> SchemaGrammar:
    """The compiled grammar of a schema (kept for the 64 schemas used last: a JSON vocabulary keeps its masks per
    grammar, so a schema sent again reuses them). Raises ConfigError naming the schema path it cannot hold to."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"json_schema must be JSON data: {e}") from None
    return _grammar(text)
