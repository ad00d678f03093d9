"""The patch formats: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

Both work on plain JSON values and return a new value; the input is never modified. A
JSON patch whose ``test`` fails, or whose path does not exist, raises :class:`PatchError`
(the server answers 422, as kube-apiserver does). Strategic merge patch is not here: the
server refuses it for custom resources (415), and for its built-in kinds treats it as a
merge patch after dropping the ``$`` directives.
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """The patch cannot be applied to this document."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


MERGE_KEYS: dict[str, dict[str, str]] = {
    "Service": {"spec.ports": "port", "metadata.ownerReferences": "uid"},
}
"""Lists a strategic merge patch merges by key, per built-in kind (the Go types'
``patchMergeKey``); every other list is replaced whole, as kube does for atomic lists."""


def strategic_merge(target: Any, patch: Any, keys: dict[str, str], path: str = "") -> Any:
    """A strategic merge patch (what kubectl apply sends for built-in kinds): as a merge
    patch, but lists in ``keys`` merge by their key (``$patch: delete`` removes an item,
    ``$setElementOrder/<field>`` orders them), ``$patch: replace`` replaces an object, and
    ``$retainKeys``/``$deleteFromPrimitiveList`` are honoured."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return strip_directives(patch)
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if key.startswith("$"):
            continue
        where = f"{path}.{key}" if path else key
        if value is None:
            result.pop(key, None)
        elif where in keys and isinstance(value, list):
            order = patch.get(f"$setElementOrder/{key}")
            result[key] = _merge_list(result.get(key), value, keys[where], order, keys, where)
        else:
            merged = strategic_merge(result.get(key), value, keys, where)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_list(
    target: Any, patch: list[Any], key: str, order: Any, keys: dict[str, str], path: str
) -> list[Any]:
    items = [copy.deepcopy(i) for i in target] if isinstance(target, list) else []
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"{path}: an item without its merge key {key!r}")
        at = next((i for i, old in enumerate(items) if old.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del items[at]
        elif at is None:
            items.append(strip_directives(item))
        else:
            items[at] = strategic_merge(items[at], item, keys, path)
    if isinstance(order, list):
        rank = {(o.get(key) if isinstance(o, dict) else o): i for i, o in enumerate(order)}
        items.sort(key=lambda i: rank.get(i.get(key), len(rank)))
    return items


def strip_directives(patch: Any) -> Any:
    """A strategic merge patch without its ``$``-keys, to apply as a merge patch."""
    if isinstance(patch, dict):
        return {k: strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [strip_directives(v) for v in patch]
    return patch


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if token == "-" and for_add:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r}")
    index = int(token)
    limit = len(container) if for_add else len(container) - 1
    if index > limit:
        raise PatchError(f"array index {index} out of bounds")
    return index


def _parent(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, for_add=False)]
        else:
            raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")
    return node


def _get(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        return doc
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, for_add=False)]
    raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, for_add=True), value)
    else:
        raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"unable to remove nonexistent key: {last}: missing value")
        del parent[last]
    elif isinstance(parent, list):
        del parent[_index(parent, last, for_add=False)]
    else:
        raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")
    return doc


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902: apply ``operations`` in order to a copy of ``target``."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op!r}")
        kind, tokens = op["op"], _pointer(str(op["path"]))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"{kind} operation does not apply: missing value")
        if kind == "add":
            doc = _add(doc, tokens, copy.deepcopy(op["value"]))
        elif kind == "remove":
            doc = _remove(doc, tokens)
        elif kind == "replace":
            _get(doc, tokens)
            doc = (
                _add(_remove(doc, tokens), tokens, copy.deepcopy(op["value"]))
                if tokens
                else (copy.deepcopy(op["value"]))
            )
        elif kind in ("move", "copy"):
            source = _pointer(str(op.get("from", "")))
            value = copy.deepcopy(_get(doc, source))
            if kind == "move":
                doc = _remove(doc, source)
            doc = _add(doc, tokens, value)
        elif kind == "test":
            if _get(doc, tokens) != op["value"]:
                raise PatchError(f"testing value {op['path']} failed: test failed")
        else:
            raise PatchError(f"unexpected kind of JSON patch operation: {kind!r}")
    return doc
