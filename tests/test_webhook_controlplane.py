"""The admission webhook called by a real kube-apiserver over TLS.

The webhook configuration is the one of deploy/webhook (rules and matchConditions), with the
client config pointed at a webhook on 127.0.0.1 and a namespaceSelector limited to this test's
namespace, so other tests of the session are unaffected. DeviceClasses are cluster-scoped (no
namespaceSelector applies), so their webhook is left out here; the unit tests cover them.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from dra_core import metrics, plugins
from dra_core.webhook import TlsFiles, Webhook
from tests.controlplane import helpers
from tests.test_webhook import DRIVER, GOOD, self_signed

pytestmark = pytest.mark.controlplane

VWC = (
    Path(__file__).resolve().parents[1]
    / "deploy"
    / "webhook"
    / "validatingwebhookconfiguration.yaml"
)
VWC_PATH = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


def _claim(name: str, parameters: dict) -> dict:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {
            "devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": "fake.dra-core.dev"}}],
                "config": [
                    {"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": parameters}}
                ],
            }
        },
    }


def _reviews() -> float:
    return sum(
        metrics.REGISTRY.get_sample_value(
            "dra_webhook_admissions_total", {"kind": "ResourceClaim", "result": result}
        )
        or 0.0
        for result in ("allowed", "denied")
    )


def _configuration(name: str, namespace: str, url: str, ca: bytes) -> dict:
    vwc = yaml.safe_load(VWC.read_text())
    webhooks = []
    for hook in vwc["webhooks"]:
        if hook["rules"][0]["resources"] == ["deviceclasses"]:
            continue
        hook = copy.deepcopy(hook)
        hook["clientConfig"] = {"url": url, "caBundle": base64.b64encode(ca).decode()}
        hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
        webhooks.append(hook)
    assert [h["timeoutSeconds"] for h in webhooks] == [5, 5]
    assert {h["sideEffects"] for h in webhooks} == {"None"}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": webhooks,
    }


def test_api_server_rejects_a_bad_claim_with_the_webhooks_message(kube_api, namespace, tmp_path):
    cert_file, key_file, ca = self_signed(tmp_path)
    webhook = Webhook(
        plugins.load("fake"), DRIVER, host="127.0.0.1", port=0, tls=TlsFiles(cert_file, key_file)
    )
    webhook.start()
    name = helpers.unique_name("dra-core-webhook-test")
    claims = f"{helpers.RESOURCE_API}/namespaces/{namespace}/resourceclaims"
    try:
        url = f"https://127.0.0.1:{webhook.port}/validate"
        helpers.create(kube_api, VWC_PATH, _configuration(name, namespace, url, ca))

        bad = {**GOOD, "vfProfle": "x"}

        def rejected() -> str | None:
            # The API server picks new webhook configurations up asynchronously: until it
            # does, the bad claim is admitted; delete it and try again.
            claim_name = helpers.unique_name("bad")
            try:
                helpers.create(kube_api, claims, _claim(claim_name, bad))
            except ApiException as exc:
                if exc.status in (400, 422) and "denied the request" in (exc.body or ""):
                    return str(exc.body)
                raise
            helpers.delete(kube_api, f"{claims}/{claim_name}")
            return None

        body = helpers.wait_for(rejected, 30, "the API server to call the webhook")
        assert f"ResourceClaim {namespace}/" in body
        assert f"spec.devices.config[0] (requests gpu) for {DRIVER}" in body
        assert "vfProfle" in body and "unknown field" in body
        assert "resourceclaims.fake.dra-core.dev" in body  # the webhook's name

        created = helpers.create(kube_api, claims, _claim("good", GOOD))
        assert created["metadata"]["name"] == "good"
        # Another driver's config, which this backend would reject: the matchConditions of
        # deploy/webhook keep the API server from even calling the webhook.
        reviews = _reviews()
        other = _claim("other", {"anything": 1})
        other["spec"]["devices"]["config"][0]["opaque"]["driver"] = "gpu.example.com"
        helpers.create(kube_api, claims, other)
        assert _reviews() == reviews
    finally:
        helpers.delete(kube_api, f"{VWC_PATH}/{name}")
        webhook.stop()
