"""The admission webhook against any input, over a real HTTP connection to the real server on a
loopback port: random bytes, random JSON, AdmissionReviews with random requests, claims,
templates and classes with random device configs, and malformed request heads. Every request
gets an HTTP answer (400 for malformed input, an AdmissionReview that allows or denies with a
clear message for a well-formed review), never a 500, never a connection left hanging, and the
server keeps answering."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping
from http.client import HTTPConnection
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dra_core.hookspecs import NodeContext
from dra_core.httpbase import MAX_JSON_NUMBER_DIGITS
from dra_core.model import LIMITS
from dra_core.plugins import HookError, Hooks, load
from dra_core.webhook import MAX_REVIEW_BYTES, Webhook

#: Seconds a client waits for an answer: past the server's own 10 s deadline, a hang fails.
PATIENCE = 15.0
#: Words that must never reach a user of the webhook.
INTERNALS = ("internal error", "Traceback", "errors.pydantic.dev", "For further information")
KINDS = {
    "ResourceClaim": ("spec", "devices", "config"),
    "ResourceClaimTemplate": ("spec", "spec", "devices", "config"),
    "DeviceClass": ("spec", "config"),
}
DRIVERS = {"fake": "fake.dra-core.dev", "i915": "gpu.intel.com"}
HEADS = {
    "fake": {"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig"},
    "i915": {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig"},
}


# ------------------------------------------------------------------ the server
class Served:
    """A backend's webhook, serving on a loopback port."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.driver = DRIVERS[backend]
        self.hooks: Hooks = load(backend)
        self.context = NodeContext(node_name="", driver_name=self.driver)
        self.webhook = Webhook(self.hooks, self.driver, host="127.0.0.1", port=0)

    @property
    def port(self) -> int:
        return self.webhook.port

    def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> tuple[int, str, bytes]:
        """POST ``body`` to /validate: the status, content type and body of the answer."""
        conn = HTTPConnection("127.0.0.1", self.port, timeout=PATIENCE)
        try:
            conn.request(
                "POST", "/validate", body, {"Content-Type": "application/json", **(headers or {})}
            )
            answer = conn.getresponse()
            return answer.status, answer.getheader("Content-Type") or "", answer.read()
        finally:
            conn.close()

    def assert_alive(self) -> None:
        conn = HTTPConnection("127.0.0.1", self.port, timeout=PATIENCE)
        try:
            conn.request("GET", "/healthz")
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (200, b"ok\n")
        finally:
            conn.close()

    def decodes(self, parameters: object) -> str | None:
        """None when the backend accepts ``parameters``, else its message."""
        try:
            self.hooks.decode_config(parameters, self.context)  # type: ignore[arg-type]
        except HookError as exc:
            return str(exc.__cause__)
        return None


@pytest.fixture(scope="module", params=["fake", "i915"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    served = Served(str(request.param))
    served.webhook.start()
    try:
        yield served
    finally:
        served.webhook.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[Served]:
    """The fake backend's webhook, for the tests whose answer does not depend on the backend."""
    served = Served("fake")
    served.webhook.start()
    try:
        yield served
    finally:
        served.webhook.stop()


def assert_refused(status: int, content_type: str, body: bytes) -> str:
    """A 400 with a plain-text reason; the reason."""
    text = body.decode()
    assert status == 400, (status, text)
    assert content_type.startswith("text/plain"), content_type
    assert text.strip(), "a 400 says why"
    for words in INTERNALS:
        assert words not in text, text
    return text


def assert_decided(status: int, content_type: str, body: bytes, uid: object) -> dict[str, Any]:
    """A 200 with an AdmissionReview for ``uid``; its response."""
    assert status == 200, (status, body[:500])
    assert content_type == "application/json", content_type
    review = json.loads(body)
    assert (review["apiVersion"], review["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    response: dict[str, Any] = review["response"]
    assert response["uid"] == uid
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        message = response["status"]["message"]
        assert isinstance(message, str) and message.strip(), response
        assert response["status"]["code"] == 422
        for words in INTERNALS:
            assert words not in message, message
    else:
        assert "status" not in response, response
    return response


# ------------------------------------------------------------------ strategies
#: Any text, lone surrogates included (JSON's \ud800 escapes decode to them).
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


def near_valid(backend: str) -> st.SearchStrategy[dict[str, Any]]:
    """The right apiVersion and kind, with fields known to either backend set to anything."""
    fields = st.sampled_from(["env", "failPrepare", "sleepSeconds", "vfProfile"]) | any_text
    values = json_values | st.sampled_from(["flex170_m4", "max_48g_c2"]) | st.just({"A": "b"})
    extra = st.dictionaries(fields, values, max_size=3)
    return extra.map(lambda fields: {**HEADS[backend], **fields})


def config_entries(driver: str, backend: str) -> st.SearchStrategy[object]:
    """An entry of a device config list: anything, or an opaque config for this driver or
    another, with any parameters and any requests."""
    parameters = near_valid(backend) | json_values | st.just(HEADS[backend])
    requests = st.none() | st.lists(st.sampled_from(["gpu", "b"]) | any_text, max_size=3)
    opaque = st.fixed_dictionaries(
        {
            "opaque": st.fixed_dictionaries(
                {
                    "driver": st.sampled_from([driver, "gpu.example.com"]) | any_text,
                    "parameters": parameters,
                }
            )
        },
        optional={"requests": requests | json_values},
    )
    return (
        opaque | st.just({"opaque": {"driver": driver, "parameters": HEADS[backend]}}) | json_values
    )


def place(path: tuple[str, ...], value: object) -> dict[str, Any]:
    obj: Any = value
    for key in reversed(path):
        obj = {key: obj}
    return dict(obj)


def review(request: object) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


# ------------------------------------------------------------------ malformed bodies
@given(body=st.binary(max_size=2048))
def test_random_bytes_are_a_400(fake: Served, body: bytes) -> None:
    assert_refused(*fake.post(body))
    fake.assert_alive()


@given(value=json_values)
def test_random_json_is_a_400(fake: Served, value: object) -> None:
    assert_refused(*fake.post(dumps(value)))
    fake.assert_alive()


@given(
    value=st.dictionaries(
        st.sampled_from(["apiVersion", "kind", "request"]) | any_text, json_values, max_size=4
    )
)
def test_review_without_the_right_head_is_a_400(fake: Served, value: dict[str, Any]) -> None:
    if value.get("apiVersion") == "admission.k8s.io/v1" and value.get("kind") == "AdmissionReview":
        value["kind"] = "AdmissionReviewList"
    text = assert_refused(*fake.post(dumps(value)))
    assert "admission.k8s.io/v1" in text, text


@given(
    review_value=st.fixed_dictionaries(
        {"request": json_values}, optional={"apiVersion": st.just("admission.k8s.io/v1")}
    ),
    encoding=st.sampled_from(
        ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
    ),
)
def test_json_that_is_not_utf8_is_a_400(
    fake: Served, review_value: dict[str, Any], encoding: str
) -> None:
    """JSON between systems is UTF-8 (RFC 8259); read as anything else, the nesting and
    number limits would not see what the decoder then reads."""
    good = review({"uid": "u", "kind": {"kind": "ResourceClaim"}, "operation": "DELETE"})
    for body in (good, {**review_value, "kind": "AdmissionReview"}):
        text = assert_refused(
            *fake.post(json.dumps(body, ensure_ascii=False).encode(encoding, "surrogatepass"))
        )
        assert "UTF-8" in text, text


@given(
    digits=st.integers(min_value=MAX_JSON_NUMBER_DIGITS + 1, max_value=6000),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-32-le"]),
)
def test_a_number_over_the_digit_limit_is_a_400_in_any_encoding(
    fake: Served, digits: int, encoding: str
) -> None:
    parameters = '{"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig", "sleepSeconds": %s}'
    obj = place(KINDS["ResourceClaim"], [{"opaque": {"driver": fake.driver, "parameters": 0}}])
    obj["kind"] = "ResourceClaim"
    text = json.dumps(review({"uid": "u", "operation": "CREATE", "object": obj}))
    text = text.replace('"parameters": 0', '"parameters": ' + parameters % ("9" * digits))
    answer = assert_refused(*fake.post(text.encode(encoding)))
    assert f"over the limit of {MAX_JSON_NUMBER_DIGITS}" in answer or "UTF-8" in answer, answer


# ------------------------------------------------------------------ reviews with random requests
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "uid": st.just("7f1c-uid") | json_values,
        "kind": st.fixed_dictionaries({"kind": st.sampled_from(list(KINDS)) | json_values})
        | json_values,
        "operation": st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"]) | json_values,
        "object": json_values,
        "oldObject": json_values,
        "name": json_values,
        "namespace": json_values,
    },
)


@given(request=request_fields | json_values)
@example(request={"uid": "u", "kind": {"kind": []}})  # a kind that is not a string
@example(request={"uid": "u", "operation": "CREATE", "object": {"kind": {"a": 1}}})
def test_review_with_any_request_is_answered(served: Served, request: object) -> None:
    status, content_type, body = served.post(dumps(review(request)))
    if status == 400:
        assert_refused(status, content_type, body)
    else:
        assert isinstance(request, dict)
        assert_decided(status, content_type, body, request.get("uid"))
    served.assert_alive()


# ------------------------------------------------------------------ objects with random configs
@given(data=st.data())
def test_objects_with_any_device_configs_are_allowed_or_denied_clearly(
    served: Served, data: st.DataObject
) -> None:
    """The answer is an AdmissionReview; it denies exactly when one of this driver's entries
    is not valid, and then names that entry and carries the backend's own message."""
    kind = data.draw(st.sampled_from(list(KINDS)), label="kind")
    entries = data.draw(
        st.lists(config_entries(served.driver, served.backend), max_size=4), label="entries"
    )
    obj = place(KINDS[kind], entries)
    obj.update(
        apiVersion="resource.k8s.io/v1", kind=kind, metadata={"name": "c", "namespace": "ns"}
    )
    request = {"uid": "u-1", "kind": {"kind": kind}, "operation": "CREATE", "object": obj}
    response = assert_decided(*served.post(dumps(review(request))), "u-1")
    problem = first_problem(served, kind, entries)
    if problem is None:
        assert response["allowed"], response
    else:
        index, reason = problem
        assert not response["allowed"], (index, reason)
        message = response["status"]["message"]
        assert f"{'.'.join(KINDS[kind])}[{index}]" in message, message
        assert reason in message, (reason, message)
    served.assert_alive()


def first_problem(served: Served, kind: str, entries: list[object]) -> tuple[int, str] | None:
    """The first of this driver's entries that must be refused: its index and what the message
    must say about it."""
    for index, entry in enumerate(entries):
        opaque = entry.get("opaque") if isinstance(entry, dict) else None
        if not isinstance(opaque, dict) or opaque.get("driver") != served.driver:
            continue
        assert isinstance(entry, dict)
        requests = entry.get("requests") or []
        if kind != "DeviceClass" and not (
            isinstance(requests, list) and all(isinstance(r, str) for r in requests)
        ):
            return index, "requests is not a list of request names"
        parameters = opaque.get("parameters")
        if not isinstance(parameters, dict):
            return index, "opaque.parameters must be a JSON object"
        if len(json.dumps(parameters)) > LIMITS.opaque_parameters_bytes:
            return index, "over the limit"
        message = served.decodes(parameters)
        if message is not None:
            return index, message
    return None


# ------------------------------------------------------------------ malformed request heads
def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, close the sending side, and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed early
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


def status_of(answer: bytes) -> int:
    head = answer.split(b"\r\n", 1)[0].split()
    assert len(head) >= 2 and head[0].startswith(b"HTTP/1."), answer[:200]
    return int(head[1])


@given(
    value=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=24)
    | st.integers(min_value=0, max_value=2**70).map(str),
    body=st.binary(max_size=64),
)
@example(value="\u00b2", body=b"{}")  # a digit to str.isdigit, not to int()
@example(value="00000000000000000000001", body=b"")  # leading zeros: a length of 1
@example(value="123456789012345678901234567890", body=b"")  # a length over any limit
def test_any_content_length_is_answered(fake: Served, value: str, body: bytes) -> None:
    """A length that is not a plain decimal number is a 400, one over the limit a 413, one the
    body does not fill leaves the server waiting until the client leaves."""
    head = (
        "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {value}\r\n\r\n"
    )
    answer = exchange(fake.port, head.encode("latin-1") + body)
    number = value.strip(" \t")
    if not (number.isascii() and number.isdigit()):
        assert status_of(answer) == 400, answer[:300]
        assert b"bad Content-Length" in answer, answer[:300]
    elif int(number) > MAX_REVIEW_BYTES:
        assert status_of(answer) == 413, answer[:300]
    elif int(number) > len(body):
        assert answer == b"", answer[:300]  # the body never came: no answer, and no hang
    else:
        assert status_of(answer) == 400, answer[:300]  # the body is not a review
    fake.assert_alive()


@given(
    raw=st.binary(max_size=512)
    | st.lists(any_text, max_size=6).map(
        lambda lines: "\r\n".join(lines).encode("utf-8", "surrogatepass")
    )
)
@example(raw=b"\x00")  # no request line: http.server answered as HTTP/0.9, a bare page
def test_any_request_head_is_answered_or_closed(fake: Served, raw: bytes) -> None:
    """Garbage instead of a request: an error status or a closed connection, never a 500."""
    answer = exchange(fake.port, raw)
    if answer:
        assert status_of(answer) != 500, answer[:300]
    fake.assert_alive()
