"""One schema mechanism for every file of keys dvp reads: the run config (configs/defaults.yaml) and the sweep file
(configs/sweep.yaml). The schema is the commented defaults file itself, which a reader scans top to bottom: each
key's line holds its default, and its comment opens with what the key may hold, in braces, then what it does:

    lr: 0.01                  # {> 0} Adamax learning rate after warm-up
    max_steps: null           # {int >= 1} stop after this many optimizer steps (null: max_epochs decides)
    precision: fp32           # {fp32 | bf16 | fp16} autocast of training
    lr_min: 1.0e-05           # {>= 0; <= train.lr} final learning rate of the cosine schedule

The braces hold, separated by '; ': a type (int, float, str, bool, list, map, or `int or [min, max]`; by
default the default's type), a range (`> a`, `>= a`, `in [a, b]`, `in [a, b)`, ...; `any` for a number with no
bound), choices (`a | b | c`), an order against another key (`< other.key`, `<= other.key`), `null` (may be null;
implied by a null default), `open` (a section that also takes keys of its own, e.g. a searcher's arguments) or
`as other.key` (the spec of a key of the run config: one source for both files). A numeric key without a range,
choices or `any` is an error of the schema file itself, so no key goes unchecked. Kept as YAML rather than
Python so that the file a user reads for the keys is the file that defines them.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from dvp.core.errors import ConfigError

INT64_MAX = 2 ** 63 - 1               # torch reads every integer as int64
TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "map": dict,
                         "int or [min, max]": "int or [min, max]"}
"""Type words of an annotation; `int or [min, max]` is an integer or a pair of integers (a size range)."""


@dataclass(frozen=True)
class Range:
    """An allowed interval of a numeric key: lo <= v <= hi, with open ends where `lo_open`/`hi_open`."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {_number(self.lo)}"
        return (f"in {'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}"
                f"{')' if self.hi_open else ']'}")


def _number(v: float) -> str:
    """A bound as written: integers in full (4294967295), other numbers by %g."""
    return str(v) if isinstance(v, int) else f"{v:g}"


@dataclass(frozen=True)
class Key:
    """What one key may hold: its default, type, nullability, range, choices, an order against another key, and
    the comment that says what it does."""
    name: str
    default: Any
    type: Any
    comment: str
    nullable: bool = False
    range: Range | None = None
    choices: tuple[Any, ...] | None = None
    below: tuple[str, bool] | None = None     # (other key, equal allowed)

    @property
    def type_name(self) -> str:
        return "an integer or [min, max]" if self.type == "int or [min, max]" else self.type.__name__


@dataclass
class Schema:
    """The keys of one file (dotted names, in file order), its sections that take keys of their own, and how
    errors name it: `noun` ('config key'), `source` (the defaults file) and `out_of_range` (the words between a
    value and its range)."""
    keys: dict[str, Key]
    noun: str
    source: str
    out_of_range: str = "is out of range: it must be"
    open_sections: set[str] = field(default_factory=set)

    @property
    def sections(self) -> set[str]:
        return {".".join(k.split(".")[:i]) for k in self.keys for i in range(1, k.count(".") + 1)}

    def defaults(self) -> dict[str, Any]:
        """The defaults as a nested dict (a fresh copy)."""
        tree: dict[str, Any] = {}
        for key, spec in self.keys.items():
            *parents, leaf = key.split(".")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(yaml.safe_dump(spec.default))
        return tree

    def leaves(self, tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
        """(dotted key, value) of every leaf of `tree`, descending only into this schema's sections."""
        for k, v in tree.items():
            if isinstance(v, dict) and f"{prefix}{k}" in self.sections:
                yield from self.leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    def check_types(self, tree: dict[str, Any]) -> dict[str, Any]:
        """Every leaf of `tree` must be a key (or sit in an open section) and hold its type; returns `tree` with
        numbers given for string keys turned into strings. ConfigError naming the key otherwise."""
        for key, value in list(self.leaves(tree)):
            if key not in self.keys:
                if key.rpartition(".")[0] in self.open_sections:
                    continue
                raise ConfigError(f"unknown {self.noun} '{key}' (see {self.source} for every key)")
            typed = self._typed(self.keys[key], value)
            if typed is not value:
                *parents, leaf = key.split(".")
                node = tree
                for part in parents:
                    node = node[part]
                node[leaf] = typed
        return tree

    def _typed(self, spec: Key, value: Any) -> Any:
        key, default, want = spec.name, spec.default, spec.type
        if value is None:
            if spec.nullable:
                return None
            raise ConfigError(f"{self.noun} '{key}' cannot be null or empty; it expects {spec.type_name} "
                              f"(default {default!r})")
        if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if want == "int or [min, max]":
            ok = _is_int(value) or (isinstance(value, list) and len(value) == 2 and all(map(_is_int, value)))
        elif want is bool or isinstance(value, bool):
            ok = want is bool and isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, (int, float))
        elif want is list:
            item = type(default[0]) if default else object
            ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, want)
        if not ok:
            example = f"default {default!r}" if default is not None else "default null"
            choices = f"; choose one of {list(spec.choices)}" if spec.choices else ""
            raise ConfigError(f"{self.noun} '{key}' expects {spec.type_name} ({example}), got {value!r}{choices}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.noun} '{key}' must be a finite number, got {value!r}")
        if any(isinstance(v, int) and abs(v) > INT64_MAX for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{self.noun} '{key}' = {value!r} is too large (integers must be below 2**63)")
        return value

    def check_values(self, tree: dict[str, Any]) -> None:
        """Every value (already typed) within its choices and range, and below the key it is ordered against."""
        flat = dict(self.leaves(tree))
        specs = [s for s in self.keys.values() if s.name in flat]
        for s in specs:
            if s.choices is not None and flat[s.name] not in s.choices:
                raise ConfigError(f"{s.name}={flat[s.name]!r} is not allowed; choose one of {list(s.choices)}")
        for s in specs:
            value = flat[s.name]
            if s.range is not None and value is not None and not isinstance(value, list) and value not in s.range:
                raise ConfigError(f"{s.name}={value!r} {self.out_of_range} {s.range}")
        for s in specs:
            if s.below is not None:
                other, equal = s.below
                low, high = flat[s.name], flat[other]
                if low > high or (low == high and not equal):
                    raise ConfigError(f"{s.name}={low!r} must be below {other}={high!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- reading a schema file ------------------------------------------------------------------------------------
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):[^#]*?(?:#\s?(?P<comment>.*))?$")
_MORE = re.compile(r"^ +#\s?(?P<comment>.*)$")
_RANGE = re.compile(r"^(?:(?P<op>>=?)\s*(?P<lo>\S+)|in\s*(?P<l>[\[(])(?P<a>[^,]+),\s*(?P<b>[^\])]+)(?P<r>[\])]))$")


def _comments(text: str) -> dict[str, str]:
    """Dotted key -> its comment (continuation lines joined), read from the file's lines."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last = None
    for line in text.splitlines():
        if m := _LINE.match(line):
            indent = len(m["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m["key"]))
            last = ".".join(k for _, k in stack)
            out[last] = (m["comment"] or "").strip()
        elif last is not None and (m := _MORE.match(line)):
            out[last] = f"{out[last]} {m['comment'].strip()}".strip()
    return out


def _range(text: str, source: str, key: str) -> Range:
    m = _RANGE.match(text)
    if not m:
        raise ValueError(f"{source}: key '{key}': cannot read the range {text!r}")
    if m["op"]:
        return Range(yaml.safe_load(m["lo"]), lo_open=m["op"] == ">")
    return Range(yaml.safe_load(m["a"]), yaml.safe_load(m["b"]), lo_open=m["l"] == "(", hi_open=m["r"] == ")")


def _key(name: str, default: Any, comment: str, source: str, base: Schema | None) -> Key:
    """The Key of one line, from its default and its comment's annotation."""
    spec = Key(name, default, type(default) if default is not None else str, comment, nullable=default is None)
    note = re.match(r"^\{([^}]*)\}\s*", comment)
    for part in (p.strip() for p in note[1].split(";")) if note else ():
        word, _, rest = part.partition(" ")
        if part == "null":
            spec = replace(spec, nullable=True)
        elif part == "any":
            spec = replace(spec, range=Range())
        elif word == "as" and base is not None:
            spec = replace(base.keys[rest], name=name, default=default, comment=comment)
        elif part in TYPES:
            spec = replace(spec, type=TYPES[part])
        elif word in TYPES and rest:
            spec = replace(spec, type=TYPES[word], range=_range(rest, source, name))
        elif word in ("<", "<="):
            spec = replace(spec, below=(rest, word == "<="))
        elif " | " in part:
            spec = replace(spec, choices=tuple(yaml.safe_load(c) for c in part.split(" | ")))
        else:
            spec = replace(spec, range=_range(part, source, name))
    if spec.type in (int, float) and spec.range is None and spec.choices is None:
        raise ValueError(f"{source}: numeric key '{name}' declares no range, choices or 'any' in its comment")
    return spec


def load_schema(path: Path, noun: str, base: Schema | None = None,
                out_of_range: str = "is out of range: it must be") -> Schema:
    """The schema of the commented defaults file `path`; `base` resolves `as other.key` annotations."""
    text = path.read_text()
    tree = yaml.safe_load(text) or {}
    comments = _comments(text)
    source = f"{path.parent.name}/{path.name}"
    schema = Schema({}, noun, source, out_of_range)
    sections = {k for k in comments if any(o.startswith(k + ".") for o in comments)}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            if name in sections:
                if re.match(r"^\{[^}]*\bopen\b", comments[name]):
                    schema.open_sections.add(name)
                walk(v, f"{name}.")
                continue
            if name not in comments or not comments[name]:
                raise ValueError(f"{source}: key '{name}' has no comment saying what it does")
            schema.keys[name] = _key(name, v, comments[name], source, base)

    walk(tree, "")
    for spec in schema.keys.values():
        if spec.below is not None and spec.below[0] not in schema.keys:
            raise ValueError(f"{source}: key '{spec.name}' is ordered against '{spec.below[0]}', which is no key")
    return schema
