"""The sink contract's checks of the optional operations (see :mod:`wmtp_core.testing`): each
one runs only against a sink that overrides the operation, and is skipped with the reason
otherwise. :class:`~wmtp_core.testing.SinkContract` inherits them."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import pytest

from wmtp_core.commit import step_dirname
from wmtp_core.events import Receipt
from wmtp_core.roles import Role


class OptionalOperations:
    """Mixed into :class:`~wmtp_core.testing.SinkContract`, which provides ``opened``, ``store``,
    ``run_info``, ``require``, ``declared`` and ``checkpoint_store``."""

    def corrupt(self, sink: Any, receipt: Receipt) -> None:
        """Make the checkpoint of ``receipt`` fail verification: by default a flipped byte in its
        largest file, for a file-like sink. Override it for a sink whose files the default cannot
        reach (the quarantine check is skipped otherwise)."""
        store = self.checkpoint_store(sink)
        path = type(store.fs)._strip_protocol(receipt.uri)
        entry = max(store.read_manifest(path).files, key=lambda f: f.size)
        target = posixpath.join(path, entry.path)
        data = bytearray(store.fs.cat_file(target))
        data[len(data) // 2] ^= 0xFF
        store.fs.pipe_file(target, bytes(data))

    def overriding(self, sink: Any, operation: str) -> None:
        """Skip unless the sink implements ``operation`` itself (the default needs no check)."""
        if not type(sink).overrides(operation):
            pytest.skip(f"{self.sink_name} keeps the default {operation}()")

    def test_quarantine_moves_a_checkpoint_aside_and_lists_it(self, tmp_path: Path):
        """``quarantine(uri, reason)``, when overridden, of a checkpoint that fails verification
        (see :meth:`corrupt`): it is no longer committed, it is kept (listed by ``quarantined()``
        with the reason) and the others are untouched."""
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            self.overriding(sink, "quarantine")
            kept = self.store(sink, run, Role.RESUME, 2)[1].uri
            receipt = self.store(sink, run, Role.RESUME, 4)[1]
            bad = receipt.uri
            self.corrupt(sink, receipt)
            where = sink.quarantine(bad, "the contract's reason")
            assert isinstance(where, str) and where and where != bad, f"quarantine() returned {where!r}"
            assert [u for u, _ in sink.committed()] == [kept], "a quarantined checkpoint is still committed"
            listed = list(sink.quarantined())
            assert where in [u for u, _ in listed], f"quarantined() lists {listed}, moved to {where!r}"
            assert all("the contract's reason" in why for _, why in listed), f"the reason is not kept: {listed}"
            assert sink.quarantine(bad, "again") is None, "quarantining what is gone returns None"

    def test_unverifiable_names_a_manifest_that_cannot_be_believed(self, tmp_path: Path):
        """``unverifiable()``, when overridden: a step directory whose manifest is not valid JSON
        is listed with its step and a reason, and is never committed."""
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            self.overriding(sink, "unverifiable")
            store = self.checkpoint_store(sink)
            self.store(sink, run, Role.RESUME, 2)
            store.fs.makedirs(store.path_of(run.name, step_dirname(6)), exist_ok=True)
            store.fs.pipe_file(posixpath.join(store.path_of(run.name, step_dirname(6)), "manifest.json"), b"{not json")
            found = list(sink.unverifiable())
            assert [m.step for _, m in sink.committed()] == [2]
        assert [(step, bool(reason)) for _, step, reason in found] == [(6, True)], f"unverifiable() gave {found}"

    def test_clean_incomplete_removes_this_runs_staging_only(self, tmp_path: Path):
        """``clean_incomplete()``, when overridden: this run's unfinished save is removed and
        reported; its committed checkpoints and another run's staging stay."""
        self.require(Role.RESUME)
        run, other = self.run_info(), self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            self.overriding(sink, "clean_incomplete")
            store = self.checkpoint_store(sink)
            self.store(sink, run, Role.RESUME, 2)
            mine = store.prepare(run.name, step_dirname(4))
            theirs = store.prepare(other.name, step_dirname(4))
            removed = list(sink.clean_incomplete())
            assert len(removed) == 1 and str(removed[0].describe()), f"clean_incomplete() gave {removed}"
            assert not store.fs.exists(mine), "this run's staging is still there"
            assert store.fs.exists(theirs), "another run's staging was removed"
            assert [m.step for _, m in sink.committed()] == [2]

    def test_lease_store_holds_one_writer_per_run(self, tmp_path: Path):
        """``lease_store()``, when overridden: a lease taken there refuses a second holder until
        it is released."""
        from wmtp_core.lease import Lease, LeaseHeldError

        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            self.overriding(sink, "lease_store")
            first = Lease(sink.lease_store(), run.name)
            first.acquire()
            try:
                with pytest.raises(LeaseHeldError):
                    Lease(sink.lease_store(), run.name).acquire()
            finally:
                first.release()
            second = Lease(sink.lease_store(), run.name)
            second.acquire()
            second.release()

    def test_held_lists_what_was_stored(self, tmp_path: Path):
        """``held(run_name)``, when overridden: every stored checkpoint of each declared role,
        with its role and its step (or ``None`` where the sink cannot tell it)."""
        run = self.run_info()
        stored = set()
        for step, role in enumerate(self.declared(), start=3):
            with self.opened(tmp_path, role, run) as sink:
                self.overriding(sink, "held")
                self.store(sink, run, role, step)
                stored.add((role, step))
        with self.opened(tmp_path, self.declared()[-1], run) as sink:
            held = [(h.role, h.step) for h in sink.held(run.name, {run.lineage})]
        for role, step in stored:  # a step of None: the sink cannot tell it
            assert (role, step) in held or (role, None) in held, f"held() lists {held}, stored {sorted(stored)}"

    def test_record_evaluation_keeps_metrics_beside_a_checkpoint_without_touching_it(self, tmp_path: Path):
        """``record_evaluation(uri, metrics)`` and ``evaluations()``, when overridden: the metrics
        come back under the checkpoint's step and lineage, the checkpoint still loads as stored
        (its manifest untouched), and deleting it forgets them."""
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            self.overriding(sink, "record_evaluation")
            payload, receipt = self.store(sink, run, Role.RESUME, 6)
            before = dict(sink.committed())[receipt.uri]
            assert sink.record_evaluation(receipt.uri, {"eval/mbpp/pass_at_1": 0.25}) is True
            assert sink.evaluations() == {(6, run.lineage): {"eval/mbpp/pass_at_1": 0.25}}
            assert dict(sink.committed())[receipt.uri] == before, "recording changed the committed manifest"
            sink.load(receipt.uri)  # still verifies
            sink.delete(receipt.uri)
            assert sink.evaluations() == {}, "the record outlived its checkpoint"
