"""One run of a scenario: boot, populate, churn, then each fault in turn with its checks.

Per fault: wait until every agent is ready, healthy and armed; inject and heal; stop the
churn (acknowledged once nothing is in flight); wait until every agent's ipcache equals
the store's endpoints (the time from the heal, per agent); wait until every agent is
healthy again; keep counting restarts for the fault's ``hold``; read the store for the
invariants; compare restarts and shard recoveries with what the fault warrants; resume
the churn. A harness error (a worker died, nothing came up) ends the run with the record
so far and the error in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import KvstoreError
from controlplane.scale import etcd_metrics
from controlplane.scale.cluster import CLIENT, Cluster
from controlplane.scale.faults import AFFECTED, INJECTORS, Context
from controlplane.scale.fleet import Fleet, FleetError, wait_for
from controlplane.scale.invariants import StoreView
from controlplane.scale.progress import Progress
from controlplane.scale.scenario import FaultSpec, Scenario
from controlplane.stats import percentile

Record = dict[str, Any]


def worker_specs(scenario: Scenario, cluster: Cluster, socket_dir: Path) -> list[dict[str, Any]]:
    a, c = scenario.agents, scenario.cluster
    nodes = [(f"n{i:04d}", f"127.1.{i // 250}.{i % 250 + 1}") for i in range(a.count)]
    timings = {
        "heartbeat_interval": c.heartbeat_interval,
        "status_check_interval": a.status_check_interval,
        "quorum_check_timeout": a.quorum_check_timeout,
        "max_consecutive_quorum_errors": a.max_consecutive_quorum_errors,
        "restart_delay": a.restart_delay,
        "restart_spread": a.restart_spread,
        "lease_ttl": a.lease_ttl,
    }
    groups = c.proxy_groups
    proxied: dict[str, Any] = {}
    if groups:
        proxied = {
            "groups": {node: i % groups for i, (node, _) in enumerate(nodes)},
            "kvstore_groups": [cluster.kvstore_spec(g) for g in range(groups)],
        }
    return [
        {
            "nodes": nodes[w :: a.workers],
            "kvstore": cluster.agent_store_spec(),
            **proxied,
            "agent": timings,
            "socket_dir": str(socket_dir),
            "pool_cidr": c.pool_cidr,
            "label_sets": a.label_sets,
            "endpoints_per_agent": a.endpoints_per_agent,
            "ready_timeout": a.ready_timeout,
            # a report costs ~0.2 ms per agent: fewer of them for big workers
            "report_interval": max(0.25, a.count / a.workers * 0.01),
        }
        for w in range(a.workers)
    ]


class Run:
    def __init__(self, scenario: Scenario, out_dir: Path, progress: Progress) -> None:
        self.scenario = scenario
        self.out_dir = out_dir
        self.progress = progress
        self.tmp = Path(tempfile.mkdtemp(prefix="cp-scale-"))
        self.cluster = Cluster(scenario, self.tmp, out_dir / "logs")
        self.fleet: Fleet | None = None
        self.start = time.monotonic()
        self.record: Record = {
            "scenario": scenario.name,
            "agents": scenario.agents.count,
            "workers": scenario.agents.workers,
            "endpoints_per_agent": scenario.agents.endpoints_per_agent,
            "churn_rate": scenario.churn.rate,
            "operators": scenario.cluster.operators,
            "etcd_clusters": scenario.cluster.etcd_clusters,
            "etcd_members": scenario.cluster.etcd_members,
            "heartbeat_interval": scenario.cluster.heartbeat_interval,
            "proxy_groups": scenario.cluster.proxy_groups,
            "store": scenario.cluster.store,
            "faults": [],
            "phases": {},
        }
        self.samples: list[list[Any]] = []
        """[t, etcd requests/s by method, etcd DB bytes (largest member), workers' RSS]."""
        self._sampler: asyncio.Task[None] | None = None
        self._rss_ready = 0

    def rel(self, t: float) -> float:
        return round(t - self.start, 3)

    async def run(self) -> Record:
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            await self._boot()
            for i, fault in enumerate(self.scenario.faults):
                self.record["faults"].append(await self._fault(i, fault))
            self.progress.begin("shutdown")
        except (FleetError, KvstoreError, TimeoutError, asyncio.CancelledError) as exc:
            # CancelledError: Ctrl-C (asyncio.run cancels us); the run stops here and the
            # report of what was measured so far is still written
            self.record["error"] = str(exc) or type(exc).__name__
            self.progress.end(f"error: {self.record['error']}")
        finally:
            sampler = self._sampler
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            if self.fleet is not None:
                await self.fleet.stop_all()
            self.record["operator_tracebacks"] = self.cluster.operator_tracebacks()
            self.record["worker_tracebacks"] = self._worker_tracebacks()
            await self.cluster.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.record["timeline"] = self._timeline()
        self.record["unprovoked_restarts"] = self._unprovoked()
        self.record["duration_s"] = round(time.monotonic() - self.start, 1)
        return self.record

    def _worker_tracebacks(self) -> list[str]:
        found = []
        if self.fleet is not None:
            for worker in self.fleet.workers:
                if worker.log_file.exists() and "Traceback" in worker.log_file.read_text(
                    errors="replace"
                ):
                    found.append(worker.log_file.name)
        return found

    # -- samples over time ------------------------------------------------------------------

    async def _sample(self, interval: float = 2.0) -> None:
        """Every ``interval``: etcd's request rates by method, its DB size, the workers'
        RSS (the report's plots over time)."""
        urls = self._etcd_urls()
        before, t_before = await etcd_metrics.sample(urls), time.monotonic()
        while True:
            await asyncio.sleep(interval)
            counts, sizes = await asyncio.gather(
                etcd_metrics.sample(urls), etcd_metrics.db_sizes(urls)
            )
            now = time.monotonic()
            rates = etcd_metrics.rates(before, counts, now - t_before)
            before, t_before = counts, now
            db = max((v[etcd_metrics.DB_SIZE] for v in sizes.values()), default=0)
            rss = self.fleet.rss_total() if self.fleet is not None else 0
            self.samples.append([self.rel(now), rates, db, rss])

    def _memory(self, endpoints: int) -> Record:
        """The workers' RSS, per agent, and its growth since the agents were ready (empty
        store) per agent per endpoint they hold (each agent holds every endpoint)."""
        assert self.fleet is not None
        rss = self.fleet.rss_total()
        agents = max(1, len(self.fleet.agents))
        grown = rss - self._rss_ready
        return {
            "workers_rss_bytes": rss,
            "rss_per_agent_bytes": rss // agents,
            "endpoints": endpoints,
            "growth_per_agent_per_endpoint_bytes": grown // agents // max(1, endpoints),
        }

    # -- boot -----------------------------------------------------------------------------

    async def _boot(self) -> None:
        s, p = self.scenario, self.progress
        p.begin("etcd")
        t = time.monotonic()
        await self.cluster.start_etcd()
        await self.cluster.start_proxies()
        if self.cluster.crd:
            p("starting the API server")
            self.record["phases"]["apiserver_s"] = round(await self.cluster.start_apiserver(), 2)
        self._sampler = asyncio.create_task(self._sample(), name="samples")
        first = self.cluster.config.clusters[0]
        async with EtcdBackend(first, CLIENT, own_connection=True) as backend:
            self.record["etcd_version"] = (await backend.status()).version
        self.record["phases"]["etcd_s"] = round(time.monotonic() - t, 2)
        p.end(f"{s.cluster.etcd_clusters} cluster(s) x {s.cluster.etcd_members} members")
        p.begin("operators")
        await self.cluster.start_operators()
        leader: list[str | None] = [None]

        async def elected() -> None:
            while leader[0] is None:
                leader[0] = await self.cluster.operator_leader()
                p("waiting for an elected operator")
                await asyncio.sleep(0.2)

        await asyncio.wait_for(elected(), 60)
        p.end(f"{s.cluster.operators} operators, leader {leader[0]}")
        socket_dir = self.tmp / "sockets"
        socket_dir.mkdir()
        self.fleet = fleet = Fleet(worker_specs(s, self.cluster, socket_dir), self.out_dir / "logs")
        self.context = Context(self.cluster, fleet, p, str(socket_dir))
        p.begin(f"agents: {s.agents.count} in {s.agents.workers} workers")
        t = time.monotonic()
        etcd_before = await etcd_metrics.sample(self._etcd_urls())
        await fleet.start_all()
        took = await wait_for(
            lambda: (
                fleet.count(lambda v: v.ready),
                len(fleet.agents),
            ),
            "agents ready",
            s.agents.ready_timeout,
            p,
            fleet,
        )
        self.record["phases"]["agents_ready_s"] = round(took, 2)
        self._rss_ready = fleet.rss_total()
        wanted = s.agents.count * s.agents.endpoints_per_agent
        await wait_for(
            lambda: (sum(w.ready.is_set() for w in fleet.workers), len(fleet.workers)),
            lambda: (
                f"workers populated (endpoints created {fleet.churn_totals()['ok']}/{wanted}, "
                f"agent restarts so far {sum(len(v.restarts) for v in fleet.agents.values())})"
            ),
            s.agents.ready_timeout + wanted / 20,
            p,
            fleet,
        )
        self.record["phases"]["populated_s"] = round(time.monotonic() - t, 2)
        self.record["phases"]["boot_etcd_requests_per_s"] = etcd_metrics.rates(
            etcd_before, await etcd_metrics.sample(self._etcd_urls()), time.monotonic() - t
        )
        p.end(f"ready in {self.record['phases']['agents_ready_s']}s, populated")
        if s.churn.identity_burst:
            p.begin(f"identity burst: {s.churn.identity_burst} fresh label sets per worker")
            results = await fleet.identity_burst(s.churn.identity_burst)
            ok = sum(r["ok"] for r in results)
            took = max((r["seconds"] for r in results), default=0.0)
            self.record["phases"]["identity_allocations"] = {
                "ok": ok,
                "failed": sum(r["failed"] for r in results),
                "seconds": took,
                "per_s": round(ok / took, 1) if took > 0 else None,
            }
            p.end(f"{ok} allocated in {took}s")
        # before any fault: every agent caught up with the populated store (a baseline)
        p.begin("baseline convergence after populating")
        populated = time.monotonic()
        baseline, _ = await self._converge(populated, s.agents.ready_timeout)
        self.record["phases"]["baseline_convergence"] = baseline
        self.record["phases"]["memory"] = self._memory(baseline["endpoints"])
        if baseline["not_converged"]:
            raise FleetError(f"{len(baseline['not_converged'])} agents never caught up")
        p.end(f"p50 {baseline['p50_s']}s, p99 {baseline['p99_s']}s, max {baseline['max_s']}s")
        await fleet.set_churn(s.churn.rate)

    def _etcd_urls(self) -> list[str]:
        return [url for etcd in self.cluster.etcds.values() for url in etcd.client_urls]

    # -- one fault --------------------------------------------------------------------------

    def _all(self, check: Any) -> tuple[int, int]:
        assert self.fleet is not None
        return self.fleet.count(check), len(self.fleet.agents)

    async def _converge(self, t_heal: float, timeout: float) -> tuple[Record, StoreView]:
        fleet, p = self.fleet, self.progress
        assert fleet is not None
        await fleet.set_digests(True)
        deadline = time.monotonic() + timeout
        view, took = await self._read_store(deadline)
        read_at = time.monotonic()
        while True:
            fleet.check_alive()
            truth = view.truth
            matched = [v for v in fleet.agents.values() if v.state.get("digest") == truth]
            p(f"converged {len(matched)}/{len(fleet.agents)} to {len(view.endpoints)} endpoints")
            now = time.monotonic()
            if len(matched) == len(fleet.agents) or now > deadline:
                break
            # the truth may still move (an owner re-publishing); a read of 10k endpoints
            # takes this process (and the proxies in it) seconds under load: not too often
            if now - read_at > max(2.0, 5 * took):
                with contextlib.suppress(KvstoreError):  # etcd busy: keep the last view
                    started = time.monotonic()
                    view = await self.cluster.read_store()
                    took = time.monotonic() - started
                read_at = time.monotonic()
            await asyncio.sleep(0.1)
        await fleet.set_digests(False)
        times = {v.node: max(0.0, float(v.state["digest_since"]) - t_heal) for v in matched}
        samples = list(times.values())
        result = {
            "converged": len(matched),
            "total": len(fleet.agents),
            "endpoints": len(view.endpoints),
            "p50_s": round(percentile(samples, 50), 3),
            "p99_s": round(percentile(samples, 99), 3),
            "max_s": round(max(samples, default=0.0), 3),
            "per_agent_s": {n: round(t, 3) for n, t in sorted(times.items())},
            "not_converged": sorted(set(fleet.agents) - set(times)),
        }
        return result, view

    async def _read_store(self, deadline: float) -> tuple[StoreView, float]:
        """The store's view and how long the read took; a read that etcd (loaded by
        re-listing agents) times out is tried again until ``deadline``."""
        while True:
            started = time.monotonic()
            try:
                return await self.cluster.read_store(), time.monotonic() - started
            except KvstoreError as exc:
                if time.monotonic() > deadline:
                    raise FleetError(f"reading the store: {exc}") from exc
                self.progress(f"reading the store failed ({exc}); again")
                await asyncio.sleep(1.0)

    async def _fault(self, index: int, fault: FaultSpec) -> Record:
        fleet, p, s = self.fleet, self.progress, self.scenario
        assert fleet is not None
        p.begin(f"fault {index + 1}/{len(s.faults)} {fault.kind}")
        await wait_for(
            lambda: self._all(lambda v: v.ready and v.healthy and v.state.get("armed")),
            "agents ready, healthy, heartbeat armed",
            s.agents.ready_timeout,
            p,
            fleet,
        )
        recoveries_before = {
            n: dict(v.state.get("recoveries", {})) for n, v in fleet.agents.items()
        }
        incarnations = {n: v.incarnation for n, v in fleet.agents.items()}
        churn_before = fleet.churn_totals()
        etcd_before = await etcd_metrics.sample(self._etcd_urls())
        t0 = time.monotonic()
        notes = await INJECTORS[fault.kind](self.context, fault, t0)
        affected: list[str] | None = notes.pop(AFFECTED, None)
        t_heal = time.monotonic()
        p("healed; stopping churn")
        await fleet.set_churn(0)
        t_idle = time.monotonic()
        churn_after = fleet.churn_totals()
        convergence, _ = await self._converge(t_heal, fault.converge_timeout)
        # operations in flight at the heal finish before this: the store may change until
        # then, so an agent cannot converge earlier than its last change arrived
        convergence["churn_idle_after_heal_s"] = round(t_idle - t_heal, 3)
        lags = [max(0.0, t - (t_idle - t_heal)) for t in convergence["per_agent_s"].values()]
        convergence["after_idle_p99_s"] = round(percentile(lags, 99), 3)
        convergence["after_idle_max_s"] = round(max(lags, default=0.0), 3)
        await wait_for(
            lambda: self._all(lambda v: v.ready and v.healthy),
            "agents ready and healthy",
            s.agents.ready_timeout,
            p,
            fleet,
        )
        while (left := t_heal + fault.hold - time.monotonic()) > 0:
            fleet.check_alive()
            restarted = fleet.count(lambda v: any(r.at >= t0 for r in v.restarts))
            p(f"holding {left:4.1f}s more; agents restarted so far {restarted}")
            await asyncio.sleep(0.1)
        t_end = time.monotonic()
        etcd_after = await etcd_metrics.sample(self._etcd_urls())
        view, _ = await self._read_store(t_end + fault.converge_timeout)
        result = self._judge(fault, notes, view, t0, t_heal, t_end, convergence, affected)
        result["memory"] = self._memory(len(view.endpoints))
        result["etcd_requests_per_s"] = etcd_metrics.rates(etcd_before, etcd_after, t_end - t0)
        result["recoveries"] = self._recoveries(fault, recoveries_before, incarnations, result)
        result["churn"] = {k: churn_after[k] - churn_before[k] for k in ("ops", "ok", "failed")}
        result["churn"]["errors"] = {
            k: n - churn_before["errors"].get(k, 0) for k, n in churn_after["errors"].items()
        }
        failed = [
            k for k, v in {**result["invariants"], **result["goals"]}.items() if not v["pass"]
        ]
        await fleet.set_churn(s.churn.rate)
        p.end(
            ("PASS" if not failed else "FAIL " + ", ".join(failed))
            + f"; converged p99 {convergence['p99_s']}s; restarts "
            + ", ".join(f"{k}x{v}" for k, v in sorted(result["restarts"]["distribution"].items()))
        )
        return result

    def _judge(
        self,
        fault: FaultSpec,
        notes: Record,
        view: StoreView,
        t0: float,
        t_heal: float,
        t_end: float,
        convergence: Record,
        affected: list[str] | None = None,
    ) -> Record:
        fleet = self.fleet
        assert fleet is not None
        restarted_worker = notes.get("worker") if fault.kind == "worker-kill" else None
        counted = [
            v
            for v in fleet.agents.values()
            if restarted_worker is None or v.worker != restarted_worker
        ]
        per_agent = {v.node: fleet.restarts_between(v.node, t0, t_end) for v in counted}
        times = sorted(r.at for events in per_agent.values() for r in events)
        back = sorted(
            r.ready_at for events in per_agent.values() for r in events if r.ready_at is not None
        )
        restarts: Record = {
            "distribution": {
                str(k): n for k, n in Counter(len(e) for e in per_agent.values()).items()
            },
            "reasons": dict(Counter(r.reason for e in per_agent.values() for r in e)),
            "first_s": round(times[0] - t0, 3) if times else None,
            "decided_within_s": round(times[-1] - times[0], 3) if times else None,
            "ready_again_spread_s": round(back[-1] - back[0], 3) if back else None,
            "excluded_agents": len(fleet.agents) - len(counted),
        }
        owned_lost = [
            v.node
            for v in fleet.agents.values()
            if v.state and v.state.get("owned_digest") != view.owned_digest(v.node)
        ]
        invariants = {
            "one ID per label set and back": _verdict(view.violations.get("identity", [])),
            "no IP held twice, IPs in their node's CIDR": _verdict(view.violations.get("ip", [])),
            "no CIDR held twice": _verdict(view.violations.get("cidr", [])),
            "every owned endpoint in the store": _verdict(owned_lost),
            "every ipcache converged": _verdict(convergence["not_converged"]),
        }
        goals: Record = {}
        if fault.expect_restarts is not None and affected is not None:
            # the fault hit some agents: they owe expect_restarts, the others none
            hit = set(affected)
            wrong = [
                n
                for n, e in per_agent.items()
                if len(e) != (fault.expect_restarts if n in hit else 0)
            ]
            others = len(per_agent) - len(hit)
            name = f"{fault.expect_restarts} restart(s) per agent cut" + (
                f", 0 for the other {others}" if others else ""
            )
            goals[name] = _verdict([f"{n}: {len(per_agent[n])}" for n in wrong])
        elif fault.expect_restarts is not None:
            wrong = [n for n, e in per_agent.items() if len(e) != fault.expect_restarts]
            goals[f"{fault.expect_restarts} restart(s) per agent"] = _verdict(
                [f"{n}: {len(per_agent[n])}" for n in wrong]
            )
        spread = self.scenario.agents.restart_spread
        if fault.expect_spread and len(back) >= 10 and spread > 0:
            # a fixed per-node fraction of the spread: no thundering herd when they reconnect
            got = restarts["ready_again_spread_s"]
            goals[f"reconnects spread over >= {spread / 2:g}s (restart_spread/2)"] = _verdict(
                [] if got is not None and got >= spread / 2 else [f"spread {got}s"]
            )
        if "agents_that_counted" in notes:
            missing = notes["agents"] - notes["agents_that_counted"]
            goals["every agent counted and skipped the malformed values/objects"] = _verdict(
                [f"{missing} agents did not count one"] if missing else []
            )
        if "maps_shrunk" in notes:
            goals["maps kept while the API server was down (sampled)"] = _verdict(
                notes["maps_shrunk"]
            )
        if notes.get("severed_connections"):
            # every watch resumed from its last revision: those behind the compaction had
            # to re-list (the ipcache convergence above says the re-list lost nothing)
            goals["watches behind the compaction re-listed"] = _verdict(
                [] if notes["watches_relisted"] > 0 else ["no watch re-listed"]
            )
        if "healthy_shard_creates" in notes:
            made = notes["healthy_shard_creates"]
            goals["healthy-shard creates succeed"] = _verdict(
                [f"{made['failed']} failed of {made['ok'] + made['failed']}"]
                if made["failed"] or not made["ok"]
                else []
            )
        return {
            "kind": fault.kind,
            "notes": notes,
            "t_start_s": self.rel(t0),
            "t_heal_s": self.rel(t_heal),
            "t_end_s": self.rel(t_end),
            "fault_s": round(t_heal - t0, 2),
            "restarts": restarts,
            "convergence": convergence,
            "store": {**view.counts, "malformed_values": view.malformed},
            "invariants": invariants,
            "goals": goals,
        }

    def _recoveries(
        self,
        fault: FaultSpec,
        before: dict[str, dict[str, int]],
        incarnations: dict[str, int],
        result: Record,
    ) -> Record:
        fleet = self.fleet
        assert fleet is not None
        deltas: dict[str, dict[str, int]] = {}
        for node, view in fleet.agents.items():
            if view.incarnation != incarnations[node]:
                continue  # a new process: its counters started again
            now = view.state.get("recoveries", {})
            deltas[node] = {k: int(now.get(k, 0)) - int(before[node].get(k, 0)) for k in now}
        shards = sorted({k for d in deltas.values() for k in d})
        summary = {
            shard: {str(k): n for k, n in Counter(d.get(shard, 0) for d in deltas.values()).items()}
            for shard in shards
        }
        if fault.expect_recoveries:
            for shard in shards:
                limit = fault.expect_recoveries.get(shard, 0)
                wrong = [
                    f"{n}: {d.get(shard, 0)}" for n, d in deltas.items() if d.get(shard, 0) > limit
                ]
                result["goals"][f"shard {shard}: at most {limit} recovery per agent"] = _verdict(
                    wrong
                )
        return summary

    def _unprovoked(self) -> Record:
        """Restarts outside every fault's window (boot, populate, between faults): none
        should happen; each is listed with its time and reason."""
        windows = [(f["t_start_s"], f["t_end_s"]) for f in self.record["faults"]]
        outside = [
            r[:3]
            for r in self.record["timeline"]["restarts"]
            if not any(start <= r[1] <= end for start, end in windows)
        ]
        return {"count": len(outside), "first": sorted(outside, key=lambda r: r[1])[:20]}

    def _timeline(self) -> Record:
        if self.fleet is None:
            return {"restarts": [], "faults": [], "samples": self.samples}
        order = {node: i for i, node in enumerate(sorted(self.fleet.agents))}
        return {
            "restarts": [
                [
                    order[v.node],
                    self.rel(r.at),
                    r.reason,
                    None if r.ready_at is None else self.rel(r.ready_at),
                ]
                for v in self.fleet.agents.values()
                for r in v.restarts
            ],
            "faults": [
                [f["kind"], f["t_start_s"], f["t_heal_s"], f["t_end_s"]]
                for f in self.record["faults"]
            ],
            "samples": self.samples,
        }


def _verdict(problems: list[str]) -> Record:
    return {"pass": not problems, "count": len(problems), "details": problems[:10]}


async def run_scenario(scenario: Scenario, out_dir: Path, progress: Progress) -> Record:
    record = await Run(scenario, out_dir, progress).run()
    conv = [f["convergence"]["max_s"] for f in record["faults"]]
    record["summary"] = {
        "faults": len(record["faults"]),
        "passed": all(
            v["pass"] for f in record["faults"] for v in {**f["invariants"], **f["goals"]}.values()
        )
        and "error" not in record
        and not record["unprovoked_restarts"]["count"]
        and not record["operator_tracebacks"]
        and not record["worker_tracebacks"],
        "worst_convergence_s": max(conv, default=0.0),
        "mean_convergence_s": round(statistics.fmean(conv), 3) if conv else 0.0,
    }
    return record
