"""--store: CRD mode by default, kvstore when a kvstore is named, and one-line errors."""

from __future__ import annotations

import argparse

import pytest

from controlplane.config import ConfigError, CrdConfig, KvstoreConfig
from controlplane.flags import Parser, add_kvstore_flags, add_store_flags, store_config, store_mode


def parse(*argv: str) -> argparse.Namespace:
    parser = Parser(prog="t")
    add_store_flags(parser)
    add_kvstore_flags(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CP_STORE", "CP_KVSTORE_ENDPOINTS", "CP_KVSTORE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def test_crd_is_the_default() -> None:
    config = store_config(parse("--kubeconfig", "/k", "--kube-context", "c"))
    assert config == CrdConfig(kubeconfig="/k", context="c", request_timeout=5.0)


def test_a_kvstore_endpoint_selects_kvstore_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    assert store_mode(parse("--kvstore-endpoints", "http://127.0.0.1:2379")) == "kvstore"
    config = store_config(parse("--kvstore-endpoints", "http://127.0.0.1:2379"))
    assert isinstance(config, KvstoreConfig)
    monkeypatch.setenv("CP_KVSTORE_ENDPOINTS", "http://127.0.0.1:2379")
    assert store_mode(parse()) == "kvstore"
    assert store_mode(parse("--store", "crd")) == "crd"


def test_store_env_and_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_STORE", "kvstore")
    assert store_mode(parse()) == "kvstore"
    monkeypatch.setenv("CP_STORE", "zookeeper")
    with pytest.raises(ConfigError, match="CP_STORE='zookeeper'"):
        store_mode(parse())
    monkeypatch.delenv("CP_STORE")
    with pytest.raises(ConfigError, match="need --store kvstore"):
        store_mode(parse("--store", "crd", "--kvstore-endpoints", "http://127.0.0.1:2379"))


def test_a_bad_store_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("--store", "zookeeper")
    assert exit_.value.code == 2
    assert "invalid choice: 'zookeeper'" in capsys.readouterr().err
