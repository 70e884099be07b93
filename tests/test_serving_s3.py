"""Serving from an object-store registry: `lorafleet serve` with `registry: s3://...` (issue 21).

The registry lives in moto's S3 server on loopback (tests/helpers.py `moto_s3`); the serving
replicas reach it through AWS_ENDPOINT_URL like any S3-compatible store. Each replica copies a
version out of the bucket into its private cache and checks the sha256 sums on the copy before vLLM
reads it, as it does from a folder registry. Answers are compared token for token with
transformers+peft greedy decoding of the same adapter files.
"""

from __future__ import annotations

import time
import uuid

import pytest

from helpers import moto_s3
from test_serving import MAX_NEW, _client, _complete, _ids, serving_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained, home, base_model):
    import boto3

    with moto_s3():
        bucket = f"serve-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield from serving_stack("colocated", tmp_path_factory, trained, home, base_model,
                                 registry=f"s3://{bucket}/registry")


def test_an_adapter_in_the_s3_registry_answers_as_its_files_do(stack):
    from lorafleet.serving.testing import reference_greedy

    entry = stack["adapters"]["tickets-lora"]
    assert str(entry.path).startswith("s3://")
    prompt = stack["prompts"][0]
    want = reference_greedy(stack["base"], stack["registry"].local_path(entry), [prompt], MAX_NEW)[0]
    with _client(stack) as c:
        body = _complete(c, "tickets-lora", prompt)
        by_task = c.post("/v1/classify", json={"text": "my card was charged twice"})
    assert body["model"] == "tiny:tickets-lora@1" and _ids(body, stack["tok"].eos_token_id) == want
    assert by_task.status_code == 200 and by_task.json()["adapter"] == "tickets-lora@1", by_task.text


def test_a_version_promoted_in_s3_while_serving_is_what_the_name_answers(stack):
    from lorafleet.serving.testing import make_lora_adapter, reference_greedy

    reg = stack["registry"]
    prompt = stack["prompts"][1]
    eos = stack["tok"].eos_token_id
    v2 = reg.register("tickets-lora", make_lora_adapter(stack["base"], stack["work"] / "s3-v2", seed=21),
                      {"task": "classification", "method": "lora", "labels": ["billing", "technical"]})
    want = reference_greedy(stack["base"], reg.local_path(v2), [prompt], MAX_NEW)[0]
    with _client(stack) as c:
        assert _complete(c, "tickets-lora", prompt)["model"] == "tiny:tickets-lora@1"  # not live yet
        reg.promote("tickets-lora", "2")
        deadline = time.time() + 30
        while (body := _complete(c, "tickets-lora", prompt))["model"] != "tiny:tickets-lora@2":
            assert time.time() < deadline, "the promotion was not seen within 30 s"
            time.sleep(0.5)
    assert _ids(body, eos) == want
    reg.promote("tickets-lora", "1")


def test_a_tampered_object_in_s3_is_not_served(stack):
    import boto3

    from lorafleet.serving.testing import make_lora_adapter

    reg = stack["registry"]
    entry = reg.register("tampered-lora", make_lora_adapter(stack["base"], stack["work"] / "s3-bad", seed=5),
                         {"task": "classification", "method": "lora", "labels": []})
    bucket, _, key = str(entry.path)[len("s3://"):].partition("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{key}/adapter_model.safetensors", Body=b"not the weights")
    with _client(stack) as c:
        r = c.post("/v1/completions", json={"model": "tampered-lora", "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"], r.text
