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
import threading

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
        self._pool = None  # the background copier into staging, started by the first copy
        self._copies: list = []  # its pending copies (futures of Entry.materialize)
        self._stop = threading.Event()

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
        self._stop = threading.Event()
        try:
            for node in self.nodes.values():
                # a node reading or describing the staged set waits for every copy into it; before any other,
                # a copy that failed (a full disk) fails the build now, not at the end
                self._take_copies(wait=node.output == "none")
                if node.output != "scratch":
                    b.records[node.name] = self._node(node)
            self._take_copies(wait=True)
        finally:
            self._stop_copies()
        return b.records

    def _node(self, node: Node) -> dict:
        if node.slot is None:  # cheap, not cached: its work runs in every build, straight into staging
            self._materialise(node)
            self.ran.add(node.name)
            return node.run(self.build, node, self.build.staging)
        record, entry = self._cached(node)
        if node.output == "set":  # copied (and hashed) into staging in the background, beside the next node
            self._copies.append(self._copier().submit(entry.materialize, self.build.staging, stop=self._stop))
        return record

    # -- copies into staging ------------------------------------------------------------------------------------
    # A stage's files go from its cache entry into the staged set in a thread while the next stage exports (the
    # copy and its sha256 release the GIL): at Qwen2.5-VL-3B widths, 2 layers, the copies were 11 s and the
    # manifest's hashing of the copies 5 s of a 96 s build, all on the main thread. The hashes computed while
    # copying are the manifest's (Build.staged), for files whose (size, mtime, inode) did not change since.
    def _copier(self):
        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmforge-copy")
        return self._pool

    def _take_copies(self, wait: bool) -> None:
        """Take the results of the copies into staging that are done (`wait`: of all of them, waiting); the first
        one that failed raises here."""
        while self._copies and (wait or self._copies[0].done()):
            self.build.staged.update(self._copies.pop(0).result())

    def _stop_copies(self) -> None:
        """Copies still running stop between chunks (a failed or interrupted build); wait for them, so nothing
        writes into staging once this returns (the caller removes it)."""
        if self._pool is None:
            return
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._copies = None, []

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
                export = f"export.{stage}"  # none in the plan: exported straight to its precision (built)
                out[stage] = "built" if export in self.ran or export not in self.nodes else "transformed"
        if "validation" not in self.nodes:
            out["validation"] = "off"
        else:
            out["validation"] = "cached" if self.hits.get("validation") else "built"
        return out
