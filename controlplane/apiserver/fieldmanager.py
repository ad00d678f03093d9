"""Field ownership (``metadata.managedFields``) and server-side apply.

Every write records which manager set which fields, in kube's FieldsV1 form
(``{"f:spec": {"f:size": {}}}``): an update gives its manager the fields it changed and
takes them from the others; an apply gives its manager exactly the fields of its
configuration. An apply that would change a field another manager owns is refused with
kube's 409 conflict (unless ``force``), so no manager silently overwrites another's
field; a field an applier stops applying is removed unless someone else still owns it.
Maps are owned key by key; lists and scalars are owned whole (kube's default "atomic"
for custom resources without ``x-kubernetes-list-type``). Pure functions over JSON.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from controlplane.apiserver.errors import ApiError, Cause
from controlplane.apiserver.objects import now
from controlplane.apiserver.storage import Obj

Path = tuple[str, ...]
_TOP_SKIP = frozenset({"apiVersion", "kind", "metadata"})
_OWNED_METADATA = ("labels", "annotations")


def manager_from_user_agent(user_agent: str) -> str:
    """kube's default manager: the User-Agent up to its first '/' (128 characters at most)."""
    return user_agent.split("/", 1)[0][:128] or "unknown"


def _leaves(value: Any, prefix: Path, out: set[Path]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _leaves(item, (*prefix, str(key)), out)
    else:
        out.add(prefix)


def field_set(obj: Obj, subresource: str, status_split: bool) -> set[Path]:
    """The paths a write of ``obj`` at ``subresource`` can own."""
    paths: set[Path] = set()
    for key, value in obj.items():
        if key in _TOP_SKIP:
            continue
        if status_split and (key == "status") != (subresource == "status"):
            continue
        _leaves(value, (key,), paths)
    if subresource != "status":
        metadata = obj.get("metadata") or {}
        for key in _OWNED_METADATA:
            for name in metadata.get(key) or {}:
                paths.add(("metadata", key, name))
        if metadata.get("finalizers"):
            paths.add(("metadata", "finalizers"))
    return paths


def _get(obj: Any, path: Path) -> tuple[bool, Any]:
    node = obj
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _remove(obj: Any, path: Path) -> None:
    node = obj
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def from_fields_v1(tree: Any, prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    if not isinstance(tree, dict):
        return paths
    for key, sub in tree.items():
        if not key.startswith("f:"):
            continue  # ".", "k:{...}", "v:..." (not produced here) mean nothing to us
        path = (*prefix, key[2:])
        children = from_fields_v1(sub, path)
        paths.update(children or {path})
    return paths


def _entries(obj: Obj) -> list[dict[str, Any]]:
    return [dict(e) for e in (obj.get("metadata") or {}).get("managedFields") or []]


def _owned(entry: dict[str, Any]) -> set[Path]:
    return from_fields_v1(entry.get("fieldsV1") or {})


def _entry(
    manager: str, operation: str, api_version: str, subresource: str, paths: set[Path]
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields_v1(paths),
    }
    if subresource:
        entry["subresource"] = subresource
    return entry


def _same_owner(entry: dict[str, Any], manager: str, operation: str, subresource: str) -> bool:
    return (
        entry.get("manager") == manager
        and entry.get("operation") == operation
        and entry.get("subresource", "") == subresource
    )


def _finish(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("fieldsV1")]


def record_update(
    old: Obj | None,
    new: Obj,
    manager: str,
    *,
    subresource: str = "",
    status_split: bool = False,
) -> list[dict[str, Any]]:
    """managedFields after an update (or create) by ``manager``: it owns what it changed.

    Entries whose fields did not change are kept as they were (time included), so an
    update that changes nothing leaves managedFields equal too.
    """
    api_version = str(new.get("apiVersion", ""))
    new_paths = field_set(new, subresource, status_split)
    if old is None:  # a create: its manager owns everything it set
        if not new_paths:
            return []
        return [_entry(manager, "Update", api_version, subresource, new_paths)]
    old_obj = old
    changed = {p for p in new_paths if _get(old_obj, p) != _get(new, p)}
    live = field_set(new, "", False) | field_set(new, "status", False)
    mine: dict[str, Any] | None = None
    kept: list[dict[str, Any]] = []
    modified = bool(changed)
    for entry in _entries(old_obj):
        if _same_owner(entry, manager, "Update", subresource):
            mine = entry
            continue
        owned = _owned(entry)
        remaining = (owned & live) - changed  # fields that went away have no owner
        if remaining != owned:
            modified = True
            entry["fieldsV1"] = to_fields_v1(remaining) if remaining else {}
        kept.append(entry)
    owned_before = (_owned(mine) & live) if mine is not None else set()
    if not modified and (mine is None or owned_before == _owned(mine)):
        return _entries(old_obj)
    owned_now = owned_before | changed
    if owned_now:
        kept.append(_entry(manager, "Update", api_version, subresource, owned_now))
    return _finish(kept)


def _merge(live: Any, config: Any) -> Any:
    if isinstance(live, dict) and isinstance(config, dict):
        out = dict(live)
        for key, value in config.items():
            out[key] = _merge(live.get(key), value)
        return out
    return copy.deepcopy(config)


def _conflict_error(conflicts: list[tuple[dict[str, Any], Path]]) -> ApiError:
    def who(entry: dict[str, Any]) -> str:
        name = json.dumps(entry.get("manager", ""))
        if entry.get("operation") == "Update":
            return f"{name} using {entry.get('apiVersion', '')}"
        return name

    def dotted(path: Path) -> str:
        return "".join(f".{p}" for p in path)

    causes = [
        Cause("FieldManagerConflict", f"conflict with {who(e)}", dotted(p)) for e, p in conflicts
    ]
    if len(conflicts) == 1:
        entry, path = conflicts[0]
        message = f"Apply failed with 1 conflict: conflict with {who(entry)}: {dotted(path)}"
    else:
        by_manager: dict[str, list[str]] = {}
        for entry, path in conflicts:
            by_manager.setdefault(who(entry), []).append(dotted(path))
        lines: list[str] = []
        for name in sorted(by_manager):
            lines.append(f"conflicts with {name}:")
            lines.extend(f"- {p}" for p in by_manager[name])
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return ApiError(409, "Conflict", message, causes=causes)


def apply(
    live: Obj,
    config: Obj,
    manager: str,
    *,
    force: bool = False,
    subresource: str = "",
    status_split: bool = False,
) -> Obj:
    """The object after ``manager`` applies ``config``, with its managedFields.

    Raises the 409 conflict when ``config`` changes a field another manager owns.
    """
    applied = field_set(config, subresource, status_split)
    entries = _entries(live)
    conflicts: list[tuple[dict[str, Any], Path]] = []
    previous: set[Path] = set()
    for entry in entries:
        owned = _owned(entry)
        if _same_owner(entry, manager, "Apply", subresource):
            previous = owned
            continue
        for path in sorted(owned & applied):
            if _get(live, path) != _get(config, path):
                conflicts.append((entry, path))
    if conflicts and not force:
        raise _conflict_error(conflicts)
    taken = {p for _, p in conflicts}
    others: set[Path] = set()
    kept: list[dict[str, Any]] = []
    for entry in entries:
        if _same_owner(entry, manager, "Apply", subresource):
            continue
        owned = _owned(entry) - taken
        others |= owned
        entry["fieldsV1"] = to_fields_v1(owned) if owned else {}
        kept.append(entry)
    result = copy.deepcopy(live)
    for path in previous - applied - others:
        _remove(result, path)
    body = {k: v for k, v in config.items() if k not in _TOP_SKIP}
    if status_split:
        body = {k: v for k, v in body.items() if (k == "status") == (subresource == "status")}
    merged: Obj = _merge(result, body)
    result = merged
    config_meta = config.get("metadata") or {}
    metadata = result.setdefault("metadata", {})
    if subresource != "status":
        for key in (*_OWNED_METADATA, "finalizers"):
            if key in config_meta:
                metadata[key] = _merge(metadata.get(key), config_meta[key])
    api_version = str(config.get("apiVersion") or live.get("apiVersion", ""))
    mine = next((e for e in entries if _same_owner(e, manager, "Apply", subresource)), None)
    if mine is not None and previous == applied and not taken:
        kept.append(mine)  # the same fields again: the entry (and its time) stays
    else:
        kept.append(_entry(manager, "Apply", api_version, subresource, applied))
    metadata["managedFields"] = _finish(_in_original_order(kept, entries))
    return result


def _in_original_order(
    kept: list[dict[str, Any]], original: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    def position(entry: dict[str, Any]) -> int:
        for i, old in enumerate(original):
            if _same_owner(
                old,
                entry.get("manager", ""),
                entry.get("operation", ""),
                entry.get("subresource", ""),
            ):
                return i
        return len(original)

    return sorted(kept, key=position)
