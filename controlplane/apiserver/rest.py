"""The verbs on stored objects: get, list, create, update, patch, delete.

Every write is one etcd transaction guarded by the mod revision the handler read, so a
write based on a stale read can never land: an update naming a stale resourceVersion gets
409 Conflict; a patch (which names none) is re-applied to the fresh object and retried. An
update that changes nothing writes nothing. A namespaced object is only created in a
namespace that exists. An object with finalizers is only marked (deletionTimestamp) by a
delete, and removed by the write that empties its finalizers.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.apiserver import crds, fieldmanager
from controlplane.apiserver.errors import (
    ApiError,
    Cause,
    already_exists,
    bad_request,
    conflict,
    invalid,
    not_found,
    success_status,
    unsupported_media,
)
from controlplane.apiserver.objects import (
    Checked,
    check_namespace,
    check_type,
    mark_deleted,
    prepare_create,
    prepare_update,
    unchanged,
    unknown_field_error,
)
from controlplane.apiserver.patch import (
    MERGE_KEYS,
    PatchError,
    json_patch,
    merge_patch,
    strategic_merge,
    strip_directives,
)
from controlplane.apiserver.resources import BUILTINS, NAMESPACES, SERVICES, Resource
from controlplane.apiserver.selectors import Selector
from controlplane.apiserver.services import ClusterIPs, complete_endpoint_slice, complete_service
from controlplane.apiserver.storage import Obj, ObjectStorage, WriteConflict

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"
_PATCH_RETRIES = 16


@dataclass(frozen=True)
class Target:
    resource: Resource
    namespace: str = ""
    name: str = ""
    subresource: str = ""

    @property
    def key(self) -> str:
        return self.resource.key(self.namespace, self.name)


@dataclass
class WriteOptions:
    field_validation: str = "Warn"
    dry_run: bool = False
    field_manager: str = ""
    """The fieldManager parameter, as given."""
    default_manager: str = "unknown"
    """The manager when none is given (kube: the User-Agent's product)."""
    force: bool = False
    applying: bool = False
    """The write is a server-side apply (its manager's operation is Apply)."""

    @property
    def manager(self) -> str:
        return self.field_manager or self.default_manager


@dataclass
class Result:
    body: Obj
    code: int = 200
    warnings: list[str] = field(default_factory=list)


CrdHook = Callable[[str, Obj | None], Awaitable[None]]


class Rest:
    """Object verbs over :class:`ObjectStorage`; ``on_crd`` serves or retires a CRD.

    ``namespaces`` holds the names the namespace watch has seen exist (as kube's
    NamespaceLifecycle admission uses an informer): a namespace found there needs no etcd
    read; one that is not there is looked up in etcd, so a new one is never refused.
    """

    def __init__(
        self,
        storage: ObjectStorage,
        on_crd: CrdHook,
        namespaces: set[str] | None = None,
        cluster_ips: ClusterIPs | None = None,
    ) -> None:
        self.storage = storage
        self.on_crd = on_crd
        self.namespaces = namespaces if namespaces is not None else set()
        self.cluster_ips = cluster_ips or ClusterIPs(storage)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, target: Target) -> Obj:
        obj = await self.storage.get(target.key)
        if obj is None:
            r = target.resource
            raise not_found(r.plural, r.group, target.name)
        return as_version(obj, target.resource)

    async def list_objects(
        self,
        target: Target,
        selector: Selector,
        *,
        limit: int = 0,
        token: str = "",
        revision: int = 0,
    ) -> tuple[list[Obj], int, str]:
        """Matching objects, the revision they were read at, and a continue token."""
        prefix = target.resource.list_prefix(target.namespace)
        items: list[Obj] = []
        while True:
            want = limit - len(items) if limit else 0
            page = await self.storage.list(prefix, limit=want, token=token, revision=revision)
            revision = page.revision
            items.extend(
                as_version(obj, target.resource) for obj in page.items if selector.matches(obj)
            )
            token = page.continue_token
            if not token or (limit and len(items) >= limit):
                return items, revision, token

    # -- writes ---------------------------------------------------------------------------

    async def _check_namespace_exists(self, target: Target) -> None:
        namespace = target.namespace
        if not (target.resource.namespaced and namespace) or namespace in self.namespaces:
            return
        if await self.storage.get(NAMESPACES.key("", namespace)) is None:
            raise not_found("namespaces", "", namespace)

    def _unknown(self, target: Target, checked: Checked, options: WriteOptions) -> list[str]:
        if not checked.unknown:
            return []
        if options.field_validation == "Strict":
            raise unknown_field_error(target.resource, checked.unknown)
        if options.field_validation == "Warn":
            return [f'unknown field "{path}"' for path in checked.unknown]
        return []

    async def create(self, target: Target, body: Any, options: WriteOptions) -> Result:
        resource = target.resource
        obj = check_type(resource, body)
        check_namespace(resource, obj, target.namespace)
        await self._check_namespace_exists(target)
        generated = not (obj["metadata"].get("name"))
        for _ in range(3 if generated else 1):
            # The body itself when it is used once; a copy to retry or to keep as applied.
            candidate = copy.deepcopy(obj) if generated or options.applying else obj
            checked = prepare_create(resource, candidate)
            warnings = self._unknown(target, checked, options)
            new = checked.obj
            self._complete_builtin(resource, new, None)
            new["metadata"]["managedFields"] = _created_fields(resource, obj, new, options)
            name = new["metadata"]["name"]
            key = resource.key(target.namespace, name)
            if resource is SERVICES:
                await self.cluster_ips.allocate(new, dry_run=options.dry_run)
            if options.dry_run:
                return Result(new, 201, warnings)
            try:
                stored = await self.storage.create(key, new)
            except WriteConflict:
                if resource is SERVICES:
                    await self.cluster_ips.release(new)
                if generated:
                    continue
                raise already_exists(resource.plural, resource.group, name) from None
            except BaseException:
                if resource is SERVICES:
                    await self.cluster_ips.release(new)
                raise
            if resource.kind == "CustomResourceDefinition":
                await self.on_crd(name, stored)
            return Result(as_version(stored, resource), 201, warnings)
        raise already_exists(resource.plural, resource.group, obj["metadata"].get("name", ""))

    def _complete_builtin(self, resource: Resource, obj: Obj, old: Obj | None) -> None:
        if resource.kind == "Namespace":
            name = obj["metadata"].get("name", "")
            labels = obj["metadata"].get("labels") or {}
            obj["metadata"]["labels"] = {**labels, "kubernetes.io/metadata.name": name}
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = (old or {}).get("status") or {"phase": "Active"}
        elif resource is SERVICES:
            complete_service(obj, old)
        elif resource.kind == "EndpointSlice":
            complete_endpoint_slice(obj, old)
        elif resource.kind == "CustomResourceDefinition":
            crds.default(obj)
            crds.check(obj)
            if old is not None:
                crds.check_update(obj, old)
            crds.establish(obj, old)

    async def update(self, target: Target, body: Any, options: WriteOptions) -> Result:
        resource = target.resource
        obj = check_type(resource, body)
        name = obj["metadata"].get("name")
        if name != target.name:
            raise bad_request(
                f"the name of the object ({name}) does not match the name on the URL "
                f"({target.name})"
            )
        check_namespace(resource, obj, target.namespace)
        wanted = obj["metadata"].get("resourceVersion")
        for _ in range(_PATCH_RETRIES):
            current = await self.storage.get(target.key)
            if current is None:
                raise not_found(resource.plural, resource.group, target.name)
            if not wanted and resource.custom:
                raise invalid(
                    resource.kind,
                    resource.group,
                    target.name,
                    [
                        Cause(
                            "FieldValueInvalid",
                            "Invalid value: 0x0: must be specified for an update",
                            "metadata.resourceVersion",
                        )
                    ],
                )
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise conflict(resource.plural, resource.group, target.name)
            try:
                return await self._write(target, obj, current, options)
            except WriteConflict:
                if wanted:
                    raise conflict(resource.plural, resource.group, target.name) from None
        raise conflict(resource.plural, resource.group, target.name)

    async def _write(
        self,
        target: Target,
        new: Obj,
        current: Obj,
        options: WriteOptions,
        managed: list[dict[str, Any]] | None = None,
    ) -> Result:
        """Store ``new`` over ``current`` (or delete it, when its last finalizer went).

        ``managed`` is the managedFields an apply computed; other writes record theirs here.
        """
        resource = target.resource
        checked = prepare_update(resource, new, current, subresource=target.subresource)
        warnings = self._unknown(target, checked, options)
        obj = checked.obj
        if not target.subresource:
            self._complete_builtin(resource, obj, current)
        if managed is None:
            managed = fieldmanager.record_update(
                current,
                obj,
                options.manager,
                subresource=target.subresource,
                status_split=resource.status_subresource,
            )
        obj["metadata"]["managedFields"] = managed
        if unchanged(obj, current):
            return Result(as_version(current, resource), 200, warnings)
        expected = int(current["metadata"]["resourceVersion"])
        metadata = obj["metadata"]
        if options.dry_run:
            return Result(as_version(obj, resource), 200, warnings)
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            revision = await self.storage.delete(target.key, expected)
            metadata["resourceVersion"] = str(revision)
            await self._after_delete(target, current)
            return Result(as_version(obj, resource), 200, warnings)
        stored = await self.storage.update(target.key, obj, expected)
        if resource.kind == "CustomResourceDefinition":
            await self.on_crd(target.name, stored)
        return Result(as_version(stored, resource), 200, warnings)

    async def patch(
        self, target: Target, content_type: str, patch: Any, options: WriteOptions
    ) -> Result:
        resource = target.resource
        merge_keys = MERGE_KEYS.get(resource.kind)
        if content_type == STRATEGIC:
            if resource.custom:
                raise unsupported_media(f"{JSON_PATCH}, {MERGE}, {APPLY}")
            if not isinstance(patch, dict):
                raise bad_request("a strategic merge patch must be a JSON object")
            if merge_keys is None:
                patch, content_type = strip_directives(patch), MERGE
        if content_type not in (MERGE, JSON_PATCH, APPLY, STRATEGIC):
            raise unsupported_media(f"{JSON_PATCH}, {MERGE}, {APPLY}, {STRATEGIC}")
        if content_type == APPLY:
            if not options.field_manager:
                raise invalid(
                    "PatchOptions",
                    "meta.k8s.io",
                    "",
                    [
                        Cause(
                            "FieldValueRequired",
                            "Required value: is required for apply patch",
                            "fieldManager",
                        )
                    ],
                )
            if not isinstance(patch, dict):
                raise bad_request("an apply patch must be an object")
            options = dataclasses.replace(options, applying=True)
        elif content_type == MERGE and not isinstance(patch, dict):
            raise bad_request("a merge patch must be a JSON object")
        for _ in range(_PATCH_RETRIES):
            current = await self.storage.get(target.key)
            if current is None:
                if content_type == APPLY and not target.subresource:
                    return await self.create(target, copy.deepcopy(patch), options)
                raise not_found(resource.plural, resource.group, target.name)
            managed: list[dict[str, Any]] | None = None
            try:
                if content_type == JSON_PATCH:
                    new = json_patch(current, patch)
                elif content_type == APPLY:
                    check_type(resource, copy.deepcopy(patch))
                    new = fieldmanager.apply(
                        current,
                        patch,
                        options.manager,
                        force=options.force,
                        subresource=target.subresource,
                        status_split=resource.status_subresource,
                    )
                    managed = new["metadata"]["managedFields"]
                elif content_type == STRATEGIC:
                    new = strategic_merge(current, patch, merge_keys or {})
                else:
                    new = merge_patch(current, patch)
            except PatchError as exc:
                raise ApiError(422, "Invalid", str(exc)) from None
            if not isinstance(new, dict):
                raise bad_request("the patched object is not an object")
            wanted = (new.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise conflict(resource.plural, resource.group, target.name)
            check_type(resource, new)
            try:
                return await self._write(target, new, current, options, managed)
            except WriteConflict:
                if names_version(content_type, patch):
                    raise conflict(resource.plural, resource.group, target.name) from None
                await asyncio.sleep(0)
        raise conflict(resource.plural, resource.group, target.name)

    async def delete(self, target: Target, options: Obj, dry_run: bool) -> Result:
        resource = target.resource
        preconditions = options.get("preconditions") or {}
        for _ in range(_PATCH_RETRIES):
            current = await self.storage.get(target.key)
            if current is None:
                raise not_found(resource.plural, resource.group, target.name)
            metadata = current["metadata"]
            uid, rv = preconditions.get("uid"), preconditions.get("resourceVersion")
            if uid and uid != metadata.get("uid"):
                raise conflict(
                    resource.plural,
                    resource.group,
                    target.name,
                    f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                    f"{metadata.get('uid')}",
                )
            if rv and rv != metadata.get("resourceVersion"):
                raise conflict(
                    resource.plural,
                    resource.group,
                    target.name,
                    f"Precondition failed: ResourceVersion in precondition: {rv}, "
                    f"ResourceVersion in object meta: {metadata.get('resourceVersion')}",
                )
            expected = int(metadata["resourceVersion"])
            if metadata.get("finalizers"):
                marked = mark_deleted(current)
                if marked == current or dry_run:
                    return Result(as_version(marked, resource), 200)
                try:
                    stored = await self.storage.update(target.key, marked, expected)
                except WriteConflict:
                    continue
                return Result(as_version(stored, resource), 200)
            if dry_run:
                return Result(
                    success_status(
                        target.name, resource.group, resource.plural, metadata.get("uid", "")
                    )
                )
            if resource.kind == "Namespace":
                self.namespaces.discard(target.name)  # no more creates in it from now on
                await self._delete_namespace_contents(target.name)
            elif resource.kind == "CustomResourceDefinition":
                await self._delete_crd_contents(current)
            try:
                await self.storage.delete(target.key, expected)
            except WriteConflict:
                continue
            await self._after_delete(target, current)
            if resource.kind == "Namespace":
                gone = mark_deleted(current)
                gone["status"] = {"phase": "Terminating"}
                return Result(gone, 200)
            return Result(
                success_status(
                    target.name, resource.group, resource.plural, metadata.get("uid", "")
                )
            )
        raise conflict(resource.plural, resource.group, target.name)

    async def _after_delete(self, target: Target, deleted: Obj) -> None:
        if target.resource.kind == "CustomResourceDefinition":
            await self.on_crd(target.name, None)
        elif target.resource is SERVICES:
            await self.cluster_ips.release(deleted)

    async def _delete_namespace_contents(self, namespace: str) -> None:
        prefixes = {r.storage_prefix for r in BUILTINS if r.namespaced}
        # Custom resources live under /registry/<group>/<plural>/<ns>/...; list the CRDs.
        crd_page = await self.storage.list(
            "/registry/apiextensions.k8s.io/customresourcedefinitions/"
        )
        for crd in crd_page.items:
            spec = crd.get("spec") or {}
            if spec.get("scope", "Namespaced") == "Namespaced":
                prefixes.add(
                    f"/registry/{spec.get('group')}/{(spec.get('names') or {}).get('plural')}/"
                )
        services = await self.storage.list(SERVICES.list_prefix(namespace))
        for prefix in prefixes:
            await self.storage.delete_prefix(f"{prefix}{namespace}/")
        for service in services.items:
            await self.cluster_ips.release(service)

    async def _delete_crd_contents(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        plural = (spec.get("names") or {}).get("plural")
        if spec.get("group") and plural:
            await self.storage.delete_prefix(f"/registry/{spec['group']}/{plural}/")


def as_version(obj: Obj, resource: Resource) -> Obj:
    """A stored object as the requested version (custom resources convert by renaming)."""
    if resource.custom and obj.get("apiVersion") != resource.api_version:
        obj = {**obj, "apiVersion": resource.api_version}
    return obj


def names_version(content_type: str, patch: Any) -> bool:
    """Whether the patch itself sets metadata.resourceVersion (a precondition)."""
    if content_type == JSON_PATCH:
        return isinstance(patch, list) and any(
            isinstance(op, dict) and op.get("path") == "/metadata/resourceVersion" for op in patch
        )
    return isinstance(patch, dict) and bool((patch.get("metadata") or {}).get("resourceVersion"))


def _created_fields(
    resource: Resource, body: Obj, created: Obj, options: WriteOptions
) -> list[dict[str, Any]]:
    """managedFields of a new object: its creator owns what it set (Apply or Update)."""
    if options.applying:
        applied = fieldmanager.apply(
            {"metadata": {}}, body, options.manager, status_split=resource.status_subresource
        )
        managed: list[dict[str, Any]] = applied["metadata"]["managedFields"]
        return managed
    return fieldmanager.record_update(
        None, created, options.manager, status_split=resource.status_subresource
    )
