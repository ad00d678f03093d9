"""CustomResourceDefinitions: checking them, their status, and what serving them takes.

A CRD is stored like any object; what is special is done here. Before it is stored it is
defaulted (singular, listKind) and checked (name = plural.group, one storage version,
structural schemas), and its status says the names are accepted and the CRD is
established, so it is served from the moment the create returns. Deleting a CRD deletes
every object of it first, so no custom resource can outlive its definition.
"""

from __future__ import annotations

from typing import Any

from controlplane.apiserver import schema as structural
from controlplane.apiserver.errors import Cause, invalid
from controlplane.apiserver.objects import now
from controlplane.apiserver.storage import Obj


def default(crd: Obj) -> None:
    spec = crd.setdefault("spec", {})
    names = spec.setdefault("names", {})
    kind = names.get("kind") or ""
    names.setdefault("singular", kind.lower())
    names.setdefault("listKind", f"{kind}List")
    spec.setdefault("scope", "Namespaced")
    spec.setdefault("conversion", {"strategy": "None"})
    for version in spec.get("versions") or []:
        if isinstance(version, dict):
            version.setdefault("served", True)
            version.setdefault("storage", False)


def check(crd: Obj) -> None:
    """422 Invalid unless the CRD is one this server can serve."""
    name = (crd.get("metadata") or {}).get("name", "")
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    causes: list[Cause] = []
    group, plural = spec.get("group"), names.get("plural")
    if not group:
        causes.append(Cause("FieldValueRequired", "Required value", "spec.group"))
    if not plural:
        causes.append(Cause("FieldValueRequired", "Required value", "spec.names.plural"))
    if not names.get("kind"):
        causes.append(Cause("FieldValueRequired", "Required value", "spec.names.kind"))
    if group and plural and name != f"{plural}.{group}":
        causes.append(
            Cause(
                "FieldValueInvalid",
                f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
                "metadata.name",
            )
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(
            Cause(
                "FieldValueNotSupported",
                f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", '
                '"Namespaced"',
                "spec.scope",
            )
        )
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        causes.append(
            Cause(
                "FieldValueRequired",
                "Required value: must have exactly one version marked as storage version",
                "spec.versions",
            )
        )
        versions = []
    storage = [v for v in versions if isinstance(v, dict) and v.get("storage")]
    if versions and len(storage) != 1:
        causes.append(
            Cause(
                "FieldValueInvalid",
                "Invalid value: must have exactly one version marked as storage version",
                "spec.versions",
            )
        )
    for i, version in enumerate(versions):
        schema = ((version or {}).get("schema") or {}).get("openAPIV3Schema")
        causes.extend(
            structural.check_structural(schema, f"spec.versions[{i}].schema.openAPIV3Schema")
        )
    if causes:
        raise invalid("CustomResourceDefinition", "apiextensions.k8s.io", name, causes)


def check_update(crd: Obj, old: Obj) -> None:
    """422 when an update changes what kube keeps fixed: the scope."""
    scope, old_scope = (crd.get("spec") or {}).get("scope"), (old.get("spec") or {}).get("scope")
    if old_scope and scope != old_scope:
        name = (crd.get("metadata") or {}).get("name", "")
        cause = Cause(
            "FieldValueInvalid", f'Invalid value: "{scope}": field is immutable', "spec.scope"
        )
        raise invalid("CustomResourceDefinition", "apiextensions.k8s.io", name, [cause])


def _condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "lastTransitionTime": now(),
        "reason": reason,
        "message": message,
    }


def establish(crd: Obj, previous: Obj | None = None) -> None:
    """Set the status a CRD has once its names are accepted and it is served."""
    spec = crd.get("spec") or {}
    names = dict(spec.get("names") or {})
    old_status = (previous or {}).get("status") or {}
    conditions = old_status.get("conditions") or [
        _condition("NamesAccepted", "NoConflicts", "no conflicts found"),
        _condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
    ]
    stored = list(old_status.get("storedVersions") or [])
    for version in spec.get("versions") or []:
        if version.get("storage") and version.get("name") not in stored:
            stored.append(version.get("name"))
    crd["status"] = {"acceptedNames": names, "conditions": conditions, "storedVersions": stored}
