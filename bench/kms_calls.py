"""Count KMS calls made by 1,000 Grounded Answers for one organization.

Runs Gateco in process on a throwaway SQLite database, with AWS KMS served by
moto's server on loopback and the local OpenAI server for synthesis. Every
answer opens the organization's stored key; the data-key cache should make
at most one Decrypt call while its lifetime lasts.

    .venv/bin/python bench/kms_calls.py [--answers 1000]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=1000)
    options = parser.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    kms_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    kms_server.start()
    host, port = kms_server.get_host_and_port()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_KMS": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    import boto3

    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]

    from answers.local_openai import LocalOpenAIServer

    llm_server = LocalOpenAIServer()
    llm_server.start()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "gateco.settings",
            "GATECO_DATA_DIR": tempfile.mkdtemp(prefix="gateco-bench-"),
            "GATECO_KMS_KEY_ID": key_id,
            "OPENAI_BASE_URL": llm_server.base_url,
            "OPENAI_API_KEY": "sk-bench-shared-key-0000000000000000",
            "ALLOWED_HOSTS": "testserver",
            "LOG_LEVEL": "WARNING",
        }
    )

    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client

    from keyvault.kms import get_key_service
    from keyvault.vault import set_llm_api_key
    from orgs.demo import load_demo_organization
    from orgs.models import ApiKey

    call_command("migrate", verbosity=0)
    demo = load_demo_organization()
    set_llm_api_key(demo.organization, "sk-bench-organization-key-000000000000ORG")
    _, raw_key = ApiKey.issue(demo.organization, "bench")

    # Start cold: no cached data key, a new boto3 client, calls counted from here.
    from keyvault.vault import data_key_cache

    data_key_cache.clear()
    get_key_service.cache_clear()
    calls = {"Decrypt": 0, "GenerateDataKey": 0}

    def count(event_name, **kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        calls[operation] = calls.get(operation, 0) + 1

    get_key_service()._client.meta.events.register("before-call.kms", count)

    client = Client(HTTP_X_API_KEY=raw_key)
    body = {
        "query": "What was revenue in the third quarter?",
        "principal_id": demo.alice.external_id,
        "connector_id": str(demo.connector.id),
    }
    started = time.perf_counter()
    outcomes = {}
    for _ in range(options.answers):
        response = client.post(
            "/api/answers/execute", body, content_type="application/json"
        )
        outcome = response.json().get("outcome") or response.json()["error"]["code"]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    elapsed = time.perf_counter() - started

    llm_server.stop()
    kms_server.stop()
    print(f"answers: {options.answers} in {elapsed:.1f} s ({outcomes})")
    print(f"KMS Decrypt calls: {calls['Decrypt']}")
    print(f"KMS calls of any kind: {sum(calls.values())}")
    if calls["Decrypt"] > 1:
        sys.exit("FAIL: more than one Decrypt call within the cache lifetime")


if __name__ == "__main__":
    main()
