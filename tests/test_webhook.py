"""The admission webhook as the API server calls it: AdmissionReview JSON over a real socket."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import uuid
from http.client import HTTPConnection, HTTPSConnection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dra_core import metrics, plugins
from dra_core.model import LIMITS
from dra_core.webhook import TlsFiles, Webhook

DRIVER = "fake.dra-core.dev"
GOOD = {"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig", "env": {"GREETING": "hi"}}


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path, bytes]:
    """A self-signed server certificate for IP ``host``: (cert file, key file, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dra-core-webhook")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, pem


def claim(config: list, name: str = "my-claim") -> dict:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": "fake"}}],
                "config": config,
            }
        },
    }


def opaque(parameters: object, driver: str = DRIVER, requests: list | None = None) -> dict:
    entry: dict = {"opaque": {"driver": driver, "parameters": parameters}}
    if requests is not None:
        entry["requests"] = requests
    return entry


def admission_review(obj: dict, operation: str = "CREATE", old: dict | None = None) -> dict:
    kind = obj["kind"]
    resource = {
        "ResourceClaim": "resourceclaims",
        "ResourceClaimTemplate": "resourceclaimtemplates",
        "DeviceClass": "deviceclasses",
    }[kind]
    meta = obj["metadata"]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "resource.k8s.io", "version": "v1", "kind": kind},
            "resource": {"group": "resource.k8s.io", "version": "v1", "resource": resource},
            "name": meta.get("name", ""),
            "namespace": meta.get("namespace", ""),
            "operation": operation,
            "object": obj,
            "oldObject": old,
        },
    }


@pytest.fixture(scope="module")
def hooks() -> plugins.Hooks:
    return plugins.load("fake")


@pytest.fixture
def server(hooks):
    webhook = Webhook(hooks, DRIVER, host="127.0.0.1", port=0)
    webhook.start()
    try:
        yield webhook
    finally:
        webhook.stop()


def post(webhook: Webhook, body: bytes | dict, path: str = "/validate") -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = HTTPConnection("127.0.0.1", webhook.port, timeout=10)
    try:
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def decide(webhook: Webhook, review: dict) -> dict:
    status, body = post(webhook, review)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    return answer["response"]


def denial(webhook: Webhook, review: dict) -> str:
    response = decide(webhook, review)
    assert response["allowed"] is False, response
    return str(response["status"]["message"])


# ------------------------------------------------------------------ ResourceClaim
def test_good_config_is_allowed(server):
    response = decide(server, admission_review(claim([opaque(GOOD, requests=["gpu"])])))
    assert response["allowed"] is True
    assert "status" not in response


def test_claim_without_config_is_allowed(server):
    obj = claim([])
    del obj["spec"]["devices"]["config"]
    assert decide(server, admission_review(obj))["allowed"] is True


def test_unknown_field_is_rejected_naming_it(server):
    bad = {**GOOD, "envv": {"A": "b"}}
    message = denial(server, admission_review(claim([opaque(bad, requests=["gpu"])])))
    assert message.startswith(
        f"ResourceClaim default/my-claim: spec.devices.config[0] (requests gpu) for {DRIVER}: "
    )
    assert "envv" in message and "unknown field" in message


def test_wrong_type_is_rejected_naming_the_field(server):
    bad = {**GOOD, "sleepSeconds": "ten"}
    message = denial(server, admission_review(claim([opaque(GOOD), opaque(bad)])))
    assert "spec.devices.config[1] (all requests)" in message
    assert "sleepSeconds" in message


def test_non_object_parameters_are_rejected(server):
    message = denial(server, admission_review(claim([opaque([1, 2])])))
    assert "opaque.parameters must be a JSON object, not list" in message


def test_oversized_parameters_are_rejected(server):
    big = {**GOOD, "env": {f"V{i}": "x" * 100 for i in range(120)}}
    assert len(json.dumps(big)) > LIMITS.opaque_parameters_bytes
    message = denial(server, admission_review(claim([opaque(big)])))
    assert f"over the limit of {LIMITS.opaque_parameters_bytes}" in message


def test_other_drivers_configs_are_ignored(server):
    theirs = opaque({"whatever": True, "vfProfle": 1}, driver="gpu.example.com")
    assert decide(server, admission_review(claim([theirs, opaque(GOOD)])))["allowed"] is True


def test_update_leaving_the_config_alone_is_allowed(server):
    """An object written before the webhook existed can still lose its finalizers."""
    old = claim([opaque({"bogus": 1})])
    new = json.loads(json.dumps(old))
    new["metadata"]["finalizers"] = []
    assert decide(server, admission_review(new, "UPDATE", old))["allowed"] is True


def test_update_changing_the_config_is_validated(server):
    old = claim([opaque(GOOD)])
    new = claim([opaque({**GOOD, "failPrepare": "yes"})])
    assert "failPrepare" in denial(server, admission_review(new, "UPDATE", old))


def test_generated_name_is_named(server):
    obj = claim([opaque({"nope": 1})])
    obj["metadata"] = {"generateName": "pod-gpu-", "namespace": "default"}
    message = denial(server, admission_review(obj))
    assert message.startswith("ResourceClaim default/pod-gpu-<generated>: ")


# ------------------------------------------------------------------ template and class
def test_template_configs_are_validated(server):
    template = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": "tmpl", "namespace": "ns1"},
        "spec": {
            "spec": claim([opaque(GOOD), opaque({**GOOD, "extra": 1}, requests=["gpu"])])["spec"]
        },
    }
    message = denial(server, admission_review(template))
    assert message.startswith(
        f"ResourceClaimTemplate ns1/tmpl: spec.spec.devices.config[1] (requests gpu) for {DRIVER}"
    )
    assert "extra" in message
    template["spec"]["spec"]["devices"]["config"].pop()
    assert decide(server, admission_review(template))["allowed"] is True


def test_device_class_configs_are_validated(server):
    device_class = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": "fake-special"},
        "spec": {"config": [opaque({**GOOD, "kind": "GpuConfig"})]},
    }
    message = denial(server, admission_review(device_class))
    assert message.startswith(f"DeviceClass fake-special: spec.config[0] for {DRIVER}: ")
    assert "kind" in message
    device_class["spec"]["config"] = [opaque(GOOD)]
    assert decide(server, admission_review(device_class))["allowed"] is True


# ------------------------------------------------------------------ malformed requests
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}), "v1"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}), "request"),
        (
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}
            ),
            "uid",
        ),
    ],
)
def test_malformed_review_is_a_400_with_a_clear_body(server, body, expected):
    status, text = post(server, body.encode() if isinstance(body, str) else body)
    assert status == 400
    assert expected in text.decode()


def test_unexpected_kind_is_a_400(server):
    review = admission_review(claim([]))
    review["request"]["kind"]["kind"] = "Pod"
    review["request"]["object"]["kind"] = "Pod"
    status, text = post(server, review)
    assert status == 400
    assert "cannot validate kind 'Pod'" in text.decode()


def test_server_survives_garbage_and_serves_health(server):
    post(server, b"\x00\xff" * 10)
    conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok\n")
    finally:
        conn.close()
    assert post(server, b"{}", path="/other")[0] == 404


def test_admissions_are_counted(server):
    def count(result: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "dra_webhook_admissions_total", {"kind": "ResourceClaim", "result": result}
        )
        return value or 0.0

    allowed, denied = count("allowed"), count("denied")
    decide(server, admission_review(claim([opaque(GOOD)])))
    denial(server, admission_review(claim([opaque({"x": 1})])))
    assert (count("allowed"), count("denied")) == (allowed + 1, denied + 1)
    assert b"dra_webhook_admissions_total" in metrics.render()


# ------------------------------------------------------------------ HTTPS and the command
def test_https_with_a_self_signed_certificate(hooks, tmp_path):
    cert_file, key_file, _ = self_signed(tmp_path)
    webhook = Webhook(hooks, DRIVER, host="127.0.0.1", port=0, tls=TlsFiles(cert_file, key_file))
    webhook.start()
    try:
        client = ssl.create_default_context(cafile=str(cert_file))
        review = admission_review(claim([opaque({**GOOD, "vfProfle": "x"})]))
        conn = HTTPSConnection("127.0.0.1", webhook.port, context=client, timeout=10)
        try:
            conn.request("POST", "/validate", json.dumps(review), {"Content-Type": "x"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
        finally:
            conn.close()
        assert resp.status == 200
        assert answer["response"]["allowed"] is False
        assert "vfProfle" in answer["response"]["status"]["message"]
        # A plain-HTTP client gets no answer, and the server keeps serving.
        with pytest.raises(OSError):
            plain = HTTPConnection("127.0.0.1", webhook.port, timeout=5)
            try:
                plain.request("GET", "/healthz")
                plain.getresponse().read()
            finally:
                plain.close()
        conn = HTTPSConnection("127.0.0.1", webhook.port, context=client, timeout=10)
        try:
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
    finally:
        webhook.stop()


def test_command_requires_tls_or_insecure():
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "webhook", "--backend", "fake"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--tls-cert-file" in result.stderr and "--insecure" in result.stderr


def test_command_help_is_useful():
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "webhook", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.startswith("usage: dra-core webhook")
    for option in ("--backend", "--port", "--host", "--tls-cert-file", "--tls-key-file"):
        assert option in result.stdout
    assert "--insecure" in result.stdout
    assert "DRA_WEBHOOK_HOST" in result.stdout


def test_command_reports_an_address_it_cannot_listen_on():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dra_core",
            "webhook",
            "--backend",
            "fake",
            "--insecure",
            "--host",
            "192.0.2.1",  # TEST-NET-1: never an address of this machine
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot listen on 192.0.2.1 port 0" in result.stderr
