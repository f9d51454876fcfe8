"""The one executor: runs the nodes of a plan (vlmforge.build.plan) in order, each from the stage cache when
its key is there, else by running it into a cache entry.

A node's dependencies are materialised only when the node actually runs: the PyTorch model is loaded by the
first node that runs and asks for it (an export, a validation not cached), and the FP32 graph behind a
transformed stage is put into the scratch folder (hardlinked from the cache, exported if missing) only for a
transform or a validation that is not cached. So a build whose nodes are all cached reads the checkpoint's
config and hashes, nothing more.
"""

from __future__ import annotations

import logging

from vlmforge.build.cache import Entry, StageCache
from vlmforge.build.plan import Build, Node, key_inputs, node_keys
from vlmforge.core.memory import give_back, rss_note

log = logging.getLogger(__name__)


class _NotKept(Exception):
    """A record its node does not cache (a failing validation): raised out of the cache's fill, so no entry
    is written, and caught by the executor."""

    def __init__(self, record: dict) -> None:
        super().__init__("not cached")
        self.record = record


class Executor:
    def __init__(self, build: Build, nodes: list[Node], cache: StageCache) -> None:
        self.build, self.cache = build, cache
        self.nodes = {n.name: n for n in nodes}
        self.keys = node_keys(nodes)
        self.hits: dict[str, bool] = {}  # cached nodes looked up or built in this build: name -> from the cache
        self.ran: set[str] = set()  # nodes whose work ran in this build
        self._entries: dict[str, Entry] = {}
        self._in_scratch: set[str] = set()

    def missing(self) -> list[str]:
        """The cached nodes with no entry in the cache (or all of them under --force): what this build will
        run, as far as it can be known before running (the plan's memory prediction reads it)."""
        fam = self.build.family.key
        return [n.name for n in self.nodes.values() if n.slot is not None
                and (self.cache.force or not (self.cache.slot(fam, n.slot) / self.keys[n.name]).is_dir())]

    def run(self) -> dict[str, dict]:
        """Run every node whose output the set needs (scratch-only nodes run when a dependent needs them);
        return name -> record (also kept in build.records, where later nodes read them)."""
        b = self.build
        for node in self.nodes.values():
            if node.output != "scratch":
                b.records[node.name] = self._node(node)
        return b.records

    def _node(self, node: Node) -> dict:
        if node.slot is None:  # cheap, not cached: its work runs in every build, straight into staging
            self._materialise(node)
            self.ran.add(node.name)
            return node.run(self.build, node, self.build.staging)
        record, entry = self._cached(node)
        if node.output == "set":
            entry.materialize(self.build.staging)
        return record

    def _cached(self, node: Node) -> tuple[dict, Entry | None]:
        """(record, entry) from the cache, or after running `node` into a new entry; a record its node does
        not keep comes back with no entry."""
        if node.name in self._entries:
            return self._entries[node.name].record, self._entries[node.name]

        def fill(tmp):
            self._materialise(node)
            self.ran.add(node.name)
            try:
                record = node.run(self.build, node, tmp)
            finally:
                give_back()  # what the node freed goes back to the OS before the next node allocates
            if node.keep is not None and not node.keep(record):
                raise _NotKept(record)
            return record

        family, key = self.build.family.key, self.keys[node.name]
        try:
            entry, hit = self.cache.get_or_build(family, node.slot, key, key_inputs(node, self.keys), fill)
        except _NotKept as not_kept:
            self.hits[node.name] = False
            return not_kept.record, None
        self.hits[node.name] = hit
        self._entries[node.name] = entry
        checks = len(entry.record.get("checks", ()))
        seconds = self.build.timings.get(node.timing, 0.0)
        log.info("%s: %s (%s)", node.label, (node.hit if hit else node.done).format(short=entry.short, seconds=seconds,
                                                                                   checks=checks), rss_note())
        return entry.record, entry

    def _materialise(self, node: Node) -> None:
        """Put the files of the dependencies `node` reads from scratch there (running them if not cached)."""
        for name in node.scratch:
            if name not in self._in_scratch:
                _, entry = self._cached(self.nodes[name])
                entry.materialize(self.build.scratch, link=True)
                self._in_scratch.add(name)

    def status(self) -> dict[str, str]:
        """stage -> cached | built | transformed (transform rebuilt, its FP32 export cached);
        validation -> cached | built | off."""
        b, out = self.build, {}
        for stage, precision in b.precision.items():
            final = f"export.{stage}" if precision == "fp32" else f"transform.{stage}.{precision}"
            if self.hits.get(final):
                out[stage] = "cached"
            else:
                out[stage] = "built" if f"export.{stage}" in self.ran else "transformed"
        if "validation" not in self.nodes:
            out["validation"] = "off"
        else:
            out["validation"] = "cached" if self.hits.get("validation") else "built"
        return out
