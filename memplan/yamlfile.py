"""Input files (plans, calibration grids): YAML or JSON read in one pass, and their errors in one line.

One libyaml compose gives both the data and the line of every key. Before anything walks the data,
the node tree is checked: a key given twice in one mapping is an error (the later one would win
silently), and aliases may not expand the document by more than `ALIAS_BUDGET` nodes (a 400-byte
"billion laughs" file would otherwise expand to billions of nodes in validation or in a message).
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Iterable
from typing import Any

from memplan.errors import MemplanError, unknown

ALIAS_BUDGET = 100_000  # nodes that aliases may add beyond the file's own
SHOWN_ERRORS = 3  # a file with 5,000 bad runs gets three messages and a count, not 5,000
_MERGE = "tag:yaml.org,2002:merge"
_MAX_DIGITS = 4300  # sys.get_int_max_str_digits() by default


def read(text: str, name: str, *, fmt: str = "yaml") -> tuple[Any, Any]:
    """(data, node tree) of a YAML or JSON text; the tree gives line numbers (None for JSON).

    MemplanError, naming `name`, on a syntax error, a duplicate key or an alias bomb.
    """
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=lambda pairs: _unique_pairs(pairs, name)), None
        return _read_yaml(text, name)
    except json.JSONDecodeError as e:
        raise MemplanError(f"{name}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise MemplanError(f"{name}: nested too deeply") from None
    except ValueError as e:  # Python refuses to read an integer of more than 4300 digits (int_max_str_digits)
        if "digits" not in str(e):
            raise
        raise MemplanError(f"{name}: holds an integer of more than {_MAX_DIGITS} digits; "
                           "no plan or grid value is that large") from None


def _read_yaml(text: str, name: str) -> tuple[Any, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml when built with it: ~10x faster
    try:
        tree = loader.get_single_node()
        if tree is None:
            return None, None
        _check_tree(tree, name)
        return loader.construct_document(tree), tree
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MemplanError(f"{name}: {where}invalid YAML: {what}".replace("\n", " ")) from None
    finally:
        loader.dispose()


def _unique_pairs(pairs: list[tuple[str, Any]], name: str) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise MemplanError(f"{name}: duplicate key {show(key)}; the later one would silently replace the first")
        out[key] = value
    return out


def _check_tree(root: Any, name: str) -> None:
    """Refuse duplicate keys, recursive aliases, and aliases that expand past the budget.

    One pass over the distinct nodes (an alias is the same node object as its anchor): `size` is a
    collection's node count with every alias expanded, summed bottom-up, so a bomb is measured
    without being expanded; `written` counts the nodes as the file writes them (an alias counts 1).
    """
    import yaml

    scalar, mapping = yaml.ScalarNode, yaml.MappingNode
    size: dict[int, int] = {}  # collections only: a scalar is 1
    open_: set[int] = set()  # collections whose children are being sized: the path from the root
    written = 1
    stack = [root]
    while stack:
        node = stack[-1]
        key = id(node)
        if type(node) is scalar or key in size:
            stack.pop()
            continue
        kids = [c for kv in node.value for c in kv] if type(node) is mapping else node.value
        if key in open_:  # every child is sized
            stack.pop()
            open_.discard(key)
            size[key] = 1 + sum(size.get(id(c), 1) for c in kids)
            continue
        open_.add(key)
        written += len(kids)
        if type(node) is mapping:
            _unique_keys(node, root, name)
        for c in kids:
            if id(c) in open_:
                raise MemplanError(f"{name}: line {c.start_mark.line + 1}: an alias refers to a value that contains "
                                   "it; recursive YAML is not allowed")
            if type(c) is not scalar and id(c) not in size:
                stack.append(c)
    if size.get(id(root), 1) > written + ALIAS_BUDGET:
        raise MemplanError(f"{name}: YAML aliases expand this file by more than {ALIAS_BUDGET:,} values; "
                           "write the values out, or use fewer aliases")


def _unique_keys(node: Any, root: Any, name: str) -> None:
    import yaml

    seen: dict[tuple, int] = {}
    for k, _ in node.value:
        if type(k) is yaml.ScalarNode and k.tag != _MERGE:
            line = k.start_mark.line + 1
            if (k.tag, k.value) in seen:
                where = _path_to(root, node)
                lines = f"line {line}" if seen[k.tag, k.value] == line else f"lines {seen[k.tag, k.value]} and {line}"
                raise MemplanError(f"{name}: {where + ': ' if where else ''}duplicate key {show(k.value)} on {lines}; "
                                   "the later one would silently replace the first")
            seen[k.tag, k.value] = line


def _path_to(root: Any, target: Any) -> str:
    """`runs[3]`: where a node sits (for a message, so the search may be slow)."""
    import yaml

    stack: list[tuple[Any, tuple]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if node is target:
            return path_of(loc)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend((v, (*loc, getattr(k, "value", "?"))) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, (*loc, i)) for i, v in enumerate(node.value))
    return ""


def line_of(tree: Any, loc: tuple) -> int | None:
    """1-based line of the value at `loc` in a YAML node tree (the key's line when the value is absent)."""
    import yaml

    node, line = tree, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            # The last match: a key merged in with `<<` comes before the key that overrides it.
            hit = next((kv for kv in reversed(node.value) if getattr(kv[0], "value", None) == str(part)), None)
            if hit is None:
                return line
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line if node is None else node.start_mark.line + 1


# ---- messages ---------------------------------------------------------------------------------

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 40


def show(value: Any, limit: int = 60) -> str:
    """A short repr of user input for messages: bounded in size whatever the value holds."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind_of(value: Any) -> str:
    """`a list`, `an integer`, ...: what a YAML value is, in the file's words."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "an empty value"}
    if type(value) in kinds:
        return kinds[type(value)]
    word = type(value).__name__
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def path_of(loc: tuple) -> str:
    """`runs[0].batch`; a key that is not a plain word is quoted: `runs[0]['my key']`."""
    out = ""
    for part in loc:
        if isinstance(part, int) and out or not str(part).isidentifier():
            out += f"[{show(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out


LISTED_KEYS = 12  # more valid keys than this: name the command that lists them, not all of them


def describe(err: dict, valid_keys: Callable[[tuple], Iterable[str]], listing: str | None = None) -> str:
    """One pydantic error in the file's words: what is wrong, what is valid (or where it is listed)."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "required key missing"
    if kind == "extra_forbidden":
        valid = list(valid_keys(err["loc"]))
        return str(unknown("key", str(err["loc"][-1]), valid,
                           listing=listing if listing and len(valid) > LISTED_KEYS else None))
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}, got {show(got)}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind.startswith(("int_", "float_", "bool_", "string_", "list_", "model_", "dict_", "enum", "literal_")):
        return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {show(got)}"
    return f"{err['msg']}, got {show(got)}"


def error_messages(e: Any, tree: Any, valid_keys: Callable[[tuple], Iterable[str]],
                   listing: str | None = None) -> list[str]:
    """Each error of a pydantic ValidationError as `key.path: what is wrong (line N)`."""
    out = []
    for err in e.errors(include_url=False):
        loc = err["loc"]
        if err["type"] == "value_error" and not loc:  # a file-wide rule names its own key
            out.append(str(err["ctx"]["error"]))
            continue
        line = line_of(tree, loc) if tree is not None else None
        out.append(f"{path_of(loc)}: {describe(err, valid_keys, listing)}" + (f" (line {line})" if line else ""))
    return out


def one_line(messages: list[str], *, limit: int = 300) -> str:
    """The first few messages on one line, each cut to `limit` characters, then how many more."""
    shown = [m if len(m) <= limit else m[: limit - 3] + "..." for m in messages[:SHOWN_ERRORS]]
    more = len(messages) - len(shown)
    text = "; ".join(shown) + (f" (and {more} more)" if more else "")
    return " ".join(text.splitlines())  # messages quote user text with repr, except pydantic's own
