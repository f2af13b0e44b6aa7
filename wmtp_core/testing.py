"""The sink contract: tests every sink must pass, shipped for plugin authors.

Subclass :class:`SinkContract` in a pytest file of your own package and say how to build your
sink; pytest then runs every ``test_*`` method below against it::

    # tests/test_contract.py
    from wmtp_core import Role
    from wmtp_core.testing import SinkContract

    import mypkg


    class TestMySink(SinkContract):
        sink_name = "mysink"                 # the name your SinkSpec registers
        roles = (Role.RESUME, Role.FINAL)    # the roles your SinkSpec declares
        plugin = mypkg                       # optional: checks the registered SinkSpec too

        def make_sink(self, context):
            return mypkg.MySink(context)

        def base_path(self, tmp_path):       # optional; default: a folder under tmp_path
            return f"file://{tmp_path}/store"

The class name must start with ``Test`` so pytest collects it; ``SinkContract`` itself does not,
so importing it collects nothing. Checks that do not apply to your sink are skipped with the
reason (for example the resume checks, for a sink that serves only the final role).

What is checked, for each role the sink declares:

- ``store(event=, payload=)`` returns a :class:`wmtp_core.Receipt` with the role, step and run
  of the event, and ``nbytes > 0`` (the router stamps the sink's name and the time it took);
- resume: ``committed()`` lists exactly the stored steps, oldest first (step 10 after step 6),
  under the URIs the receipts gave, with manifests whose run, step, role and lineage match; a
  final model stored in the same run is not listed;
- resume: ``load(uri)`` returns a :class:`wmtp_core.LoadedCheckpoint` whose parts are as stored
  (``torch.equal`` for every tensor);
- resume, file-like sinks (a ``checkpoints`` :class:`~wmtp_core.CheckpointStore` attribute, as
  :class:`~wmtp_core.FileSink` has): a flipped byte in a stored file makes ``load()`` raise
  :class:`~wmtp_core.CheckpointError` naming the file, a step directory WMTP began without
  committing (staging) is never listed, and one another tool wrote is neither listed nor
  overwritten;
- resume: ``delete(uri)`` removes the checkpoint from ``committed()``;
- ``location()`` and the receipts contain no credential: no value of a storage option whose key
  looks secret by :mod:`wmtp_core.redact`'s rule;
- final: a final payload (weights, module, example input, architecture) is stored, and
  ``stored_final(run)``, if the sink has it, returns ``None`` before and the receipt's URI after;
- through a :class:`wmtp_core.router.Router` whose catalog holds only this sink, ``store()`` is
  called exactly once per emit, with keyword arguments, and the receipts carry the sink's name.

The tensors are small but real: a one-layer :class:`~wmtp_core.engine.model.MTPModel`, an AdamW
state after one step, and trainer state with an RNG stream.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from wmtp_core import redact
from wmtp_core.bindings import Bindings, SinkBinding
from wmtp_core.catalog import Catalog, SinkSpec
from wmtp_core.commit import CheckpointStore, step_dirname
from wmtp_core.errors import CheckpointError
from wmtp_core.events import Payload, Receipt, RunInfo, SinkContext
from wmtp_core.manifest import Manifest
from wmtp_core.plugins import build_catalog, make_plugin_manager
from wmtp_core.roles import Role
from wmtp_core.router import Router
from wmtp_core.sinks import FileLikeSink, LoadedCheckpoint, ResumableSink, Sink
from wmtp_core.tensors import tensor_bytes
from wmtp_core.testing_optional import OptionalOperations
from wmtp_core.testing_payloads import (  # noqa: F401  (public: for plugin authors' own tests)
    TINY,
    assert_same,
    event_for,
    final_payload,
    payload_for,
    resume_payload,
    tiny_model,
)

__all__ = ["TINY", "SinkContract", "assert_same", "event_for", "final_payload", "payload_for", "resume_payload",
           "tiny_model"]


# -- the contract ---------------------------------------------------------------------------
class SinkContract(OptionalOperations):
    """Subclass as ``class TestMySink(SinkContract)`` and override :meth:`make_sink`.

    Override :meth:`base_path`, :meth:`storage_options` or :meth:`make_context` when your sink
    needs a particular location, credentials or MLflow settings.
    """

    sink_name: str = ""
    """The name the sink is registered under (``SinkSpec.name``); receipts must carry it."""
    roles: tuple[Role, ...] = ()
    """The roles the sink declares (``SinkSpec.roles``)."""
    plugin: Any = None
    """Optional: the plugin module or object; if set, its registered SinkSpec is checked too."""

    # -- what a plugin author provides ---------------------------------------------------
    def make_sink(self, context: SinkContext) -> Any:
        """Build the sink under test, as its ``SinkSpec.factory`` would."""
        raise NotImplementedError(f"{type(self).__name__} must override make_sink(self, context)")

    def base_path(self, tmp_path: Path) -> str:
        """The base URL the sink stores under. Each test uses its own run name below it."""
        return f"file://{tmp_path}/sink"

    def storage_options(self, tmp_path: Path) -> dict[str, Any]:
        """``SinkContext.options``. The default plants a fake token, which fsspec filesystems
        accept, so :meth:`test_location_has_no_credential` has a credential to look for."""
        return {"token": "wmtp-contract-fake-token-5f1d"}

    def make_context(self, tmp_path: Path, role: Role, run: RunInfo) -> SinkContext:
        """The context the sink factory gets for ``role`` of ``run``."""
        return SinkContext(role=role, run=run, base_path=self.base_path(tmp_path),
                           options=self.storage_options(tmp_path))

    # -- helpers -------------------------------------------------------------------------
    def run_info(self) -> RunInfo:
        """A run of its own per test, so a shared remote base path never mixes two tests."""
        return RunInfo(name=f"contract-{uuid.uuid4().hex[:10]}", algo="baseline-mtp",
                       lineage=uuid.uuid4().hex)

    def declared(self) -> tuple[Role, ...]:
        if not self.sink_name or not self.roles:
            raise TypeError(f"{type(self).__name__} must set sink_name and roles, "
                            "e.g. sink_name = 'mysink'; roles = (Role.RESUME,)")
        return tuple(Role(r) for r in self.roles)

    def require(self, role: Role) -> None:
        if role not in self.declared():
            pytest.skip(f"{self.sink_name} does not serve the {role.value} role")

    @contextlib.contextmanager
    def opened(self, tmp_path: Path, role: Role, run: RunInfo) -> Iterator[Any]:
        """The sink for ``role`` of ``run``, closed afterwards as the router would."""
        sink = self.make_sink(self.make_context(tmp_path, role, run))
        base = ResumableSink if role is Role.RESUME else Sink
        assert isinstance(sink, base), (
            f"make_sink() built a {type(sink).__name__}, which is not a wmtp_core.{base.__name__}")
        try:
            yield sink
        finally:
            sink.close()

    def store(self, sink: Any, run: RunInfo, role: Role, step: int) -> tuple[Payload, Receipt]:
        payload = payload_for(role, step)
        receipt = sink.store(event=event_for(run, role, step, payload), payload=payload)
        return payload, receipt

    def checkpoint_store(self, sink: Any) -> CheckpointStore:
        """The sink's :class:`CheckpointStore`; skips the test for sinks that are not file-like."""
        store = sink.checkpoints if isinstance(sink, FileLikeSink) else None
        if not isinstance(store, CheckpointStore):
            pytest.skip(f"{self.sink_name} is not a FileLikeSink (no checkpoints store): not a file-like sink, "
                        "so its files cannot be reached to corrupt or stage")
        return store

    def counting_router(self, tmp_path: Path, run: RunInfo, calls: list[dict[str, Any]]) -> Router:
        """An open router whose catalog holds only this sink, for every declared role, wrapped
        so that each ``store()`` call is appended to ``calls``."""
        catalog = Catalog()
        # the router builds its context from the binding; the test's own context (credentials,
        # MLflow settings) is what the sink under test is built with
        catalog.add_sink(SinkSpec(name=self.sink_name, roles=self.declared(), factory=lambda context: _Counting(
            self.make_sink(self.make_context(tmp_path, context.role, context.run)), calls)))
        bindings = Bindings(sinks=[SinkBinding(role=r, sink=self.sink_name, base_path=self.base_path(tmp_path))
                                   for r in self.declared()])
        return Router(make_plugin_manager(entry_points=False), catalog, bindings, run,
                      required=frozenset(self.declared())).open()

    # -- the checks ----------------------------------------------------------------------
    def test_plugin_registers_the_declared_roles(self):
        """The plugin's SinkSpec has the name and roles this test class says."""
        if self.plugin is None:
            pytest.skip("set plugin = <your plugin module> to check its registered SinkSpec")
        pm = make_plugin_manager(entry_points=False)
        pm.register(self.plugin, name=f"contract-{self.sink_name}")
        spec = build_catalog(pm).sinks.get(self.sink_name)
        assert spec is not None, f"the plugin registers no sink named {self.sink_name!r}"
        assert spec.roles == frozenset(self.declared()), (
            f"the plugin declares {sorted(r.value for r in spec.roles)}, "
            f"the test class {sorted(r.value for r in self.declared())}")

    def test_store_returns_a_receipt(self, tmp_path: Path):
        run = self.run_info()
        for step, role in enumerate(self.declared(), start=3):
            with self.opened(tmp_path, role, run) as sink:
                _, receipt = self.store(sink, run, role, step)
            assert isinstance(receipt, Receipt), f"store() returned {receipt!r}, not a wmtp_core.Receipt"
            assert receipt.role is role, f"receipt.role is {receipt.role!r}, stored {role!r}"
            assert receipt.step == step, f"receipt.step is {receipt.step}, stored {step}"
            assert receipt.run == run.name, f"receipt.run is {receipt.run!r}, not {run.name!r}"
            assert isinstance(receipt.uri, str) and receipt.uri, f"receipt.uri is {receipt.uri!r}"
            assert receipt.nbytes > 0, f"receipt.nbytes is {receipt.nbytes}"

    def test_committed_lists_stored_steps_oldest_first(self, tmp_path: Path):
        self.require(Role.RESUME)
        run = self.run_info()
        if Role.FINAL in self.declared():  # a final model in the same run is not a resume point
            with self.opened(tmp_path, Role.FINAL, run) as final:
                self.store(final, run, Role.FINAL, 10)
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            assert list(sink.committed()) == [], "committed() of a run that stored nothing"
            uris = {step: self.store(sink, run, Role.RESUME, step)[1].uri for step in (2, 10, 6)}
            committed = list(sink.committed())
        steps = [m.step for _, m in committed]
        assert steps == [2, 6, 10], f"committed() lists steps {steps}, expected [2, 6, 10]"
        for uri, manifest in committed:
            assert isinstance(manifest, Manifest), f"committed() gave {manifest!r}, not a Manifest"
            assert uri == uris[manifest.step], (
                f"committed() lists step {manifest.step} as {uri!r}, store() returned "
                f"{uris[manifest.step]!r}; retention and --resume compare these strings")
            assert (manifest.run, manifest.role, manifest.lineage) == (run.name, Role.RESUME, run.lineage), (
                f"manifest of step {manifest.step}: run {manifest.run!r}, role {manifest.role!r}, "
                f"lineage {manifest.lineage!r}")

    def test_load_returns_what_was_stored(self, tmp_path: Path):
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            payload, receipt = self.store(sink, run, Role.RESUME, 4)
            loaded = sink.load(receipt.uri)
        assert isinstance(loaded, LoadedCheckpoint), f"load() gave {loaded!r}, not a LoadedCheckpoint"
        manifest = loaded.manifest
        assert manifest.step == 4 and manifest.lineage == run.lineage, f"load() gave {manifest!r}"
        assert_same(dict(payload.parts), dict(loaded.parts))

    def test_load_refuses_a_flipped_byte(self, tmp_path: Path):
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            store = self.checkpoint_store(sink)
            _, receipt = self.store(sink, run, Role.RESUME, 4)
            (_, manifest), = sink.committed()
            entry = max(manifest.files, key=lambda f: f.size)
            path = posixpath.join(type(store.fs)._strip_protocol(receipt.uri), entry.path)
            data = bytearray(store.fs.cat_file(path))
            data[len(data) // 2] ^= 0xFF
            store.fs.pipe_file(path, bytes(data))
            with pytest.raises(CheckpointError) as err:
                sink.load(receipt.uri)
        assert entry.path in str(err.value), f"the error does not name {entry.path}: {err.value}"

    def test_delete_removes_from_committed(self, tmp_path: Path):
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            old = self.store(sink, run, Role.RESUME, 2)[1].uri
            new = self.store(sink, run, Role.RESUME, 4)[1].uri
            sink.delete(old)
            left = [uri for uri, _ in sink.committed()]
            assert left == [new], f"after delete({old!r}) committed() lists {left}"
            with pytest.raises(CheckpointError):
                sink.load(old)

    def test_staging_is_never_listed(self, tmp_path: Path):
        """A step directory WMTP began without committing (a crashed save) is invisible, and a
        later save of the same step replaces it."""
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            store = self.checkpoint_store(sink)
            self.store(sink, run, Role.RESUME, 2)
            staging = store.prepare(run.name, step_dirname(8))  # marked as WMTP's, as a save does
            store.fs.pipe_file(posixpath.join(staging, "model.pt"), b"half a checkpoint")
            steps = [m.step for _, m in sink.committed()]
            assert steps == [2], f"with staging at step 8, committed() lists steps {steps}"
            payload, receipt = self.store(sink, run, Role.RESUME, 8)
            assert [m.step for _, m in sink.committed()] == [2, 8]
            assert_same(dict(payload.parts), dict(sink.load(receipt.uri).parts))

    def test_a_directory_wmtp_did_not_write_is_never_listed_nor_overwritten(self, tmp_path: Path):
        """Another tool's ``step_N`` directory (no manifest, no staging marker) is not a
        checkpoint, and a save of that step refuses to replace it."""
        self.require(Role.RESUME)
        run = self.run_info()
        with self.opened(tmp_path, Role.RESUME, run) as sink:
            store = self.checkpoint_store(sink)
            foreign = posixpath.join(store.path_of(run.name, step_dirname(12)), "pytorch_model.bin")
            store.fs.makedirs(posixpath.dirname(foreign), exist_ok=True)
            store.fs.pipe_file(foreign, b"another tool's weights")
            assert list(sink.committed()) == [], "a foreign directory is listed as committed"
            with pytest.raises(CheckpointError, match="not written by WMTP"):
                self.store(sink, run, Role.RESUME, 12)
            assert store.fs.cat_file(foreign) == b"another tool's weights"

    def test_location_has_no_credential(self, tmp_path: Path):
        secrets = {k: str(v) for k, v in self.storage_options(tmp_path).items()
                   if redact.is_secret_key(k) and v not in (None, "")}
        if not secrets:
            pytest.skip("storage_options() holds no credential-looking option to look for")
        run = self.run_info()
        for step, role in enumerate(self.declared(), start=1):
            with self.opened(tmp_path, role, run) as sink:
                _, receipt = self.store(sink, run, role, step)
                shown = {"location()": sink.location(), "receipt": repr(receipt)}
            for what, text in shown.items():
                assert isinstance(text, str) and text
                for key, value in secrets.items():
                    assert value not in text, f"{what} shows the value of storage option {key!r}: {text}"

    def test_final_model_is_stored_once_and_found(self, tmp_path: Path):
        self.require(Role.FINAL)
        run = self.run_info()
        with self.opened(tmp_path, Role.FINAL, run) as sink:
            find = sink.stored_final if type(sink).overrides("stored_final") else None
            if find is not None:
                assert find(run) is None, "stored_final() names a model before any was stored"
            _, receipt = self.store(sink, run, Role.FINAL, 6)
            assert receipt.role is Role.FINAL and receipt.step == 6
            store = sink.checkpoints if isinstance(sink, FileLikeSink) else None
            if isinstance(store, CheckpointStore):  # file-like: the receipt names a committed directory
                manifest = store.verify(type(store.fs)._strip_protocol(receipt.uri))
                assert (manifest.role, manifest.step, manifest.run) == (Role.FINAL, 6, run.name)
            if find is None:
                pytest.skip(f"{self.sink_name} has no stored_final(run): a resumed run that had "
                            "finished cannot tell that its final model is already stored")
            found = find(run)
            assert isinstance(found, Receipt) and (found.uri, found.step) == (receipt.uri, 6), \
                f"stored_final() gives {found!r}, stored at {receipt.uri!r} (step 6)"

    def test_router_calls_store_once_per_emit(self, tmp_path: Path):
        run = self.run_info()
        calls: list[dict[str, Any]] = []
        router = self.counting_router(tmp_path, run, calls)
        try:
            emits = [(r, s) for r in self.declared() for s in ((2, 4) if r is Role.RESUME else (4,))]
            for n, (role, step) in enumerate(emits, start=1):
                payload = payload_for(role, step)
                receipt = router.emit(role, step=step, payload=payload,
                                      nbytes=tensor_bytes(payload.parts))
                assert len(calls) == n, (
                    f"after emit #{n} ({role.value}, step {step}): {len(calls)} store() calls")
                assert set(calls[-1]) == {"event", "payload"}
                assert calls[-1]["payload"] is payload
                assert receipt.role is role and receipt.step == step
                assert receipt.sink == self.sink_name, (
                    f"the router stamped {receipt.sink!r} on the receipt, not {self.sink_name!r}")
        finally:
            router.close()


class _Counting(ResumableSink):
    """Forwards to the sink under test, counting store() calls into ``calls``."""

    def __init__(self, sink: Any, calls: list[dict[str, Any]]) -> None:
        self.sink = sink
        self.calls = calls

    def store(self, *args, **kwargs):
        assert not args, "the router calls store() with keyword arguments only"
        self.calls.append(kwargs)
        return self.sink.store(**kwargs)

    def location(self) -> str:
        return self.sink.location()

    def close(self) -> None:
        self.sink.close()

    def stored_final(self, run: Any) -> Receipt | None:
        return self.sink.stored_final(run)

    def committed(self) -> list:
        return self.sink.committed()

    def delete(self, uri: str) -> None:
        self.sink.delete(uri)
