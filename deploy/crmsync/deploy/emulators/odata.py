"""OData URL syntax of the Dynamics emulator: key predicates, $filter to SQL, $select, $orderby."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from crmsync.deploy.emulators.model import (
    DYNAMICS_DATETIME,
    EntitySet,
    FieldDef,
    FieldType,
    format_datetime,
    parse_datetime,
)
from crmsync.deploy.emulators.store import doc_path, folded

ENTITY_TYPE = "Microsoft.Dynamics.CRM"


class ODataError(Exception):
    """A request the Web API refuses: status, Dataverse error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_query(message: str) -> ODataError:
    return ODataError(400, "0x80060888", message)


_TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>'(?:[^']|'')*')
    |(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-]))
    |(?P<datetime>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:\d{2})?(?![\w.:-]))
    |(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDfFlL]?(?![\w.]))
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<punct>[(),=])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    value: Any = None


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise bad_query(f"Syntax error at position {pos} in '{text[:200]}'.")
        kind = match.lastgroup or ""
        raw = match.group(kind)
        value: Any = raw
        if kind == "string":
            value = raw[1:-1].replace("''", "'")
        elif kind == "number":
            digits = raw.rstrip("mMdDfFlL")
            value = float(digits) if any(c in digits for c in ".eE") else int(digits)
        elif kind == "name" and raw in ("true", "false"):
            kind, value = "bool", raw == "true"
        elif kind == "name" and raw == "null":
            kind, value = "null", None
        tokens.append(Token(kind, raw, value))
        pos = match.end()
    return tokens


KeyPredicate = str | dict[str, Token]


_BARE_GUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def parse_key(text: str) -> KeyPredicate:
    """`<guid>` or `name=value,...` from inside the parentheses of `/set(...)`."""
    if _BARE_GUID.fullmatch(text):  # what tokenize makes of it, without tokenizing
        return text.lower()
    tokens = tokenize(text)
    if len(tokens) == 1 and tokens[0].kind == "guid":
        return str(tokens[0].text).lower()
    parts: dict[str, Token] = {}
    i = 0
    while i < len(tokens):
        if (
            i + 2 >= len(tokens)
            or tokens[i].kind != "name"
            or tokens[i + 1].text != "="
            or tokens[i + 2].kind not in ("string", "guid", "number", "bool", "datetime")
        ):
            raise bad_query(f"Bad Request - Error in query syntax: the key '({text[:200]})'.")
        if tokens[i].text in parts:
            raise bad_query(f"Duplicate key property '{tokens[i].text}'.")
        parts[tokens[i].text] = tokens[i + 2]
        i += 3
        if i < len(tokens):
            if tokens[i].text != "," or i + 1 == len(tokens):
                raise bad_query(f"Bad Request - Error in query syntax: the key '({text[:200]})'.")
            i += 1
    if not parts:
        raise bad_query("Bad Request - Error in query syntax: empty key.")
    return parts


def literal_for(field: FieldDef, token: Token) -> Any:
    """The stored form of a URL literal compared with (or keying) a field; 400 if incompatible."""
    if token.kind == "null":
        return None
    t = field.type
    ok = (
        (t is FieldType.STRING and token.kind == "string")
        or (t is FieldType.BOOL and token.kind == "bool")
        or (t in (FieldType.INT, FieldType.DECIMAL) and token.kind == "number")
        or (t in (FieldType.GUID, FieldType.LOOKUP) and token.kind == "guid")
        or (t is FieldType.DATETIME and token.kind == "datetime")
    )
    if not ok or (t is FieldType.INT and not isinstance(token.value, int)):
        raise bad_query(
            "A binary operator with incompatible types was detected. Found operand types "
            f"'{field.type.value}' and '{token.kind}' for property '{field.name}'."
        )
    if t in (FieldType.GUID, FieldType.LOOKUP):
        return str(token.text).lower()
    if t is FieldType.DATETIME:
        moment = parse_datetime(token.text)
        if moment is None:
            raise bad_query(f"The literal '{token.text}' is not a valid Edm.DateTimeOffset.")
        return format_datetime(moment, DYNAMICS_DATETIME)
    return token.value


def field_of(entity: EntitySet, name: str) -> FieldDef:
    field = entity.by_name.get(name)
    if field is None:
        raise bad_query(
            f"Could not find a property named '{name[:100]}' on type "
            f"'{ENTITY_TYPE}.{entity.logical_name}'."
        )
    return field


_COMPARE = {"eq": "=", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_FUNCTIONS = {"contains", "startswith", "endswith"}


class _FilterCompiler:
    """Recursive descent over $filter tokens, emitting a parameterised SQL condition."""

    def __init__(self, entity: EntitySet, tokens: list[Token]) -> None:
        self.entity = entity
        self.tokens = tokens
        self.pos = 0
        self.params: list[Any] = []
        self.depth = 0

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> Token:
        token = self.peek()
        if token is None:
            raise bad_query("Unexpected end of $filter expression.")
        self.pos += 1
        return token

    def expect(self, text: str) -> None:
        token = self.take()
        if token.text != text:
            raise bad_query(f"Expected '{text}' but found '{token.text[:50]}' in $filter.")

    def compile(self) -> str:
        sql = self.or_expr()
        if self.peek() is not None:
            raise bad_query(f"Unexpected '{self.take().text[:50]}' in $filter.")
        return sql

    def or_expr(self) -> str:
        parts = [self.and_expr()]
        while (token := self.peek()) is not None and token.text == "or":
            self.pos += 1
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def and_expr(self) -> str:
        parts = [self.unary()]
        while (token := self.peek()) is not None and token.text == "and":
            self.pos += 1
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def unary(self) -> str:
        self.depth += 1
        if self.depth > 50:
            raise bad_query("The $filter expression is nested too deeply.")
        try:
            token = self.peek()
            if token is not None and token.text == "not":
                self.pos += 1
                return f"NOT ({self.unary()})"
            if token is not None and token.text == "(":
                self.pos += 1
                inner = self.or_expr()
                self.expect(")")
                return f"({inner})"
            return self.primary()
        finally:
            self.depth -= 1

    def primary(self) -> str:
        token = self.take()
        if token.kind != "name":
            raise bad_query(f"Expected a property name, found '{token.text[:50]}' in $filter.")
        if token.text in _FUNCTIONS:
            return self.function(token.text)
        field = field_of(self.entity, token.text)
        op = self.take()
        if op.text not in _COMPARE:
            raise bad_query(f"Unknown operator '{op.text[:50]}' in $filter.")
        value = literal_for(field, self.take())
        if value is None:
            if op.text not in ("eq", "ne"):
                raise bad_query("null can only be compared with eq or ne.")
            return f"{doc_path(field.name)} IS {'' if op.text == 'eq' else 'NOT '}NULL"
        if field.type is FieldType.STRING:
            self.params.append(value.lower())
            return f"{folded(field.name)} {_COMPARE[op.text]} ?"
        self.params.append(value)
        return f"{doc_path(field.name)} {_COMPARE[op.text]} ?"

    def function(self, name: str) -> str:
        self.expect("(")
        field = field_of(self.entity, self.take().text)
        self.expect(",")
        value = self.take()
        self.expect(")")
        if field.type is not FieldType.STRING or value.kind != "string":
            raise bad_query(f"The function '{name}' needs a string property and a string.")
        escaped = str(value.value).lower().replace("\\", "\\\\").replace("%", "\\%")
        escaped = escaped.replace("_", "\\_")
        pattern = {"contains": f"%{escaped}%", "startswith": f"{escaped}%"}.get(name, f"%{escaped}")
        self.params.append(pattern)
        return f"{folded(field.name)} LIKE ? ESCAPE '\\'"


def compile_filter(entity: EntitySet, text: str) -> tuple[str, list[Any]]:
    if len(text) > 8000:
        raise bad_query("The $filter expression is too long.")
    compiler = _FilterCompiler(entity, tokenize(text))
    return compiler.compile(), compiler.params


def parse_select(entity: EntitySet, text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    for name in names:
        field_of(entity, name)
    return names


def compile_orderby(entity: EntitySet, text: str) -> str:
    terms = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] not in ("asc", "desc")):
            raise bad_query(f"The $orderby expression '{text[:100]}' is not valid.")
        field = field_of(entity, words[0])
        terms.append(f"{doc_path(field.name)} {'DESC' if words[-1] == 'desc' else 'ASC'}")
    return ", ".join([*terms, "rid"])
