"""The local Kubernetes API server over HTTP: wire details real clients depend on.

Each test runs a KubeServer on a real embedded etcd and checks responses as kube-apiserver
gives them (codes, Status bodies, resourceVersions, discovery, watch framing).
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from controlplane.apiserver import KubeServer, KubeServerSettings

pytest.register_assert_rewrite("tests.kube_fixtures")
from tests.kube_fixtures import (  # noqa: E402
    GADGET_CRD,
    READ_ONLY_TOKEN,
    WIDGET_CRD,
    WIDGETS,
    KubeClient,
    eventually,
    widget,
)

pytest_plugins = ["tests.kube_fixtures"]

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def _status(reply: Any, code: int, reason: str) -> None:
    assert reply.status == code, reply.body
    assert reply.body["kind"] == "Status" and reply.body["status"] == "Failure", reply.body
    assert reply.body["code"] == code and reply.body["reason"] == reason, reply.body


async def test_discovery_and_openapi(widgets: KubeClient) -> None:
    client = widgets
    crd = (await client.get(f"{CRDS}/widgets.example.com")).body
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    assert crd["status"]["acceptedNames"]["kind"] == "Widget"

    assert (await client.get("/version")).body["major"] == "1"
    assert (await client.get("/api")).body["versions"] == ["v1"]
    groups = (await client.get("/apis")).body
    assert groups["kind"] == "APIGroupList"
    names = {g["name"]: g["preferredVersion"]["version"] for g in groups["groups"]}
    assert names["example.com"] == "v1" and "coordination.k8s.io" in names

    resources = (await client.get("/apis/example.com/v1")).body
    by_name = {r["name"]: r for r in resources["resources"]}
    assert by_name["widgets"]["kind"] == "Widget" and by_name["widgets"]["namespaced"] is True
    assert by_name["widgets"]["shortNames"] == ["wd"]
    assert by_name["widgets"]["singularName"] == "widget"
    assert "watch" in by_name["widgets"]["verbs"]
    assert by_name["widgets/status"]["verbs"] == ["get", "patch", "update"]

    legacy = await client.get("/apis")
    assert legacy.headers["Content-Type"].startswith("application/json")
    accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
    aggregated = await client.get("/apis", headers={"Accept": accept})
    assert aggregated.headers["Content-Type"] == (
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    )
    assert aggregated.body["kind"] == "APIGroupDiscoveryList"
    group = next(i for i in aggregated.body["items"] if i["metadata"].get("name") == "example.com")
    widget_entry = group["versions"][0]["resources"][0]
    assert widget_entry["resource"] == "widgets" and widget_entry["scope"] == "Namespaced"
    assert widget_entry["subresources"][0]["subresource"] == "status"

    root = (await client.get("/openapi/v3")).body
    url = root["paths"]["apis/example.com/v1"]["serverRelativeURL"]
    assert "api/v1" in root["paths"]
    document = (await client.get(url)).body
    item = document["paths"]["/apis/example.com/v1/namespaces/{namespace}/widgets/{name}"]
    assert item["patch"]["x-kubernetes-group-version-kind"]["kind"] == "Widget"
    assert "fieldValidation" in {p["name"] for p in item["patch"]["parameters"]}
    assert "application/strategic-merge-patch+json" not in item["patch"]["requestBody"]["content"]
    assert "com.example.v1.Widget" in document["components"]["schemas"]

    _status(await client.get("/apis/nothing.io/v1/things"), 404, "NotFound")
    _status(await client.get("/api/v1/pods"), 404, "NotFound")
    _status(await client.get("/nonsense"), 404, "NotFound")


async def test_access_needs_a_token_and_a_writer(kube: KubeServer, client: KubeClient) -> None:
    anonymous = KubeClient(kube, token="")
    wrong = KubeClient(kube, token="not-a-token")
    viewer = KubeClient(kube, token=READ_ONLY_TOKEN)
    try:
        _status(await anonymous.get("/api/v1/namespaces"), 401, "Unauthorized")
        _status(await wrong.get("/api/v1/namespaces"), 401, "Unauthorized")
        assert (await viewer.get("/api/v1/namespaces")).status == 200
        denied = await viewer.post(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
        )
        _status(denied, 403, "Forbidden")
        assert 'User "viewer" cannot create resource "namespaces"' in denied.body["message"]
        assert (await anonymous.get("/healthz")).status == 200
    finally:
        for c in (anonymous, wrong, viewer):
            await c.close()


async def test_create_get_update_conflicts_and_generation(widgets: KubeClient) -> None:
    client = widgets
    created = await client.post(WIDGETS, widget("w1", labels=None) | {"status": {"phase": "x"}})
    assert created.status == 201, created.body
    meta = created.body["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
    assert "status" not in created.body  # the status subresource owns status
    assert created.body["spec"]["shape"] == "round"  # defaulted
    rv = meta["resourceVersion"]

    _status(await client.post(WIDGETS, widget("w1")), 409, "AlreadyExists")
    generated = await client.post(WIDGETS, {**widget(""), "metadata": {"generateName": "gen-"}})
    assert generated.status == 201 and generated.body["metadata"]["name"].startswith("gen-")
    assert len(generated.body["metadata"]["name"]) == len("gen-") + 5

    current = (await client.get(f"{WIDGETS}/w1")).body
    assert current["metadata"]["resourceVersion"] == rv

    # Unchanged update: nothing is written, the resourceVersion stays.
    same = await client.put(f"{WIDGETS}/w1", current)
    assert same.status == 200 and same.body["metadata"]["resourceVersion"] == rv

    labelled = copy.deepcopy(current)
    labelled["metadata"]["labels"] = {"a": "b"}
    labelled_reply = await client.put(f"{WIDGETS}/w1", labelled)
    assert labelled_reply.body["metadata"]["generation"] == 1  # metadata only: no bump
    assert int(labelled_reply.body["metadata"]["resourceVersion"]) > int(rv)

    stale = copy.deepcopy(current)  # still carries the old resourceVersion
    stale["spec"]["size"] = 4
    conflict = await client.put(f"{WIDGETS}/w1", stale)
    _status(conflict, 409, "Conflict")
    assert "the object has been modified" in conflict.body["message"]

    missing_rv = copy.deepcopy(stale)
    del missing_rv["metadata"]["resourceVersion"]
    _status(await client.put(f"{WIDGETS}/w1", missing_rv), 422, "Invalid")

    fresh = labelled_reply.body
    fresh["spec"]["size"] = 5
    fresh["status"] = {"phase": "ignored"}
    bumped = await client.put(f"{WIDGETS}/w1", fresh)
    assert bumped.body["metadata"]["generation"] == 2
    assert "status" not in bumped.body

    status = copy.deepcopy(bumped.body)
    status["status"] = {"phase": "Ready"}
    status["spec"]["size"] = 99  # ignored by the status endpoint
    written = await client.put(f"{WIDGETS}/w1/status", status)
    assert written.status == 200, written.body
    assert written.body["status"] == {"phase": "Ready"} and written.body["spec"]["size"] == 5
    assert written.body["metadata"]["generation"] == 2
    _status(await client.put(f"{WIDGETS}/nope", widget("nope")), 404, "NotFound")
    _status(await client.put(f"{WIDGETS}/w1", widget("other")), 400, "BadRequest")
    _status(await client.get(f"{WIDGETS}/nope"), 404, "NotFound")


async def test_patches(widgets: KubeClient) -> None:
    client = widgets
    await client.post(WIDGETS, widget("p", color="red", tags=["a"]))
    merged = await client.patch(f"{WIDGETS}/p", {"spec": {"color": None, "size": 7}}, MERGE)
    assert merged.status == 200, merged.body
    assert "color" not in merged.body["spec"] and merged.body["spec"]["size"] == 7
    assert merged.body["metadata"]["generation"] == 2

    ops = [
        {"op": "add", "path": "/spec/tags/-", "value": "b"},
        {"op": "replace", "path": "/spec/size", "value": 8},
    ]
    patched = await client.patch(f"{WIDGETS}/p", ops, JSON_PATCH)
    assert patched.body["spec"]["tags"] == ["a", "b"] and patched.body["spec"]["size"] == 8
    failed = await client.patch(
        f"{WIDGETS}/p", [{"op": "test", "path": "/spec/size", "value": 1}], JSON_PATCH
    )
    _status(failed, 422, "Invalid")
    strategic = await client.patch(
        f"{WIDGETS}/p", {"spec": {"size": 2}}, "application/strategic-merge-patch+json"
    )
    _status(strategic, 415, "UnsupportedMediaType")
    stale = {"metadata": {"resourceVersion": "1"}, "spec": {"size": 3}}
    _status(await client.patch(f"{WIDGETS}/p", stale, MERGE), 409, "Conflict")
    invalid = await client.patch(f"{WIDGETS}/p", {"spec": {"size": 1000}}, MERGE)
    _status(invalid, 422, "Invalid")
    status = await client.patch(f"{WIDGETS}/p/status", {"status": {"phase": "Up"}}, MERGE)
    assert status.body["status"] == {"phase": "Up"}
    _status(await client.patch(f"{WIDGETS}/none", {"spec": {}}, MERGE), 404, "NotFound")

    applied = await client.patch(
        f"{WIDGETS}/ssa",
        widget("ssa", 4),
        "application/apply-patch+yaml",
        params={"fieldManager": "test"},
    )
    assert applied.status == 201, applied.body
    no_manager = await client.patch(
        f"{WIDGETS}/ssa", widget("ssa", 5), "application/apply-patch+yaml"
    )
    _status(no_manager, 422, "Invalid")


async def test_validation_pruning_and_field_validation(widgets: KubeClient) -> None:
    client = widgets
    bad = await client.post(WIDGETS, widget("bad", 0, color="pink", name="ABC"))
    _status(bad, 422, "Invalid")
    fields = {c["field"]: c["reason"] for c in bad.body["details"]["causes"]}
    assert fields == {
        "spec.size": "FieldValueInvalid",
        "spec.color": "FieldValueNotSupported",
        "spec.name": "FieldValueInvalid",
    }
    typed = await client.post(WIDGETS, widget("typed", "three"))  # type: ignore[arg-type]
    _status(typed, 422, "Invalid")
    assert typed.body["details"]["causes"][0]["field"] == "spec.size"
    required = await client.post(WIDGETS, {**widget("req"), "spec": {"color": "red"}})
    assert required.body["details"]["causes"] == [
        {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.size"}
    ]
    long_name = await client.post(WIDGETS, widget("long", name="abcdefghijkl"))
    _status(long_name, 422, "Invalid")

    strict = await client.post(WIDGETS, widget("s", bogus=1), params={"fieldValidation": "Strict"})
    _status(strict, 400, "BadRequest")
    assert 'unknown field "spec.bogus"' in strict.body["message"]
    warned = await client.post(WIDGETS, widget("w", bogus=1, extra={"any": {"thing": 1}}))
    assert warned.status == 201
    assert 'unknown field \\"spec.bogus\\"' in warned.headers["Warning"]
    assert "bogus" not in warned.body["spec"]  # pruned
    assert warned.body["spec"]["extra"] == {"any": {"thing": 1}}  # preserved
    ignored = await client.post(WIDGETS, widget("i", bogus=1), params={"fieldValidation": "Ignore"})
    assert ignored.status == 201 and "Warning" not in ignored.headers

    bad_label = {**widget("lbl"), "metadata": {"name": "lbl", "labels": {"ok": "not ok!"}}}
    label_reply = await client.post(WIDGETS, bad_label)
    _status(label_reply, 422, "Invalid")
    assert label_reply.body["details"]["causes"][0]["field"] == "metadata.labels"
    bad_key = {**widget("key"), "metadata": {"name": "key", "annotations": {"a b": "x"}}}
    _status(await client.post(WIDGETS, bad_key), 422, "Invalid")
    stored = (await client.get(f"{WIDGETS}/w")).body
    stored["metadata"]["uid"] = "another-uid"
    uid_change = await client.put(f"{WIDGETS}/w", stored)
    _status(uid_change, 422, "Invalid")
    assert uid_change.body["details"]["causes"][0]["field"] == "metadata.uid"

    bad_crd = copy.deepcopy(WIDGET_CRD)
    bad_crd["metadata"]["name"] = "wrong.example.com"
    _status(await client.post(CRDS, bad_crd), 422, "Invalid")
    rescoped = await client.patch(
        f"{CRDS}/widgets.example.com", {"spec": {"scope": "Cluster"}}, MERGE
    )
    _status(rescoped, 422, "Invalid")


async def test_delete_preconditions_finalizers_and_namespaces(widgets: KubeClient) -> None:
    client = widgets
    obj = (
        await client.post(
            WIDGETS, {**widget("f"), "metadata": {"name": "f", "finalizers": ["example.com/hold"]}}
        )
    ).body
    wrong_uid = await client.delete(f"{WIDGETS}/f", {"preconditions": {"uid": "nope"}})
    _status(wrong_uid, 409, "Conflict")
    assert "Precondition failed: UID" in wrong_uid.body["message"]
    wrong_rv = await client.delete(f"{WIDGETS}/f", {"preconditions": {"resourceVersion": "1"}})
    _status(wrong_rv, 409, "Conflict")

    marked = await client.delete(f"{WIDGETS}/f", {"preconditions": {"uid": obj["metadata"]["uid"]}})
    assert marked.status == 200 and marked.body["metadata"]["deletionTimestamp"]
    assert (await client.get(f"{WIDGETS}/f")).status == 200  # held by its finalizer
    gone = await client.patch(f"{WIDGETS}/f", {"metadata": {"finalizers": None}}, MERGE)
    assert gone.status == 200
    _status(await client.get(f"{WIDGETS}/f"), 404, "NotFound")

    await client.post(WIDGETS, widget("plain"))
    deleted = await client.delete(f"{WIDGETS}/plain")
    assert deleted.body["status"] == "Success" and deleted.body["details"]["name"] == "plain"
    _status(await client.delete(f"{WIDGETS}/plain"), 404, "NotFound")

    missing = await client.post("/apis/example.com/v1/namespaces/nowhere/widgets", widget("x"))
    _status(missing, 404, "NotFound")
    assert missing.body["message"] == 'namespaces "nowhere" not found'
    names = {n["metadata"]["name"] for n in (await client.get("/api/v1/namespaces")).body["items"]}
    assert {"default", "kube-system"} <= names
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}
    assert (await client.post("/api/v1/namespaces", ns)).body["status"] == {"phase": "Active"}
    assert (
        await client.post("/apis/example.com/v1/namespaces/team/widgets", widget("t"))
    ).status == 201
    await client.delete("/api/v1/namespaces/team")
    _status(await client.get("/apis/example.com/v1/namespaces/team/widgets/t"), 404, "NotFound")

    assert (await client.post(CRDS, copy.deepcopy(GADGET_CRD))).status == 201
    gadget = {
        "apiVersion": "example.com/v1",
        "kind": "Gadget",
        "metadata": {"name": "g"},
        "anything": {"goes": True},
    }
    assert (await client.post("/apis/example.com/v1/gadgets", gadget)).status == 201
    assert (await client.get("/apis/example.com/v1/gadgets/g")).body["anything"] == {"goes": True}
    await client.delete(f"{CRDS}/gadgets.example.com")
    _status(await client.get("/apis/example.com/v1/gadgets/g"), 404, "NotFound")


async def test_builtin_kinds(client: KubeClient) -> None:
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a"},
    }
    path = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
    created = await client.post(path, lease)
    assert created.status == 201
    taken = copy.deepcopy(created.body)
    taken["spec"]["holderIdentity"] = "b"
    assert (await client.put(f"{path}/leader", taken)).body["spec"]["holderIdentity"] == "b"
    _status(await client.put(f"{path}/leader", taken), 409, "Conflict")  # stale
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e1"},
        "reason": "Tested",
        "message": "hello",
        "involvedObject": {"kind": "Pod"},
    }
    assert (await client.post("/api/v1/namespaces/default/events", event)).status == 201
    events = (await client.get("/api/v1/namespaces/default/events")).body
    assert [e["reason"] for e in events["items"]] == ["Tested"]
    # The field labels kubectl describe uses to find an object's events.
    about = "involvedObject.kind=Pod,involvedObject.name="
    assert (
        await client.get("/api/v1/namespaces/default/events", params={"fieldSelector": about})
    ).body["items"]
    other = {"fieldSelector": "involvedObject.kind=Node"}
    assert (await client.get("/api/v1/namespaces/default/events", params=other)).body["items"] == []


async def test_bad_input_is_a_status(widgets: KubeClient) -> None:
    client = widgets
    _status(await client.post(WIDGETS, None, raw=b"{not json"), 400, "BadRequest")
    _status(
        await client.post(WIDGETS, None, raw=b"a: [b", content_type="application/yaml"),
        400,
        "BadRequest",
    )
    _status(await client.post(WIDGETS, [1, 2]), 400, "BadRequest")
    wrong_kind = {**widget("k"), "kind": "Gizmo"}
    _status(await client.post(WIDGETS, wrong_kind), 400, "BadRequest")
    _status(
        await client.post(WIDGETS, {**widget("v"), "apiVersion": "example.com/v9"}),
        400,
        "BadRequest",
    )
    laughs = b"a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    _status(
        await client.post(WIDGETS, None, raw=laughs, content_type="application/yaml"),
        400,
        "BadRequest",
    )
    deep = b'{"a":' * 3000 + b"1" + b"}" * 3000
    _status(await client.post(WIDGETS, None, raw=deep), 400, "BadRequest")
    _status(await client.post(WIDGETS, None, raw=b'{"a":"\xff"}'), 400, "BadRequest")
    protobuf = "application/vnd.kubernetes.protobuf"
    _status(
        await client.post(WIDGETS, None, raw=b"k8s\x00\x0a\x02", content_type=protobuf),
        415,
        "UnsupportedMediaType",
    )
    huge = b'{"x":"' + b"a" * (4 * 1024 * 1024) + b'"}'
    _status(await client.post(WIDGETS, None, raw=huge), 413, "RequestEntityTooLarge")
    yaml_body = b"apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: y}\nspec: {size: 2}\n"
    assert (
        await client.post(WIDGETS, None, raw=yaml_body, content_type="application/yaml")
    ).status == 201
    _status(await client.request("OPTIONS", "/apis"), 405, "MethodNotAllowed")


async def test_list_pages_selectors_and_resource_versions(
    kube: KubeServer, widgets: KubeClient
) -> None:
    client = widgets
    revisions = []
    for i, (env, tier) in enumerate(
        [("prod", "a"), ("prod", "b"), ("dev", "a"), ("dev", None), ("test", "c")]
    ):
        labels = {"env": env} | ({"tier": tier} if tier else {})
        body = {**widget(f"w{i}"), "metadata": {"name": f"w{i}", "labels": labels}}
        revisions.append(
            int((await client.post(WIDGETS, body)).body["metadata"]["resourceVersion"])
        )

    async def names(**params: str) -> list[str]:
        reply = await client.get(WIDGETS, params=params)
        assert reply.status == 200, reply.body
        return [i["metadata"]["name"] for i in reply.body["items"]]

    assert await names(labelSelector="env=prod") == ["w0", "w1"]
    assert await names(labelSelector="env==dev") == ["w2", "w3"]
    assert await names(labelSelector="env!=prod") == ["w2", "w3", "w4"]
    assert await names(labelSelector="env in (dev,test)") == ["w2", "w3", "w4"]
    assert await names(labelSelector="env notin (dev,test)") == ["w0", "w1"]
    assert await names(labelSelector="tier") == ["w0", "w1", "w2", "w4"]
    assert await names(labelSelector="!tier") == ["w3"]
    assert await names(labelSelector="env=prod,tier=b") == ["w1"]
    assert await names(fieldSelector="metadata.name=w2") == ["w2"]
    assert await names(fieldSelector="metadata.name!=w2,metadata.namespace=default") == [
        "w0",
        "w1",
        "w3",
        "w4",
    ]
    _status(await client.get(WIDGETS, params={"fieldSelector": "spec.size=3"}), 400, "BadRequest")

    listed = await client.get(WIDGETS)
    assert int(listed.body["metadata"]["resourceVersion"]) >= revisions[-1]
    assert listed.body["kind"] == "WidgetList"

    pages: list[str] = []
    token = first_rv = ""
    while True:
        params = {"limit": "2"} | ({"continue": token} if token else {})
        page = await client.get(WIDGETS, params=params)
        pages.extend(i["metadata"]["name"] for i in page.body["items"])
        if token:  # every page is read at the first page's revision
            assert page.body["metadata"]["resourceVersion"] == first_rv
        else:
            first_rv = page.body["metadata"]["resourceVersion"]
        token = page.body["metadata"].get("continue", "")
        if not token:
            break
        await client.delete(f"{WIDGETS}/w4") if len(pages) == 2 else None
    assert pages == ["w0", "w1", "w2", "w3", "w4"]  # w4's delete came after the first page

    old = await client.get(
        WIDGETS, params={"resourceVersion": str(revisions[1]), "resourceVersionMatch": "Exact"}
    )
    assert [i["metadata"]["name"] for i in old.body["items"]] == ["w0", "w1"]
    assert old.body["metadata"]["resourceVersion"] == str(revisions[1])
    assert (await client.get(WIDGETS, params={"resourceVersion": "0"})).status == 200
    _status(await client.get(WIDGETS, params={"resourceVersionMatch": "Exact"}), 400, "BadRequest")

    first = await client.get(WIDGETS, params={"limit": "2"})
    assert kube.backend is not None
    await client.post(WIDGETS, widget("later"))
    await kube.backend.compact(await kube.backend.current_revision())
    expired = await client.get(
        WIDGETS, params={"limit": "2", "continue": first.body["metadata"]["continue"]}
    )
    _status(expired, 410, "Expired")
    gone = await client.get(
        WIDGETS, params={"resourceVersion": str(revisions[1]), "resourceVersionMatch": "Exact"}
    )
    _status(gone, 410, "Expired")


async def test_table_rendering(widgets: KubeClient) -> None:
    client = widgets
    await client.post(WIDGETS, widget("t1", 4, color="green"))
    accept = (
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;"
        "g=meta.k8s.io,application/json"
    )
    table = (await client.get(WIDGETS, headers={"Accept": accept})).body
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Size", "Color"]
    assert table["rows"][0]["cells"] == ["t1", 4, "green"]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    await client.post(CRDS, copy.deepcopy(GADGET_CRD))
    await client.post(
        "/apis/example.com/v1/gadgets",
        {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}},
    )
    gadgets = (await client.get("/apis/example.com/v1/gadgets", headers={"Accept": accept})).body
    assert [c["name"] for c in gadgets["columnDefinitions"]] == ["Name", "Age"]
    assert gadgets["rows"][0]["cells"][0] == "g"
    assert gadgets["rows"][0]["cells"][1].endswith("s")


async def test_watch(kube: KubeServer, widgets: KubeClient) -> None:
    client = widgets
    first = (await client.post(WIDGETS, widget("a"))).body
    rv = first["metadata"]["resourceVersion"]

    # One change before the watch connects (replayed from the watch cache), two after.
    await client.patch(f"{WIDGETS}/a", {"spec": {"size": 9}}, MERGE)
    cache = kube.caches["/registry/example.com/widgets/"]
    watching = asyncio.create_task(
        client.watch(WIDGETS, {"resourceVersion": rv}, until=lambda e: len(e) >= 3)
    )
    await eventually(lambda: _subscribers(cache, 1), message="the watch connected")
    await client.post(WIDGETS, widget("b"))
    await client.delete(f"{WIDGETS}/a")
    events = await watching
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"),
        ("ADDED", "b"),
        ("DELETED", "a"),
    ]
    revisions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert revisions == sorted(revisions) and revisions[0] > int(rv)

    # Without a resourceVersion: the current state first, as ADDED.
    current = await client.watch(WIDGETS, {}, until=lambda e: len(e) >= 1)
    assert current[0]["type"] == "ADDED" and current[0]["object"]["metadata"]["name"] == "b"

    bookmarks = await client.watch(
        WIDGETS,
        {"resourceVersion": str(revisions[-1]), "allowWatchBookmarks": "true"},
        until=lambda e: any(x["type"] == "BOOKMARK" for x in e),
    )
    mark = bookmarks[-1]["object"]
    assert mark["kind"] == "Widget" and int(mark["metadata"]["resourceVersion"]) >= revisions[-1]

    initial = await client.watch(
        WIDGETS,
        {
            "sendInitialEvents": "true",
            "resourceVersionMatch": "NotOlderThan",
            "allowWatchBookmarks": "true",
        },
        until=lambda e: any(x["type"] == "BOOKMARK" for x in e),
    )
    assert [e["type"] for e in initial] == ["ADDED", "BOOKMARK"]
    end = initial[-1]["object"]["metadata"]
    assert end["annotations"] == {"k8s.io/initial-events-end": "true"}

    timed = await client.watch(
        WIDGETS,
        {"resourceVersion": str(revisions[-1]), "timeoutSeconds": "1"},
        until=lambda e: False,
    )
    assert timed == []  # the server ended the stream after timeoutSeconds

    # Selectors see an object leave their set as a DELETED event.
    labelled = {**widget("l"), "metadata": {"name": "l", "labels": {"keep": "yes"}}}
    start = (await client.post(WIDGETS, labelled)).body["metadata"]["resourceVersion"]
    await client.patch(f"{WIDGETS}/l", {"metadata": {"labels": {"keep": "no"}}}, MERGE)
    selected = await client.watch(
        WIDGETS,
        {"resourceVersion": start, "labelSelector": "keep=yes"},
        until=lambda e: len(e) >= 1,
    )
    assert selected[0]["type"] == "DELETED" and selected[0]["object"]["metadata"]["name"] == "l"

    assert kube.backend is not None
    await kube.backend.compact(await kube.backend.current_revision())
    expired = await client.watch(WIDGETS, {"resourceVersion": rv}, until=lambda e: False)
    assert len(expired) == 1 and expired[0]["type"] == "ERROR"
    assert expired[0]["object"]["code"] == 410 and expired[0]["object"]["reason"] == "Expired"


async def test_one_etcd_watch_per_resource(kube: KubeServer, widgets: KubeClient) -> None:
    client = widgets
    rv = (await client.post(WIDGETS, widget("fan"))).body["metadata"]["resourceVersion"]
    caches_before = dict(kube.caches)
    cache = kube.caches["/registry/example.com/widgets/"]
    watchers = [
        asyncio.create_task(
            client.watch(WIDGETS, {"resourceVersion": rv}, until=lambda e: len(e) >= 1)
        )
        for _ in range(10)
    ]
    await eventually(lambda: _subscribers(cache, 10), message="10 client watches")
    await client.patch(f"{WIDGETS}/fan", {"spec": {"size": 6}}, MERGE)
    results = await asyncio.gather(*watchers)
    assert all(r[0]["object"]["spec"]["size"] == 6 for r in results)
    assert kube.caches == caches_before  # no new etcd watch for more clients


async def _subscribers(cache: Any, count: int) -> bool:
    return len(cache._subscribers) >= count


async def test_server_side_apply_owns_fields(widgets: KubeClient) -> None:
    client = widgets
    path = f"{WIDGETS}/ssa"

    async def apply(manager: str, spec: dict[str, Any], **params: str) -> Any:
        body = {**widget("ssa"), "spec": spec}
        return await client.patch(path, body, APPLY, params={"fieldManager": manager, **params})

    created = await apply("alice", {"size": 2, "color": "red"})
    assert created.status == 201, created.body
    managed = created.body["metadata"]["managedFields"]
    assert [(m["manager"], m["operation"]) for m in managed] == [("alice", "Apply")]
    assert managed[0]["fieldsV1"] == {"f:spec": {"f:color": {}, "f:size": {}}}

    bob = await client.patch(path, {"spec": {"size": 5}}, MERGE, params={"fieldManager": "bob"})
    owners = {m["manager"]: m for m in bob.body["metadata"]["managedFields"]}
    assert owners["bob"]["operation"] == "Update"
    assert owners["bob"]["fieldsV1"] == {"f:spec": {"f:size": {}}}
    assert owners["alice"]["fieldsV1"] == {"f:spec": {"f:color": {}}}

    refused = await apply("alice", {"size": 3, "color": "red"})
    _status(refused, 409, "Conflict")
    assert refused.body["message"] == (
        'Apply failed with 1 conflict: conflict with "bob" using example.com/v1: .spec.size'
    )
    assert refused.body["details"]["causes"] == [
        {
            "reason": "FieldManagerConflict",
            "message": 'conflict with "bob" using example.com/v1',
            "field": ".spec.size",
        }
    ]
    forced = await apply("alice", {"size": 3, "color": "red"}, force="true")
    assert forced.body["spec"]["size"] == 3
    assert [m["manager"] for m in forced.body["metadata"]["managedFields"]] == ["alice"]

    # Carol applies the same color: shared ownership, no conflict.
    shared = await apply("carol", {"size": 3, "color": "red"})
    assert shared.status == 200, shared.body
    # Alice stops applying color: carol still owns it, so it stays.
    kept = await apply("alice", {"size": 3})
    assert kept.body["spec"]["color"] == "red"
    carol_drops = await apply("carol", {"size": 3})
    assert "color" not in carol_drops.body["spec"]  # its last owner stopped applying it
    rv = carol_drops.body["metadata"]["resourceVersion"]
    again = await apply("carol", {"size": 3})
    assert again.body["metadata"]["resourceVersion"] == rv  # a no-op apply writes nothing


async def test_delete_collection_and_future_versions(widgets: KubeClient) -> None:
    client = widgets
    for name, team in (("a", "x"), ("b", "x"), ("c", "y")):
        body = {**widget(name), "metadata": {"name": name, "labels": {"team": team}}}
        assert (await client.post(WIDGETS, body)).status == 201
    held = {
        **widget("held"),
        "metadata": {"name": "held", "labels": {"team": "x"}, "finalizers": ["example.com/hold"]},
    }
    await client.post(WIDGETS, held)
    deleted = await client.delete(WIDGETS, params={"labelSelector": "team=x"})
    assert deleted.status == 200 and deleted.body["kind"] == "WidgetList"
    assert sorted(i["metadata"]["name"] for i in deleted.body["items"]) == ["a", "b", "held"]
    left = (await client.get(WIDGETS)).body["items"]
    assert {i["metadata"]["name"]: bool(i["metadata"].get("deletionTimestamp")) for i in left} == {
        "c": False,
        "held": True,
    }

    future = str(int((await client.get(WIDGETS)).body["metadata"]["resourceVersion"]) + 1000)
    too_large = await client.get(
        WIDGETS, params={"resourceVersion": future, "resourceVersionMatch": "NotOlderThan"}
    )
    _status(too_large, 504, "Timeout")
    assert too_large.body["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
    watch = await client.get(WIDGETS, params={"watch": "true", "resourceVersion": future})
    _status(watch, 504, "Timeout")


async def test_two_servers_on_one_etcd(
    kube: KubeServer, widgets: KubeClient, tmp_path: Path
) -> None:
    """A CRD created through one server is served by another on the same etcd."""
    settings = KubeServerSettings(
        data_dir=tmp_path / "second", etcd_endpoints=tuple(kube.etcd_endpoints)
    )
    async with KubeServer(settings) as second:
        other = KubeClient(second)
        try:
            assert (await other.post(WIDGETS, widget("from-b"))).status == 201
            assert (await widgets.get(f"{WIDGETS}/from-b")).status == 200
            gadgets = "/apis/example.com/v1/gadgets"
            assert (await widgets.post(CRDS, copy.deepcopy(GADGET_CRD))).status == 201

            async def served() -> bool:
                return (await other.get(gadgets)).status == 200

            await eventually(served, message="the second server serving gadgets")
            await widgets.delete(f"{CRDS}/gadgets.example.com")

            async def retired() -> bool:
                return (await other.get(gadgets)).status == 404

            await eventually(retired, message="the second server retiring gadgets")
        finally:
            await other.close()


async def test_selectable_fields_and_deprecated_versions(client: KubeClient) -> None:
    crd = copy.deepcopy(WIDGET_CRD)
    v1 = crd["spec"]["versions"][0]
    v1["selectableFields"] = [{"jsonPath": ".spec.color"}]
    beta = {**copy.deepcopy(v1), "name": "v1beta1", "storage": False, "deprecated": True}
    crd["spec"]["versions"].append(beta)
    assert (await client.post(CRDS, crd)).status == 201
    await client.post(WIDGETS, widget("r", color="red"))
    await client.post(WIDGETS, widget("g", color="green"))
    red = await client.get(WIDGETS, params={"fieldSelector": "spec.color=red"})
    assert [i["metadata"]["name"] for i in red.body["items"]] == ["r"]
    _status(await client.get(WIDGETS, params={"fieldSelector": "spec.size=3"}), 400, "BadRequest")

    old = await client.get("/apis/example.com/v1beta1/namespaces/default/widgets/r")
    assert old.body["apiVersion"] == "example.com/v1beta1"
    assert old.headers["Warning"] == '299 - "example.com/v1beta1 Widget is deprecated"'
    assert "Warning" not in (await client.get(f"{WIDGETS}/r")).headers


async def test_restart_keeps_objects_credentials_and_crds(tmp_path: Path) -> None:
    """`cpctl kube up --data-dir D` twice: the same etcd data, CA, token and CRDs."""
    settings = KubeServerSettings(data_dir=tmp_path / "kube")
    async with KubeServer(settings) as first:
        client = KubeClient(first)
        try:
            assert (await client.post(CRDS, copy.deepcopy(WIDGET_CRD))).status == 201
            assert (await client.post(WIDGETS, widget("kept"))).status == 201
        finally:
            await client.close()
        token, ca = first.token, first.ca_file.read_bytes() if first.ca_file else b""
    async with KubeServer(settings) as second:
        assert second.token == token and second.ca_file is not None
        assert second.ca_file.read_bytes() == ca  # kubeconfigs written before still work
        client = KubeClient(second)
        try:
            assert (await client.get(f"{WIDGETS}/kept")).body["spec"]["size"] == 3
        finally:
            await client.close()


async def test_scale_subresource(widgets: KubeClient) -> None:
    client = widgets
    resources = (await client.get("/apis/example.com/v1")).body["resources"]
    scale_entry = next(r for r in resources if r["name"] == "widgets/scale")
    assert (scale_entry["group"], scale_entry["version"], scale_entry["kind"]) == (
        "autoscaling",
        "v1",
        "Scale",
    )
    created = (await client.post(WIDGETS, widget("s", 2))).body
    scale = (await client.get(f"{WIDGETS}/s/scale")).body
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 2} and scale["status"] == {"replicas": 0}
    assert scale["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]

    scale["spec"]["replicas"] = 4
    put = await client.put(f"{WIDGETS}/s/scale", scale)
    assert put.status == 200 and put.body["spec"]["replicas"] == 4
    _status(await client.put(f"{WIDGETS}/s/scale", scale), 409, "Conflict")  # stale
    patched = await client.patch(f"{WIDGETS}/s/scale", {"spec": {"replicas": 5}}, MERGE)
    assert patched.body["spec"]["replicas"] == 5
    obj = (await client.get(f"{WIDGETS}/s")).body
    assert obj["spec"]["size"] == 5 and obj["metadata"]["generation"] == 3
    too_big = await client.patch(f"{WIDGETS}/s/scale", {"spec": {"replicas": 500}}, MERGE)
    _status(too_big, 422, "Invalid")  # the object's own schema still applies
    _status(await client.get("/api/v1/namespaces/default/scale"), 404, "NotFound")
