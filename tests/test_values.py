"""Values are values: frozen, copied from what they were built with, never aliased."""

from __future__ import annotations

from wmtp_core.bindings import PolicyBinding, SinkBinding


def test_binding_options_are_copied_not_aliased():
    options = {"endpoint_url": "http://a", "s3_additional_kwargs": {"ACL": "private"}}
    binding = SinkBinding(role="resume", sink="s3", options=options)
    policy = PolicyBinding(role="resume", policy="keep_last", options=options)
    options["endpoint_url"] = "http://b"
    options["s3_additional_kwargs"]["ACL"] = "public-read"
    options["new"] = 1
    for b in (binding, policy):
        assert dict(b.options) == {"endpoint_url": "http://a", "s3_additional_kwargs": {"ACL": "private"}}
