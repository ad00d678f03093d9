"""The failure-injection scale harness behind `cpctl scale run` (test and bench tooling).

It boots real etcd clusters, real ``cp-operator`` processes and many real agents
(:class:`controlplane.agent.agent.Agent` in worker processes), injects the faults a large
cluster meets, checks the invariants of ``ARCHITECTURE.md`` against the store after each
one and writes a report. One job per module:

- ``scenario``: the scenario files (TOML) and their checks
- ``worker``: a worker process running many agents, reporting their state as JSON lines
- ``fleet``: the harness side of the workers (spawn, kill, read reports, send commands)
- ``cluster``: etcd clusters and operator processes
- ``faults``: the fault injectors
- ``invariants``: what must hold in the store and in every agent's ipcache
- ``report``: JSON, markdown and plots of one run
- ``runner``: the phases of a run and the progress display

Nothing in the product imports this package; only `cpctl scale` runs it.
"""
