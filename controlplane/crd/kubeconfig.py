"""Where the Kubernetes API is and how to authenticate: kubeconfig or in-cluster.

The usual rules, as kubectl follows them: ``--kubeconfig`` beats ``$KUBECONFIG`` (a
colon-separated list, merged), which beats ``~/.kube/config``; with none of them and
running in a pod, the service account (``KUBERNETES_SERVICE_HOST``). Parsing is left to
the official client's loader, which knows every auth form (tokens, client certificates,
embedded data, exec plugins); we keep only the resulting connection settings and talk
to the server with our own asyncio client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from controlplane.config import ConfigError

ENV_KUBECONFIG = "KUBECONFIG"
DEFAULT_KUBECONFIG = Path("~/.kube/config")
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True, slots=True)
class KubeConnection:
    """How to reach one API server."""

    server: str
    """``https://host:port`` (no trailing slash)."""
    token: str = ""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    tls_server_name: str | None = None
    source: str = ""
    """Where the settings came from, for logs and errors."""


def kubeconfig_path(explicit: str | None) -> str | None:
    """The kubeconfig file(s) the rules select, or None when there is none (in-cluster)."""
    if explicit:
        return explicit
    env = os.environ.get(ENV_KUBECONFIG, "")
    if env:
        return env
    default = DEFAULT_KUBECONFIG.expanduser()
    return str(default) if default.exists() else None


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> KubeConnection:
    """The connection the kubeconfig rules give; :class:`ConfigError` (one line) if none."""
    from kubernetes.client import Configuration
    from kubernetes.config import ConfigException, kube_config
    from kubernetes.config.incluster_config import load_incluster_config

    configuration = Configuration()
    path = kubeconfig_path(kubeconfig)
    try:
        if path is None:
            if not os.environ.get("KUBERNETES_SERVICE_HOST"):
                raise ConfigError(
                    "no Kubernetes API configured: pass --kubeconfig, set KUBECONFIG, "
                    "or run in a pod (or use --store kvstore)"
                )
            load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            source = "in-cluster service account"
        else:
            files = [p for p in path.split(os.pathsep) if p]
            missing = [p for p in files if not Path(p).expanduser().exists()]
            if missing and len(missing) == len(files):
                raise ConfigError(f"kubeconfig {path}: no such file")
            # The loader merges a colon-separated list itself (KubeConfigMerger).
            kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
            source = f"kubeconfig {path}"
    except ConfigError:
        raise
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot load the Kubernetes configuration: {exc}") from None
    # The loader keeps "Bearer <token>" under "authorization" or (v30+) "BearerToken".
    keys = configuration.api_key or {}
    auth = str(keys.get("BearerToken") or keys.get("authorization") or "")
    token = auth.removeprefix("Bearer ").strip()
    return KubeConnection(
        server=str(configuration.host).rstrip("/"),
        token=token,
        ca_file=configuration.ssl_ca_cert or None,
        cert_file=configuration.cert_file or None,
        key_file=configuration.key_file or None,
        verify=bool(configuration.verify_ssl),
        tls_server_name=getattr(configuration, "tls_server_name", None) or None,
        source=source,
    )
