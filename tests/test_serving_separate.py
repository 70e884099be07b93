"""End-to-end serving in the `separate` ingress mode (an ingress deployment in front of the engine,
Ray Serve's multiplexed routing; the default for several replicas): its own cold `lorafleet serve`
start, so that test_serving.py starts one app and either module can run alone.

Runs the tests of test_serving.py whose code path differs from `colocated`: engine calls through a
deployment handle, adapter loading by multiplexed id under concurrency, readiness, errors raised
in another process, promotion. The other routes are the same code in both modes and run there only.
"""

from __future__ import annotations

import pytest

# Imported test functions are collected (and run against this module's `stack`) here too.
from test_serving import (  # noqa: F401
    reference,
    serving_stack,
    test_healthz_open_and_models_listed,
    test_healthz_says_starting_until_the_engine_answers,
    test_completions_equal_transformers_peft_in_one_mixed_batch,
    test_64_concurrent_requests_over_two_adapters_and_base,
    test_bad_inputs_get_their_status_codes,
    test_tampered_adapter_is_not_served,
    test_promotion_while_requests_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained, home, base_model):
    yield from serving_stack("separate", tmp_path_factory, trained, home, base_model)
