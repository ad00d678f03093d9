"""What the server serves: one :class:`Resource` per (group, version, plural), and the registry.

Built-in kinds are fixed (Namespace, Event, Lease, CustomResourceDefinition, Service,
EndpointSlice); custom
resources come and go with their CRDs. Every served resource has one etcd key prefix
(``/registry/<group>/<plural>/``, kube's layout; core and coordination kinds keep kube's
historical ``/registry/<plural>/``), shared by all versions of a CRD. Nothing here talks to
etcd: the registry is an in-memory index rebuilt from the stored CRDs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

REGISTRY_ROOT = "/registry/"
VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
CRD_GROUP = "apiextensions.k8s.io"


@dataclass(frozen=True)
class Resource:
    """One served resource of one group-version."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    storage_prefix: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    custom: bool = False
    """A custom resource: schema-checked, no strategic merge patch."""
    schema: dict[str, Any] | None = None
    printer_columns: tuple[dict[str, Any], ...] = ()
    verbs: tuple[str, ...] = VERBS
    scale: dict[str, Any] | None = None
    """The version's ``subresources.scale`` (replica paths), when it has one."""
    selectable_fields: tuple[str, ...] = ()
    """Field labels a field selector may use beyond metadata.name/namespace."""
    deprecation: str = ""
    """The Warning every request of a deprecated version gets ("" when not deprecated)."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def key(self, namespace: str, name: str) -> str:
        if self.namespaced:
            return f"{self.storage_prefix}{namespace}/{name}"
        return f"{self.storage_prefix}{name}"

    def list_prefix(self, namespace: str) -> str:
        if self.namespaced and namespace:
            return f"{self.storage_prefix}{namespace}/"
        return self.storage_prefix


def _builtin(
    group: str,
    version: str,
    plural: str,
    kind: str,
    *,
    namespaced: bool,
    prefix: str,
    short: tuple[str, ...] = (),
    status: bool = False,
    categories: tuple[str, ...] = (),
) -> Resource:
    return Resource(
        group=group,
        version=version,
        plural=plural,
        singular=kind.lower(),
        kind=kind,
        namespaced=namespaced,
        storage_prefix=f"{REGISTRY_ROOT}{prefix}/",
        short_names=short,
        categories=categories,
        status_subresource=status,
    )


NAMESPACES = _builtin(
    "",
    "v1",
    "namespaces",
    "Namespace",
    namespaced=False,
    prefix="namespaces",
    short=("ns",),
    status=True,
)
EVENTS = _builtin("", "v1", "events", "Event", namespaced=True, prefix="events", short=("ev",))
LEASES = _builtin("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True, prefix="leases")
CRDS = _builtin(
    CRD_GROUP,
    "v1",
    "customresourcedefinitions",
    "CustomResourceDefinition",
    namespaced=False,
    prefix=f"{CRD_GROUP}/customresourcedefinitions",
    short=("crd", "crds"),
    status=True,
)
SERVICES = _builtin(
    "",
    "v1",
    "services",
    "Service",
    namespaced=True,
    prefix="services/specs",
    short=("svc",),
    status=True,
    categories=("all",),
)
ENDPOINT_SLICES = _builtin(
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    "EndpointSlice",
    namespaced=True,
    prefix="endpointslices",
)
BUILTINS = (NAMESPACES, EVENTS, LEASES, CRDS, SERVICES, ENDPOINT_SLICES)


def from_crd(crd: dict[str, Any]) -> list[Resource]:
    """The served versions of a CRD, one Resource each."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group", "")
    plural = names.get("plural", "")
    resources: list[Resource] = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        resources.append(
            Resource(
                group=group,
                version=version.get("name", ""),
                plural=plural,
                singular=names.get("singular") or names.get("kind", "").lower(),
                kind=names.get("kind", ""),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                storage_prefix=f"{REGISTRY_ROOT}{group}/{plural}/",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                status_subresource="status" in (version.get("subresources") or {}),
                scale=(version.get("subresources") or {}).get("scale"),
                custom=True,
                schema=schema if isinstance(schema, dict) else None,
                printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
                selectable_fields=tuple(
                    str(f.get("jsonPath", "")).lstrip(".")
                    for f in version.get("selectableFields") or ()
                    if isinstance(f, dict)
                ),
                deprecation=_deprecation(group, version, names.get("kind", "")),
            )
        )
    return resources


@dataclass
class Registry:
    """Served resources by (group, version, plural), with lookups for routing."""

    _by_gvr: dict[tuple[str, str, str], Resource] = field(default_factory=dict)
    _crds: dict[str, list[Resource]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for resource in BUILTINS:
            self._by_gvr[(resource.group, resource.version, resource.plural)] = resource

    def get(self, group: str, version: str, plural: str) -> Resource | None:
        return self._by_gvr.get((group, version, plural))

    def all(self) -> Iterator[Resource]:
        yield from self._by_gvr.values()

    def group_versions(self) -> dict[str, list[str]]:
        """Group → its versions, in the order kube lists them (preferred first)."""
        groups: dict[str, list[str]] = {}
        for resource in self._by_gvr.values():
            versions = groups.setdefault(resource.group, [])
            if resource.version not in versions:
                versions.append(resource.version)
        for versions in groups.values():
            versions.sort(key=_version_priority)
        return groups

    def in_group_version(self, group: str, version: str) -> list[Resource]:
        return [r for r in self._by_gvr.values() if r.group == group and r.version == version]

    def set_crd(self, name: str, crd: dict[str, Any] | None) -> None:
        """Serve ``crd``'s versions (None: stop serving what CRD ``name`` defined)."""
        for old in self._crds.pop(name, []):
            self._by_gvr.pop((old.group, old.version, old.plural), None)
        if crd is None:
            return
        resources = from_crd(crd)
        self._crds[name] = resources
        for resource in resources:
            self._by_gvr[(resource.group, resource.version, resource.plural)] = resource

    def crd_resources(self, name: str) -> list[Resource]:
        return list(self._crds.get(name, ()))


def _deprecation(group: str, version: dict[str, Any], kind: str) -> str:
    if not version.get("deprecated"):
        return ""
    default = f"{group}/{version.get('name', '')} {kind} is deprecated"
    return str(version.get("deprecationWarning") or default)


def _version_priority(version: str) -> tuple[int, int, int]:
    """kube's version order: GA > beta > alpha, higher numbers first."""
    import re

    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0)
    major, stage, minor = match.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0))
