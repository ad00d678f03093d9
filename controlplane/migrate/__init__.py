"""Moving a cluster's state between CRD mode and kvstore mode: copies that keep identity
numbers, IPs and CIDRs (``cpctl migrate``), and the drift between the two stores
(``cpctl migrate status``, the operator's ``cp_migration_drift`` gauges).

This package uses both backends, so it sits above them (and below the daemons and cpctl);
each backend's writes of a copy live in that backend (``kvstore/copier.py``,
``crd/copier.py``), behind the :class:`~controlplane.migrate.side.Copier` Protocol.
"""
