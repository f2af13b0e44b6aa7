"""S3 faults (issue 13, item 3): retried by the S3 clients, never a partial commit.

Runs of the ``wmtp`` CLI store their resume state on the loopback S3 server through a proxy of
our own (:mod:`faultproxy`) that answers a share of the requests with ``500 InternalError``,
``503 SlowDown`` or a reset connection. Under 10% of faults a run finishes and everything it
committed verifies; when the clients' retries run out, the run ends with one line naming the
URL, the operation and the last error (exit status 1), its staging is gone when the store lets
the run remove it, and the checkpoint before stays committed.
"""

from __future__ import annotations

import json

import boto3
import botocore.config
import botocore.exceptions
import pytest
from builders import recipe, write
from faultproxy import FaultProxy

from wmtp_core import hookimpl
from wmtp_core.commit import CheckpointStore
from wmtp_core.run import main

pytestmark = pytest.mark.slow

FAST_FAILURE = {"retries": {"max_attempts": 1}}
"""botocore's retries cut to 2 attempts, so that a save under a total outage fails in seconds."""


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server, seed=13) as p:
        yield p


def config(bucket: str, proxy: FaultProxy, *, config_kwargs=None, asynchronous=False, policies=None) -> dict:
    options = {"endpoint_url": proxy.url}
    if config_kwargs is not None:
        options["config_kwargs"] = config_kwargs
    storage = {"resume": {"sink": "s3", "options": options}}
    if policies is not None:
        storage["policies"] = policies
    return {
        "seed": 5,
        "mlflow": None,
        "paths": {"checkpoints": {"base_path": f"s3://{bucket}/runs", "save_interval": 2, "keep_last": 2,
                                  "save_final": False, "async": asynchronous}},
        "storage": storage,
    }


def run(tmp_path, monkeypatch, capsys, cfg: dict, steps: int, *extra: str, plugins=()):
    write(tmp_path / "c.yaml", cfg)
    write(tmp_path / "r.yaml", recipe(steps))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r", *extra], plugins=plugins)
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """WMTP's error lines (the loopback S3 server logs its requests to the same stderr)."""
    return [line for line in err.splitlines() if line.startswith("error: ")]


def objects(endpoint: str, bucket: str) -> dict[str, int]:
    """Every object in the bucket with its size, listed straight from the server (no proxy)."""
    client = boto3.client("s3", endpoint_url=endpoint)
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


def committed(endpoint: str, bucket: str) -> list[int]:
    """The steps whose every file verifies, after checking that no manifest in the bucket names
    an object that is missing or has another size."""
    listing = objects(endpoint, bucket)
    client = boto3.client("s3", endpoint_url=endpoint)
    for key in (k for k in listing if k.endswith("/manifest.json")):
        manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        where = key.rsplit("/", 1)[0]
        for entry in manifest["files"]:
            assert listing.get(f"{where}/{entry['path']}") == entry["size"], (key, entry)
    store = CheckpointStore.from_url(f"s3://{bucket}/runs", endpoint_url=endpoint, skip_instance_cache=True)
    steps = []
    for path, manifest in store.list("r"):
        store.verify(path)
        steps.append(manifest.step)
    return steps


class Outage:
    """Turns the proxy's faults on once step ``after`` is committed, and off again as the run
    ends: the run's lease (one writer per run) is released when the process leaves the run, and
    a lease left behind by this very process would refuse the resume that follows for its
    timeout."""

    def __init__(self, proxy: FaultProxy, after: int, **faults) -> None:
        self.proxy, self.after, self.faults = proxy, after, faults

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        if receipt.step == self.after:
            self.proxy.configure(**self.faults)

    @hookimpl
    def wmtp_run_ended(self, event):
        self.proxy.configure(rate=0.0, match=None)


# ----------------------------------------------------------------------------- the proxy itself
def client(proxy: FaultProxy, **config):
    return boto3.client("s3", endpoint_url=proxy.url, config=botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": 1}, **config))


def test_the_proxy_injects_each_kind_of_fault_it_is_set_to(proxy, bucket):
    s3 = client(proxy, read_timeout=0.3)
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
    assert proxy.injected == 0
    for kind, expected in (("500", "InternalError"), ("503", "SlowDown")):
        proxy.configure(rate=1.0, kinds=[kind])
        with pytest.raises(botocore.exceptions.ClientError) as e:
            s3.get_object(Bucket=bucket, Key="k")
        assert e.value.response["Error"]["Code"] == expected
    proxy.configure(kinds=["reset"])
    for _ in range(6):  # each moment of a reset (drawn: before, after forwarding, mid-body)
        with pytest.raises((botocore.exceptions.BotoCoreError, OSError)):
            s3.get_object(Bucket=bucket, Key="k")["Body"].read()
    proxy.configure(kinds=["slow"])
    proxy.slow_s = 1.0
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        s3.get_object(Bucket=bucket, Key="k")
    proxy.configure(rate=0.0)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x" * 1000
    assert proxy.counts["500"] == proxy.counts["503"] == proxy.counts["slow"] == 1
    assert proxy.counts["reset"] == 6
    assert sum(proxy.counts[f"reset-{m}"] for m in ("before", "after", "mid-body")) == 6


def test_the_same_seed_gives_the_same_faults(s3_server, bucket):
    seen = []
    for _ in range(2):
        with FaultProxy(s3_server, rate=0.5, kinds=["500", "503"], seed=7) as p:
            s3 = client(p)
            outcome = []
            for i in range(20):
                try:
                    s3.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x")
                    outcome.append("ok")
                except botocore.exceptions.ClientError as e:
                    outcome.append(e.response["Error"]["Code"])
            seen.append(outcome)
    assert seen[0] == seen[1] and {"ok", "InternalError", "SlowDown"} <= set(seen[0])


def test_the_proxy_faults_only_the_requests_it_matches(proxy, bucket):
    s3 = client(proxy)
    proxy.configure(rate=1.0, kinds=["500"], match=r"^PUT /[^?]*/model\.pt")
    s3.put_object(Bucket=bucket, Key="a/trainer.pt", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError):
        s3.put_object(Bucket=bucket, Key="a/model.pt", Body=b"x")
    assert proxy.counts["requests"] == 2 and proxy.injected == 1


# ----------------------------------------------------------------------------- retries, defaults
def test_the_sink_sets_botocores_retries_and_timeouts_under_the_users_options(s3_server, bucket, monkeypatch):
    from wmtp_core import RunInfo, SinkContext
    from wmtp_plugins import s3

    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    run_info = RunInfo(name="r", algo="baseline-mtp", lineage="L")

    def sink(**options):
        return s3.S3Sink(SinkContext(role="resume", run=run_info, base_path=f"s3://{bucket}/runs",
                                     options={"skip_instance_cache": True, **options}))

    fs = sink().checkpoints.fs
    assert fs.config_kwargs == {"connect_timeout": 5, "read_timeout": 15,
                                "retries": {"mode": "standard", "max_attempts": 4}}
    assert fs.retries == s3.S3FS_ATTEMPTS == 3
    assert fs.default_block_size == s3.BLOCK_SIZE
    # the client s3fs builds has them
    client_config = fs.s3.meta.config
    assert client_config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert (client_config.connect_timeout, client_config.read_timeout) == (5, 15)

    mine = sink(config_kwargs={"retries": {"mode": "adaptive"}, "read_timeout": 60}).checkpoints.fs
    assert mine.config_kwargs == {"connect_timeout": 5, "read_timeout": 60,
                                  "retries": {"mode": "adaptive", "max_attempts": 4}}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")  # botocore's own setting is honoured
    assert sink().checkpoints.fs.config_kwargs["retries"] == {"mode": "standard"}


REFUSED_OPTIONS = {
    "a misspelt option": ({"endpoint": "http://x"}, "storage.resume.options.endpoint: 'http://x' is not "
                          "accepted: sink 's3' takes no option 'endpoint'; did you mean 'endpoint_url'?"),
    "an unknown Config option": ({"config_kwargs": {"retry": {"mode": "standard"}}},
                                 "storage.resume.options.config_kwargs.retry: {'mode': 'standard'} is not "
                                 "accepted: botocore's Config takes no option 'retry'"),
    "an unknown retry mode": ({"config_kwargs": {"retries": {"mode": "eager"}}},
                              "storage.resume.options.config_kwargs.retries: {'mode': 'eager'} is not accepted"),
    "a timeout that is not a number": ({"config_kwargs": {"read_timeout": "soon"}},
                                       "storage.resume.options.config_kwargs.read_timeout: 'soon' is not accepted"),
    "a negative retry count": ({"config_kwargs": {"retries": {"max_attempts": -1}}},
                               "storage.resume.options.config_kwargs.retries: {'max_attempts': -1} is not accepted"),
    "a secret under a misspelt key": ({"secret_key": "wmtp-do-not-print-me"},
                                      "storage.resume.options.secret_key: '***' is not accepted"),
}


@pytest.mark.parametrize("case", list(REFUSED_OPTIONS))
def test_an_option_s3fs_does_not_take_is_refused_before_the_run_in_the_dry_runs_words(
        tmp_path, monkeypatch, capsys, s3_server, bucket, case):
    options, message = REFUSED_OPTIONS[case]
    cfg = {"mlflow": None, "paths": {"checkpoints": {"base_path": f"s3://{bucket}/runs", "save_final": False}},
           "storage": {"resume": {"sink": "s3", "options": options}}}
    dry = run(tmp_path, monkeypatch, capsys, cfg, 2, "--dry-run")
    real = run(tmp_path, monkeypatch, capsys, cfg, 2)
    assert dry[0] == real[0] == 2
    assert error_lines(dry[2]) == error_lines(real[2]), "the dry run and the run refuse in different words"
    (line,) = error_lines(real[2])
    assert message in line, line
    assert "Traceback" not in real[2]
    assert "accepted (s3fs storage options): anon, " in line or "config_kwargs" in message
    assert "wmtp-do-not-print-me" not in real[2]
    assert objects(s3_server, bucket) == {}, "a refused run wrote something"


# ----------------------------------------------------------------------------- runs under faults
def test_under_10_percent_of_faults_an_s3_run_finishes_and_everything_committed_verifies(
        s3_server, bucket, proxy, tmp_path, monkeypatch, capsys):
    proxy.configure(rate=0.1, kinds=["500", "503", "reset"])
    code, out, err = run(tmp_path, monkeypatch, capsys, config(bucket, proxy), 6)
    assert code == 0, err[-3000:]
    assert committed(s3_server, bucket) == [4, 6]  # keep_last 2
    # and a run resumed under the same faults reads its checkpoint back, then goes on
    code, out, err = run(tmp_path, monkeypatch, capsys, config(bucket, proxy), 10, "--resume", "latest")
    assert code == 0, err[-3000:]
    assert f"s3://{bucket}/runs/r/step_6" in err
    assert committed(s3_server, bucket) == [6, 8, 10]  # retention keeps the one resumed from
    assert not [k for k in objects(s3_server, bucket) if ".wmtp-staging" in k]
    # the runs met every kind of fault, and the clients retried them
    assert proxy.injected >= 8 and proxy.counts["reset"] >= 1, proxy.counts
    assert proxy.counts["500"] + proxy.counts["503"] >= 2, proxy.counts


OUTAGES = {
    # a total outage once step 2 is committed: the first request of step 4's save fails
    "everything": ({"rate": 1.0, "kinds": ["500", "503", "reset"]}, "preparing the staging directory "
                   "s3://{bucket}/runs/r/step_4 failed", "its staging could not be removed"),
    # the upload of model.pt fails, everything else goes through: the run removes its staging
    "model.pt": ({"rate": 1.0, "kinds": ["500", "503", "reset"], "match": r"^(PUT|POST) /[^?]*/step_4/model\.pt"},
                 "writing model.pt to s3://{bucket}/runs/r/step_4/model.pt failed", "its staging was removed"),
    # every file landed, the manifest cannot be written
    "manifest": ({"rate": 1.0, "kinds": ["500"], "match": r"^PUT /[^?]*/step_4/manifest\.json"},
                 "committing the manifest s3://{bucket}/runs/r/step_4/manifest.json failed",
                 "its staging was removed"),
}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("outage", list(OUTAGES))
def test_when_the_retries_run_out_the_run_exits_1_with_one_line_and_the_checkpoint_before_stays(
        s3_server, bucket, proxy, tmp_path, monkeypatch, capsys, outage, asynchronous):
    faults, operation, left = OUTAGES[outage]
    # no retention: with the store down, its listing would fail too, at a moment no test can pin
    cfg = config(bucket, proxy, config_kwargs=FAST_FAILURE, asynchronous=asynchronous, policies=[])
    code, out, err = run(tmp_path, monkeypatch, capsys, cfg, 6, plugins=(Outage(proxy, 2, **faults),))
    assert code == 1, err[-3000:]
    assert "Traceback" not in out + err
    (line,) = error_lines(err)
    assert operation.format(bucket=bucket) in line, line
    assert "after the S3 client's retries (" in line and "nothing of step 4 was committed" in line, line
    assert left in line, line
    if asynchronous:
        assert "the background save of step 4 failed" in line, line
    assert proxy.injected >= 2

    # the checkpoint before stays committed, and no manifest names a missing or short object
    assert committed(s3_server, bucket) == [2]
    keys = objects(s3_server, bucket)
    if left == "its staging was removed":
        assert not [k for k in keys if "/step_4/" in k], keys
    assert not boto3.client("s3", endpoint_url=s3_server).list_multipart_uploads(Bucket=bucket).get("Uploads")

    # the store is back: the run continues from step 2 (clearing what it left) and finishes
    code, _, err = run(tmp_path, monkeypatch, capsys, cfg, 6, "--resume", "latest")
    assert code == 0, err[-3000:]
    assert committed(s3_server, bucket) == [2, 4, 6]


def test_when_the_store_is_down_at_resume_the_run_exits_1_with_one_line_naming_it(
        s3_server, bucket, proxy, tmp_path, monkeypatch, capsys):
    cfg = config(bucket, proxy, config_kwargs=FAST_FAILURE)
    code, _, err = run(tmp_path, monkeypatch, capsys, cfg, 2)
    assert code == 0, err[-3000:]
    proxy.configure(rate=1.0, kinds=["500", "503", "reset"])
    code, out, err = run(tmp_path, monkeypatch, capsys, cfg, 4, "--resume", "latest")
    assert code == 1, err[-3000:]
    assert "Traceback" not in out + err
    (line,) = error_lines(err)
    assert f"reading the resume storage s3://{bucket}/runs/r failed" in line, line
    proxy.configure(rate=0.0)
    assert committed(s3_server, bucket) == [2], "nothing committed was touched"
