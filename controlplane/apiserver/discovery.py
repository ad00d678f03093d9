"""Discovery documents: /version, /api, /apis, /apis/<g>/<v>, legacy and aggregated.

Built from the registry at request time, so a CRD is discovered as soon as it is served.
Aggregated discovery (apidiscovery.k8s.io/v2 APIGroupDiscoveryList) is sent only when the
Accept header asks for it, with its own Content-Type; otherwise the legacy documents.
"""

from __future__ import annotations

from typing import Any

from controlplane.apiserver.resources import Registry, Resource

GIT_VERSION = "v1.32.0"
AGGREGATED_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
AGGREGATED_V2BETA1 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"


def version() -> dict[str, Any]:
    return {
        "major": "1",
        "minor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "controlplane-local",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def aggregated_wanted(accept: str) -> str:
    """The aggregated media type the Accept header asks for, or ""."""
    for part in accept.split(","):
        params = {
            p.split("=", 1)[0].strip(): p.split("=", 1)[1].strip()
            for p in part.split(";")[1:]
            if "=" in p
        }
        if params.get("g") == "apidiscovery.k8s.io" and params.get("as") == "APIGroupDiscoveryList":
            if params.get("v") == "v2":
                return AGGREGATED_V2
            if params.get("v") == "v2beta1":
                return AGGREGATED_V2BETA1
    return ""


def api_versions() -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(registry: Registry) -> dict[str, Any]:
    groups = [_group(g, vs) for g, vs in sorted(registry.group_versions().items()) if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(registry: Registry, name: str) -> dict[str, Any] | None:
    versions = registry.group_versions().get(name)
    if not versions or not name:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}


def _legacy_resource(resource: Resource) -> list[dict[str, Any]]:
    main: dict[str, Any] = {
        "name": resource.plural,
        "singularName": resource.singular,
        "namespaced": resource.namespaced,
        "kind": resource.kind,
        "verbs": list(resource.verbs),
    }
    if resource.short_names:
        main["shortNames"] = list(resource.short_names)
    if resource.categories:
        main["categories"] = list(resource.categories)
    out = [main]
    if resource.status_subresource:
        out.append(
            {
                "name": f"{resource.plural}/status",
                "singularName": "",
                "namespaced": resource.namespaced,
                "kind": resource.kind,
                "verbs": ["get", "patch", "update"],
            }
        )
    if resource.scale is not None:
        out.append(
            {
                "name": f"{resource.plural}/scale",
                "singularName": "",
                "namespaced": resource.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }
        )
    return out


def resource_list(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    resources = sorted(registry.in_group_version(group, version), key=lambda r: r.plural)
    if not resources:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [entry for r in resources for entry in _legacy_resource(r)],
    }


def _aggregated_resource(resource: Resource) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resource": resource.plural,
        "responseKind": {"group": "", "version": "", "kind": resource.kind},
        "scope": "Namespaced" if resource.namespaced else "Cluster",
        "singularResource": resource.singular,
        "verbs": list(resource.verbs),
    }
    if resource.short_names:
        out["shortNames"] = list(resource.short_names)
    if resource.categories:
        out["categories"] = list(resource.categories)
    subresources = []
    if resource.status_subresource:
        subresources.append(
            {
                "subresource": "status",
                "responseKind": {"group": "", "version": "", "kind": resource.kind},
                "verbs": ["get", "patch", "update"],
            }
        )
    if resource.scale is not None:
        subresources.append(
            {
                "subresource": "scale",
                "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                "verbs": ["get", "patch", "update"],
            }
        )
    if subresources:
        out["subresources"] = subresources
    return out


def aggregated(registry: Registry, *, core: bool, media_type: str) -> dict[str, Any]:
    """/api (core) or /apis as an APIGroupDiscoveryList."""
    items: list[dict[str, Any]] = []
    for group, versions in sorted(registry.group_versions().items()):
        if (group == "") != core:
            continue
        entries = []
        for v in versions:
            resources = sorted(registry.in_group_version(group, v), key=lambda r: r.plural)
            entries.append(
                {
                    "version": v,
                    "resources": [_aggregated_resource(r) for r in resources],
                    "freshness": "Current",
                }
            )
        metadata: dict[str, Any] = {"creationTimestamp": None}
        if group:
            metadata["name"] = group
        items.append({"metadata": metadata, "versions": entries})
    api_version = "apidiscovery.k8s.io/" + ("v2" if media_type == AGGREGATED_V2 else "v2beta1")
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": api_version,
        "metadata": {},
        "items": items,
    }
