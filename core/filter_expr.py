"""A small, safe filter language over stored fields, evaluated column-wise with pyarrow.compute.

    lang == "en" and year >= 2020
    not (source in ["blog", "forum"]) or score > 0.5
    title is not null and `odd name` != 'x'
    tags contains "news" and tags all in ["news", "sport", null]

Grammar (keywords are case-insensitive; `=` is accepted for `==`):

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | primary
    primary    := "(" expr ")" | value [CMP value | ["not"] "in" list | "is" ["not"] "null"
                                        | "contains" literal | ("any" | "all") "in" list]
    value      := FIELD | literal            FIELD: name or `back-quoted name`
    list       := "[" [literal ("," literal)*] "]"
    literal    := 'string' | "string" | number | true | false | null
    CMP        := == != < <= > >=

The text is tokenized and parsed by recursive descent into a tree of small node classes; nothing
is ever passed to eval. A record whose field is null matches no comparison (SQL semantics): use
`is null` to select those. A bare field must be boolean.

On a list field (any Arrow list type): `tags contains x` keeps lists holding x; `tags any in
[..]` lists with at least one element in [..], `tags all in [..]` lists whose every element is
in [..] (so an empty list passes: `tags all in []` is the emptiness test; "holds both a and b"
is `tags contains "a" and tags contains "b"`). Inside a list null is an element like any other:
`tags contains null`, or a null among the [..] items, matches null elements (a scalar
`x in [null]` matches nothing). A null list matches none of these, nor their `not`: `tags is
null` selects it. `contains`, `any` and `all` are keywords only in that place, so fields may
still be named so.

API: `parse(text) -> Filter`; `Filter.fields` (names it reads); `Filter.mask(table_or_batch)`
-> numpy bool array (True = keep). Syntax errors raise UsageError, type errors DataError.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vecpipe.formats.errors import DataError, UsageError

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<quoted>`[^`]+`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op>==|!=|<=|>=|<|>|=)
  | (?P<punct>[()\[\],])
""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}
_COMPARE = {"==": "equal", "=": "equal", "!=": "not_equal", "<": "less", "<=": "less_equal",
            ">": "greater", ">=": "greater_equal"}
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}


@dataclass
class Token:
    kind: str     # number, string, field, keyword, op, punct, end
    value: Any
    pos: int


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _syntax(text, pos, f"unexpected character {text[pos]!r}")
        kind, raw = match.lastgroup, match.group()
        if kind == "number":
            tokens.append(Token("number", float(raw) if re.search(r"[.eE]", raw) else int(raw),
                                pos))
        elif kind == "string":
            tokens.append(Token("string", _unescape(raw[1:-1]), pos))
        elif kind == "quoted":
            tokens.append(Token("field", raw[1:-1], pos))
        elif kind == "name":
            lower = raw.lower()
            tokens.append(Token("keyword", lower, pos) if lower in _KEYWORDS
                          else Token("field", raw, pos))
        elif kind in ("op", "punct"):
            tokens.append(Token(kind, raw, pos))
        pos = match.end()
    tokens.append(Token("end", None, len(text)))
    return tokens


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def _syntax(text: str, pos: int, what: str) -> UsageError:
    return UsageError(f"filter: {what} at position {pos + 1}: {text!r}",
                      hint="e.g. lang == \"en\" and year >= 2020")


# ---- the tree ---------------------------------------------------------------------------------

class Node:
    def fields(self) -> set[str]:
        return set()

    def evaluate(self, data):  # -> pyarrow Array/ChunkedArray/Scalar
        raise NotImplementedError


@dataclass
class Field(Node):
    name: str

    def fields(self):
        return {self.name}

    def evaluate(self, data):
        return data.column(self.name)

    def __str__(self):
        return self.name


@dataclass
class Literal(Node):
    value: Any

    def evaluate(self, data):
        import pyarrow as pa

        return pa.scalar(self.value)

    def __str__(self):
        return repr(self.value)


@dataclass
class Compare(Node):
    op: str
    left: Node
    right: Node

    def fields(self):
        return self.left.fields() | self.right.fields()

    def evaluate(self, data):
        import pyarrow.compute as pc

        left, right = self.left.evaluate(data), self.right.evaluate(data)
        return _call(lambda: getattr(pc, _COMPARE[self.op])(left, right), self, left, right)

    def __str__(self):
        return f"{self.left} {self.op} {self.right}"


@dataclass
class InList(Node):
    value: Node
    items: list
    negated: bool

    def fields(self):
        return self.value.fields()

    def evaluate(self, data):
        import pyarrow as pa
        import pyarrow.compute as pc

        value = self.value.evaluate(data)
        items = [item for item in self.items if item is not None]
        if not items:
            result = pc.is_valid(value) if not isinstance(value, pa.Scalar) else \
                pa.scalar(value.is_valid)
            result = pc.and_(result, pa.scalar(False))
        else:
            value_set = _value_set(items, value.type, self)
            result = _call(lambda: pc.is_in(value, value_set=value_set), self, value, None)
            # is_in says False for a null value; keep it null so that `not in` excludes it too
            result = pc.if_else(pc.is_valid(value), result, pa.scalar(None, pa.bool_()))
        return pc.invert(result) if self.negated else result

    def __str__(self):
        return f"{self.value} {'not in' if self.negated else 'in'} {self.items!r}"


@dataclass
class ListTest(Node):
    """`value contains x` (quantifier any, items [x]), `value any in [..]`, `value all in [..]`
    over the elements of a list field (see the module docstring)."""
    value: Node
    quantifier: str  # "any" / "all"
    items: list
    spelling: str    # as written, for messages

    def fields(self):
        return self.value.fields()

    def evaluate(self, data):
        import pyarrow as pa

        value = self.value.evaluate(data)
        if isinstance(value, pa.ChunkedArray):
            return pa.chunked_array([self._rows(chunk) for chunk in value.chunks], pa.bool_())
        if isinstance(value, pa.Scalar):
            raise DataError(f"filter: `{self}` needs a list field on the left")
        return self._rows(value)

    def _rows(self, lists):
        """One boolean per list (null for a null list)."""
        import numpy as np
        import pyarrow as pa

        if pa.types.is_null(lists.type):
            return pa.nulls(len(lists), pa.bool_())
        if not _is_list(lists.type):
            raise DataError(f"filter: `{self}` needs a list field; {self.value} is "
                            f"{lists.type}", hint="compare it, or use `in [..]`")
        if not pa.types.is_large_list(lists.type):
            lists = lists.cast(pa.large_list(lists.type.value_type))
        offsets = np.asarray(lists.offsets, dtype=np.int64)
        elements = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
        lengths = np.diff(offsets)
        owners = np.repeat(np.arange(len(lists)), lengths)
        matched = np.bincount(owners[self._members(elements)], minlength=len(lists))
        truth = matched > 0 if self.quantifier == "any" else matched == lengths
        valid = np.asarray(lists.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        return pa.array(truth, pa.bool_(), mask=~valid)

    def _members(self, elements):
        """Per element: is it one of the items (a null item matches null elements)?"""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        members = np.zeros(len(elements), dtype=bool)
        items = [item for item in self.items if item is not None]
        if items and not pa.types.is_null(elements.type):
            value_set = _value_set(items, elements.type, self)
            found = _call(lambda: pc.is_in(elements, value_set=value_set, skip_nulls=True),
                          self, elements, None)
            members |= found.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        if None in self.items:
            members |= elements.is_null().to_numpy(zero_copy_only=False).astype(bool)
        return members

    def __str__(self):
        items = repr(self.items[0]) if self.spelling == "contains" else repr(self.items)
        return f"{self.value} {self.spelling} {items}"


_LIST_HINT = "on a list field use contains x, any in [..] or all in [..]"


def _is_list(value_type) -> bool:
    import pyarrow as pa

    return pa.types.is_list(value_type) or pa.types.is_large_list(value_type) or \
        pa.types.is_fixed_size_list(value_type)


@dataclass
class IsNull(Node):
    value: Node
    negated: bool

    def fields(self):
        return self.value.fields()

    def evaluate(self, data):
        import pyarrow.compute as pc

        value = self.value.evaluate(data)
        return pc.is_valid(value) if self.negated else pc.is_null(value)


@dataclass
class Not(Node):
    operand: Node

    def fields(self):
        return self.operand.fields()

    def evaluate(self, data):
        import pyarrow.compute as pc

        return pc.invert(_boolean(self.operand.evaluate(data), self.operand))


@dataclass
class Logical(Node):
    op: str  # "and" / "or"
    operands: list

    def fields(self):
        return set().union(*(operand.fields() for operand in self.operands))

    def evaluate(self, data):
        import pyarrow.compute as pc

        combine = pc.and_kleene if self.op == "and" else pc.or_kleene
        result = _boolean(self.operands[0].evaluate(data), self.operands[0])
        for operand in self.operands[1:]:
            result = combine(result, _boolean(operand.evaluate(data), operand))
        return result


def _boolean(value, node):
    import pyarrow as pa

    if not pa.types.is_boolean(value.type) and not pa.types.is_null(value.type):
        raise DataError(f"filter: {node} is {value.type}, not true/false",
                        hint="compare it, e.g. `field == \"x\"`")
    return value.cast(pa.bool_()) if pa.types.is_null(value.type) else value


def _value_set(items: list, value_type, node):
    import pyarrow as pa

    try:
        array = pa.array(items)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise DataError(f"filter: the list in `{node}` mixes types") from None
    if array.type != value_type and not pa.types.is_null(value_type):
        try:
            array = array.cast(value_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"filter: cannot compare {value_type} with the {array.type} "
                            f"values in `{node}`", hint=_LIST_HINT
                            if _is_list(value_type) else None) from None
    return array


def _call(compute, node, left, right):
    import pyarrow as pa

    try:
        return compute()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        sides = [side for side in (left, right) if side is not None]
        types = " and ".join(str(side.type) for side in sides)
        lists = any(_is_list(side.type) for side in sides)
        raise DataError(f"filter: cannot evaluate `{node}` ({types})",
                        hint=_LIST_HINT if lists else None) from None


# ---- the parser -------------------------------------------------------------------------------

# Parsing, field listing and evaluation all recurse once per level: a bound keeps a crafted
# filter a usage error instead of Python's RecursionError.
MAX_NESTING = 100


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.at = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.at]

    def take(self) -> Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def accept(self, kind: str, value=None) -> bool:
        token = self.peek()
        if token.kind == kind and (value is None or token.value == value):
            self.at += 1
            return True
        return False

    def expect(self, kind: str, value=None) -> Token:
        token = self.peek()
        if not self.accept(kind, value):
            raise self.error(f"expected {value or kind}")
        return token

    def error(self, what: str) -> UsageError:
        token = self.peek()
        found = "end of expression" if token.kind == "end" else repr(
            self.text[token.pos:token.pos + 12].split()[0] if self.text[token.pos:].split()
            else token.value)
        return _syntax(self.text, token.pos, f"{what}, found {found}")

    @contextmanager
    def nested(self):
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise UsageError(f"filter: nested deeper than {MAX_NESTING} levels at position "
                             f"{self.peek().pos}; flatten it (and/or chains need no brackets)")
        yield
        self.depth -= 1

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.error("empty filter")
        node = self.expr()
        if self.peek().kind != "end":
            raise self.error("expected and/or or the end")
        return node

    def expr(self) -> Node:
        operands = [self.and_expr()]
        while self.accept("keyword", "or"):
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Logical("or", operands)

    def and_expr(self) -> Node:
        operands = [self.not_expr()]
        while self.accept("keyword", "and"):
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else Logical("and", operands)

    def not_expr(self) -> Node:
        if self.accept("keyword", "not"):
            with self.nested():
                return Not(self.not_expr())
        return self.primary()

    def primary(self) -> Node:
        if self.accept("punct", "("):
            with self.nested():
                node = self.expr()
            self.expect("punct", ")")
            return node
        value = self.value()
        token = self.peek()
        if token.kind == "op":
            self.take()
            return Compare(token.value, value, self.value())
        if self.accept("keyword", "in"):
            return InList(value, self.list(), negated=False)
        if token.kind == "keyword" and token.value == "not" and \
                self.tokens[self.at + 1].kind == "keyword" and \
                self.tokens[self.at + 1].value == "in":
            self.at += 2
            return InList(value, self.list(), negated=True)
        if self.accept("keyword", "is"):
            negated = self.accept("keyword", "not")
            self.expect("keyword", "null")
            return IsNull(value, negated)
        return self.list_test(value) or value

    def list_test(self, value: Node) -> "ListTest | None":
        """`contains x`, `any in [..]`, `all in [..]`: words that are keywords only here."""
        word = self.peek().value.lower() if self.peek().kind == "field" else None
        if word == "contains":
            self.take()
            return ListTest(value, "any", [self.literal()], "contains")
        if word in ("any", "all"):
            self.take()
            self.expect("keyword", "in")
            return ListTest(value, word, self.list(), f"{word} in")
        return None

    def value(self) -> Node:
        token = self.peek()
        if token.kind == "field":
            self.take()
            return Field(token.value)
        return Literal(self.literal())

    def literal(self):
        token = self.take()
        if token.kind in ("number", "string"):
            return token.value
        if token.kind == "keyword" and token.value in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[token.value]
        self.at -= 1
        raise self.error("expected a field name or a value")

    def list(self) -> list:
        self.expect("punct", "[")
        items = []
        if not self.accept("punct", "]"):
            items.append(self.literal())
            while self.accept("punct", ","):
                items.append(self.literal())
            self.expect("punct", "]")
        return items


class Filter:
    """A parsed filter expression; see the module docstring for the language."""

    def __init__(self, text: str):
        self.text = text
        self.tree = _Parser(text).parse()
        self.fields = sorted(self.tree.fields())

    def check_fields(self, available, where: str = "the input") -> None:
        missing = [name for name in self.fields if name not in available]
        if missing:
            raise DataError(f"the filter uses field {missing[0]!r}, which {where} does not have "
                            f"(it has: {', '.join(available) or 'none'})")

    def mask(self, data) -> "Any":
        """Evaluate over a pyarrow Table or RecordBatch: a numpy bool array, True = keep."""
        import numpy as np
        import pyarrow as pa

        self.check_fields(data.schema.names)
        result = _boolean(self.tree.evaluate(data), self.tree)
        if isinstance(result, pa.Scalar):  # the expression reads no field
            return np.full(data.num_rows, bool(result.as_py()), dtype=bool)
        if isinstance(result, pa.ChunkedArray):
            result = result.combine_chunks() if result.num_chunks else pa.array([], pa.bool_())
        return result.fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def parse(text: str) -> Filter:
    return Filter(text)
