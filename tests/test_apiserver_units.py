"""The API server's pure parts against their specifications: RFC 7386 and RFC 6902
examples, label selectors, kube's HumanDuration, FieldsV1, structural schemas."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.apiserver import fieldmanager, schema
from controlplane.apiserver.errors import ApiError
from controlplane.apiserver.patch import PatchError, json_patch, merge_patch
from controlplane.apiserver.selectors import Selector
from controlplane.apiserver.table import find, human_duration

# RFC 7386, Appendix A.
MERGE_CASES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), MERGE_CASES)
def test_merge_patch_rfc7386(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(target, patch) == result


def test_json_patch_rfc6902() -> None:
    doc = {"foo": ["bar", "baz"], "q": {"r": 1}}
    assert json_patch({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}]) == {
        "foo": "bar",
        "baz": "qux",
    }
    assert json_patch(doc, [{"op": "add", "path": "/foo/1", "value": "x"}])["foo"] == [
        "bar",
        "x",
        "baz",
    ]
    assert json_patch(doc, [{"op": "remove", "path": "/foo/0"}])["foo"] == ["baz"]
    assert json_patch(doc, [{"op": "replace", "path": "/q/r", "value": 2}])["q"] == {"r": 2}
    moved = json_patch(doc, [{"op": "move", "from": "/q/r", "path": "/s"}])
    assert moved["s"] == 1 and moved["q"] == {}
    assert json_patch(doc, [{"op": "copy", "from": "/foo/0", "path": "/foo/-"}])["foo"] == [
        "bar",
        "baz",
        "bar",
    ]
    assert json_patch(
        {"a/b": 1, "m~n": 2},
        [{"op": "test", "path": "/a~1b", "value": 1}, {"op": "test", "path": "/m~0n", "value": 2}],
    )
    with pytest.raises(PatchError):
        json_patch(doc, [{"op": "test", "path": "/q/r", "value": 5}])
    with pytest.raises(PatchError):
        json_patch(doc, [{"op": "add", "path": "/missing/x", "value": 1}])
    with pytest.raises(PatchError):
        json_patch(doc, [{"op": "remove", "path": "/nothing"}])
    with pytest.raises(PatchError):
        json_patch(doc, [{"op": "add", "path": "/foo/7", "value": 1}])
    assert doc == {"foo": ["bar", "baz"], "q": {"r": 1}}  # never modified in place


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("env=prod", [True, False, False]),
        ("env!=prod", [False, True, True]),
        ("env in (dev, test)", [False, True, False]),
        ("env notin (dev)", [True, False, True]),
        ("tier", [True, True, False]),
        ("!tier", [False, False, True]),
        ("env=prod,tier=a", [True, False, False]),
        ("", [True, True, True]),
    ],
)
def test_label_selectors(text: str, matches: list[bool]) -> None:
    objects = [
        {"metadata": {"labels": labels}}
        for labels in ({"env": "prod", "tier": "a"}, {"env": "dev", "tier": "b"}, {})
    ]
    selector = Selector(text, None)
    assert [selector.matches(o) for o in objects] == matches


def test_bad_selectors_are_400() -> None:
    for labels, fields in (("env in (a", None), (None, "spec.x=1"), ("=x", None)):
        with pytest.raises(ApiError) as error:
            Selector(labels, fields)
        assert error.value.code == 400


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-1, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (125, "2m5s"),
        (600, "10m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 60, "3h1m"),
        (9 * 3600, "9h"),
        (50 * 3600, "2d2h"),
        (10 * 86400, "10d"),
        (800 * 86400, "2y70d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_human_duration_matches_apimachinery(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


def test_printer_column_paths() -> None:
    obj = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}, "spec": {"a": [1, 2]}}
    assert find(obj, '.status.conditions[?(@.type=="Ready")].status') == "True"
    assert find(obj, ".spec.a[1]") == 2
    assert find(obj, ".spec.missing") is None


paths = st.sets(
    st.lists(st.text("abc.", min_size=1, max_size=3), min_size=1, max_size=3).map(tuple), max_size=8
)


@given(paths)
def test_fields_v1_round_trip(owned: set[tuple[str, ...]]) -> None:
    # A set of leaves in which no path is a prefix of another survives FieldsV1.
    leaves = {p for p in owned if not any(q != p and q[: len(p)] == p for q in owned)}
    assert fieldmanager.from_fields_v1(fieldmanager.to_fields_v1(leaves)) == leaves


def test_schema_validation_and_pruning() -> None:
    spec_schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["n"],
                "properties": {
                    "n": {"type": "integer", "minimum": 1},
                    "s": {"type": "string", "maxLength": 2, "nullable": True},
                    "m": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "v": {"x-kubernetes-int-or-string": True},
                    "keep": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            }
        },
    }
    good = {"spec": {"n": 2, "s": None, "m": {"a": 1}, "v": "10%", "keep": {"x": 1}}}
    assert schema.validate(good, spec_schema) == []
    causes = schema.validate({"spec": {"n": 0, "s": "abc", "m": {"a": "x"}, "v": 1.5}}, spec_schema)
    assert {c.field for c in causes} == {"spec.n", "spec.s", "spec.m.a", "spec.v"}
    missing = schema.validate({"spec": {}}, spec_schema)
    assert [(c.reason, c.field) for c in missing] == [("FieldValueRequired", "spec.n")]
    doc = {"spec": {"n": 1, "x": 1, "keep": {"y": 2}}, "other": True}
    assert sorted(schema.prune(doc, spec_schema)) == ["other", "spec.x"]
    assert doc == {"spec": {"n": 1, "keep": {"y": 2}}}


def test_list_types() -> None:
    sets = {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}
    assert schema.validate(["a", "b"], sets, "spec.tags") == []
    duplicate = schema.validate(["a", "b", "a"], sets, "spec.tags")
    assert [(c.reason, c.field) for c in duplicate] == [("FieldValueDuplicate", "spec.tags[2]")]
    maps = {
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
    }
    assert schema.validate([{"name": "a"}, {"name": "b"}], maps, "spec.ports") == []
    twice = schema.validate([{"name": "a"}, {"name": "a"}], maps, "spec.ports")
    assert [c.field for c in twice] == ["spec.ports[1]"]


@pytest.mark.parametrize(
    ("format_name", "good", "bad"),
    [
        ("ipv4", "10.0.0.1", "300.1.1.1"),
        ("ipv6", "fd00::1", "fd00::zz"),
        ("cidr", "10.0.0.0/24", "10.0.0.1"),
        ("mac", "aa:bb:cc:dd:ee:ff", "aa:bb:cc"),
        ("uuid", "123e4567-e89b-12d3-a456-426614174000", "not-a-uuid"),
        ("hostname", "node-1.example.com", "-bad-.com"),
        ("byte", "aGVsbG8=", "not base64!"),
        ("date", "2026-12-07", "2026-13-40"),
        ("date-time", "2026-12-07T21:00:00Z", "yesterday"),
        ("no-such-format", "anything", None),
    ],
)
def test_string_formats(format_name: str, good: str, bad: str | None) -> None:
    field = {"type": "string", "format": format_name}
    assert schema.validate(good, field, "spec.x") == []
    if bad is not None:
        [cause] = schema.validate(bad, field, "spec.x")
        assert cause.field == "spec.x"
        assert cause.message.endswith(f'spec.x in body must be of type {format_name}: "{bad}"')
