"""YAML for small hand-written files (recipes, --set values): yaml.safe_load with limits.

A recipe is a few dozen lines, so anything that makes one huge or deep is refused before
it is built: a 1 KB "billion laughs" file whose aliases expand to 10^9 values, an alias
inside the node it names (a recursive structure), nesting deeper than any recipe needs
(PyYAML's composer recurses and would end in RecursionError). A key written twice in one
mapping is refused too: YAML would silently keep the last one.

Imports only PyYAML, so `ftune validate` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

# The deepest shipped recipe nests 5 levels (data > train > [0] > columns > value).
MAX_DEPTH = 32
# Values after every alias is expanded; a long recipe holds a few hundred.
MAX_VALUES = 100_000
MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based
    column: int
    message: str


class YamlRefused(Exception):
    """The text is valid YAML, but not something a small config file should hold."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def _problem(mark, message: str) -> Problem:
    return Problem(mark.line + 1, mark.column + 1, message) if mark else Problem(1, 1, message)


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses deep nesting and aliases to a node still being built."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()
        self.aliases = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise YamlRefused([_problem(event.start_mark, f"alias *{event.anchor} is inside the value it names "
                                                              "(a recursive structure, which a recipe cannot hold)")])
            self.aliases += 1
            return super().compose_node(parent, index)
        self._depth += 1
        self._nodes += 1
        if self._nodes > MAX_VALUES:  # stop parsing a huge file early (pure-Python PyYAML is slow)
            raise YamlRefused([_problem(event.start_mark, f"more than {MAX_VALUES:,} values; a recipe is a small file")])
        if self._depth > MAX_DEPTH:
            raise YamlRefused([_problem(event.start_mark, f"nested deeper than {MAX_DEPTH} levels; a recipe needs a few")])
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)

    def construct_object(self, node, deep=False):
        # PyYAML's scalar constructors raise plain ValueError for some values (a date such as
        # 2024-13-45, an integer of more than 4300 digits): give them the value's place.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            reason = str(exc).split(";")[0]  # not Python's advice on sys.set_int_max_str_digits
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {reason}", node.start_mark) from None


def load(text: str) -> tuple[Any, yaml.Node | None]:
    """The value of a single-document YAML text and its node tree (for line numbers).

    Raises yaml.YAMLError for text that is not YAML, YamlRefused for the limits above.
    An empty document gives (None, None).
    """
    _refuse_hidden_line_breaks(text)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_tree(root, expanding=loader.aliases > 0)
        return loader.construct_document(root), root
    finally:
        loader.dispose()


# YAML 1.1 (PyYAML) ends a line at these too, where an editor shows one line: a comment or a
# value would be cut there silently and every later line number would be off by one.
_HIDDEN_BREAKS = {"\x85": "a next-line character", "\u2028": "a line separator", "\u2029": "a paragraph separator"}


def _refuse_hidden_line_breaks(text: str) -> None:
    at = min((i for i in (text.find(ch) for ch in _HIDDEN_BREAKS) if i >= 0), default=-1)
    if at < 0:
        return
    line, column = text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1
    raise YamlRefused([Problem(line, column, f"character U+{ord(text[at]):04X} ({_HIDDEN_BREAKS[text[at]]}) inside a line: "
                                             f"YAML reads it as a line break; delete it, or write it as \\u{ord(text[at]):04X} "
                                             "inside a double-quoted string")])


def _check_tree(root: yaml.Node, *, expanding: bool) -> None:
    """Size and depth as if every alias were expanded, and duplicate keys; each node is visited once."""
    seen: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height) once expanded
    duplicates: list[Problem] = []

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        known = seen.get(id(node))
        if known is None:
            if depth > MAX_DEPTH:
                raise YamlRefused([_problem(node.start_mark, f"nested deeper than {MAX_DEPTH} levels once aliases are expanded")])
            if isinstance(node, yaml.MappingNode):
                duplicates.extend(_duplicate_keys(node))
                children = [child for pair in node.value for child in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            values, height = 1, 1
            for child in children:
                child_values, child_height = visit(child, depth + 1)
                values, height = values + child_values, max(height, child_height + 1)
                if values > MAX_VALUES:
                    what = "the aliases here expand to" if expanding else "this holds"
                    raise YamlRefused([_problem(node.start_mark, f"{what} more than {MAX_VALUES:,} values; a recipe is a small file"
                                                                 + (" (an alias bomb?)" if expanding else ""))])
            known = seen[id(node)] = (values, height)
        if depth + known[1] - 1 > MAX_DEPTH:
            raise YamlRefused([_problem(node.start_mark, f"nested deeper than {MAX_DEPTH} levels once aliases are expanded")])
        return known

    visit(root, 1)
    if duplicates:
        raise YamlRefused(sorted(duplicates, key=lambda p: (p.line, p.column)))


def _duplicate_keys(node: yaml.MappingNode) -> list[Problem]:
    first: dict[tuple[str, str], Any] = {}
    problems = []
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue
        found = first.setdefault((key.tag, key.value), key.start_mark)
        if found is not key.start_mark:
            problems.append(_problem(key.start_mark, f"key '{key.value}' appears twice in this mapping: "
                                                     f"first on line {found.line + 1}, again on line {key.start_mark.line + 1}"))
    return problems
