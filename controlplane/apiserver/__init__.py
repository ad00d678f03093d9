"""A local Kubernetes API server on etcd, for development and tests (never production).

kubectl, the official Python client and kopf use it as they would a real kube-apiserver:
discovery, OpenAPI v3, CRDs, custom resources with validation and the status subresource,
list and watch with resourceVersions taken from etcd, a few built-in kinds, TLS and bearer
tokens. docs/apiserver.md lists exactly what it implements and what it does not.
"""

from controlplane.apiserver.server import KubeServer, KubeServerSettings

__all__ = ["KubeServer", "KubeServerSettings"]
