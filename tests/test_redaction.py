"""One redaction rule, everywhere: params, tags, console lines, error messages, the summary and
manifests never show a secret."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from builders import files, tiny_config
from conftest import free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core import redact
from wmtp_core.config import load_settings

WORDS = ["key", "secret", "token", "password", "passphrase", "credential", "signature",
         "connection string", "account key", "SSECustomerKey", "passwd", "auth"]


@st.composite
def secret_keys(draw):
    """Names that contain a secret word, in any case, with any separators around it."""
    word = draw(st.sampled_from(WORDS))
    sep = draw(st.sampled_from(["_", "-", ".", "", " "]))
    word = sep.join(re.split(r"[ ]", word))
    word = draw(st.sampled_from([word, word.upper(), word.title(), word.lower()]))
    prefix = draw(st.sampled_from(["", "aws", "db", "x-amz", "My", "sse"]))
    suffix = draw(st.sampled_from(["", "id", "value", "V2"]))
    return sep.join(p for p in (prefix, word, suffix) if p)


secret_values = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789",
                        min_size=10, max_size=24).map(lambda s: "Zq" + s)


@st.composite
def secret_urls(draw):
    """``(url, secrets)``: user-info and signature query parameters."""
    user, password, sig, cred = (draw(secret_values) for _ in range(4))
    scheme = draw(st.sampled_from(["http", "https", "s3", "postgresql+psycopg2"]))
    form = draw(st.sampled_from(["userinfo", "query", "both"]))
    auth = f"{user}:{password}@" if form != "query" else ""
    query = f"?X-Amz-Signature={sig}&X-Amz-Credential={cred}&sig={sig}&keep=1" if form != "userinfo" else ""
    secrets = ([password] if form != "query" else []) + ([sig, cred] if form != "userinfo" else [])
    return f"{scheme}://{auth}host.example:5000/path{query}", secrets


@settings(max_examples=200, deadline=None)
@given(key=secret_keys(), value=secret_values)
def test_a_value_under_a_secret_looking_key_is_hidden_everywhere(key, value):
    assert redact.is_secret_key(key)
    data = {"storage": {"resume": {"options": {key: value, "endpoint_url": "http://ok"}}},
            "launcher": {"env": {key: value}}, "nested": {key: {"inner": value}}}
    shown = json.dumps(redact.mapping(data))
    assert value not in shown and "http://ok" in shown
    redact.remember([value])
    for text in (f"{key}={value}", f"{key}: {value}", f"failed with {value!r}", f"x?{key}={value}&y=1"):
        assert value not in redact.text(text)


@settings(max_examples=200, deadline=None)
@given(case=secret_urls())
def test_user_info_and_signature_parameters_are_hidden_in_any_text(case):
    url, secrets = case
    for text in (url, f"cannot reach {url}: connection refused", f"('{url}', 500)"):
        shown = redact.text(text)
        assert not any(s in shown for s in secrets), shown
        assert "host.example:5000/path" in shown  # only the secret parts go


@settings(max_examples=40, deadline=None)
@given(key=secret_keys(), value=secret_values, case=secret_urls())
def test_params_and_the_dry_run_show_no_secret(tmp_path_factory, key, value, case):
    """Secrets anywhere in a config: none reaches the flattened params (what MLflow receives)
    or anything a --dry-run --verbose prints."""
    import contextlib
    import io

    from wmtp_core.run import main

    tmp = tmp_path_factory.mktemp("dry")
    url, url_secrets = case
    # the URL goes where any URL may go; as a tracking URI only where MLflow accepts its scheme
    tracking = url if not url.startswith("s3://") else "sqlite:///" + str(tmp / "mlflow.db")
    config = tiny_config(tmp, launcher={key: value, "endpoint": url},
                         storage={"resume": {"sink": "local", "options": {key: value}}},
                         mlflow={"tracking_uri": tracking, "registry_uri": tracking})
    args = files(tmp, config)
    params = json.dumps(load_settings(args[1], args[3]).params())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--dry-run", "--verbose"])
    shown = params + out.getvalue() + err.getvalue()
    assert code == 0, err.getvalue()
    for secret in [value, *url_secrets]:
        assert secret not in shown


def test_wmtps_own_settings_that_only_look_secret_are_shown():
    params = load_settings().params()
    assert params["recipe.critic.token_spread"] == "uniform"


def test_log_records_from_any_library_are_scrubbed(caplog):
    redact.remember(["Zq-log-secret-123"])
    record = logging.LogRecord("botocore", logging.WARNING, __file__, 1,
                               "retrying %s with %s", ("https://u:pw-in-url@h/x", "Zq-log-secret-123"), None)
    assert redact.RedactingFilter().filter(record)
    assert record.getMessage() == "retrying https://***@h/x with ***"


@pytest.mark.parametrize("uri,where", [
    ("http://alice:Zq-pw-1@127.0.0.1:5000/", "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"),
    ("https://mlflow.example.com/prefix?token=Zq-tok-2",
     "https://mlflow.example.com/prefix/#/experiments/7?workflowType=machine_learning"),
    ("sqlite:///runs/mlflow.db", "`mlflow server --backend-store-uri sqlite:///runs/mlflow.db`, then "
                                 "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"),
    ("databricks://profile", None),
])
def test_the_address_of_an_experiment_carries_no_credential(uri, where):
    from wmtp_plugins._mlflow import where_to_browse

    assert where_to_browse(uri, "7") == where


@pytest.mark.slow
def test_a_run_whose_registry_is_down_writes_no_secret_anywhere(tmp_path, monkeypatch, capsys):
    """The two reported leaks, for real: an SSE-C key in the sink options (an MLflow param
    before), and a registry URL with a password (printed and tagged when unreachable)."""
    from wmtp_core.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Zq-env-password-0042")
    secrets = {"sse": "Zq-sse-c-key-0123456789abcdef", "url": "Zq-url-password-77",
               "launcher": "Zq-launcher-token-5", "tag": "Zq-tag-value-31", "conn": "Zq-conn-pw-9"}
    config = tiny_config(
        tmp_path,
        storage={"resume": {"sink": "local", "options": {
            "s3_additional_kwargs": {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": secrets["sse"]}}}},
        launcher={"api_token": secrets["launcher"],
                  "env": {"DB": f"Server=db;User Id=u;Password={secrets['conn']};"}},
        mlflow={"registry_uri": f"http://alice:{secrets['url']}@127.0.0.1:{free_port()}"})
    code = main([*files(tmp_path, config), "--tags", f"deploy_key={secrets['tag']},team=ml", "--verbose"])
    out, err = capsys.readouterr()
    assert code == 3, err
    assert "final model not stored" in err and "http://***@127.0.0.1" in err

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
    assert run.data.tags["team"] == "ml" and run.data.tags["deploy_key"] == "***"
    assert "http://***@127.0.0.1" in run.data.tags["wmtp.reason"]
    assert run.data.params["config.storage.resume.options.s3_additional_kwargs.SSECustomerKey"] == "***"

    written = {"stdout": out, "stderr": err} | {
        str(p): p.read_bytes().decode("latin-1") for p in Path(tmp_path).rglob("*")
        if p.is_file() and p.suffix != ".yaml"}
    for name, secret in [*secrets.items(), ("env", "Zq-env-password-0042")]:
        leaks = [where for where, text in written.items() if secret in text]
        i = err.find(secret)
        assert not leaks, f"the {name} secret was written to {leaks}: {err[max(0, i - 1500):i + 200]}"


@pytest.mark.parametrize("text, shown", [
    ("https://alice:pw@host/x", "https://***@host/x"),
    ("see s3://key:secretvalue@bucket and http://u@h", "see s3://***@bucket and http://***@h"),
    ("+https://user:pw@host", "+https://***@host"),
    ("?X-Amz-Signature=abc123&x=1", "?X-Amz-Signature=***&x=1"),
    ("AccountKey=zzz;Other=1", "AccountKey=***;Other=1"),
    ("token%3Dabc&sig=q", "token%3D***&sig=***"),
    ("12abc_password=hunter2 ok", "12abc_password=*** ok"),
    ("name=value plain", "name=value plain"),
    # a hostile configuration's value, quoted by an error: redacted in one pass, not one per
    # character (the patterns used to backtrack into the run: minutes for 200 kB)
    ("a" * 200_000 + " https://u:p@h", "a" * 200_000 + " https://***@h"),
    ("x=" + "a=b&" * 50_000 + "secret=s", "x=" + "a=b&" * 50_000 + "secret=***"),
])
def test_every_secret_shape_is_hidden_in_text_of_any_length(text, shown):
    from wmtp_core import redact

    assert redact.text(text) == shown
