"""API client setup and raw JSON requests.

The kubernetes package costs about half a second to import, so it is imported here, on first
use, and never by the modules the start-up path needs before the API is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient

__all__ = ("ApiError", "KubeClient", "load_client")


class ApiError(Exception):
    """An API request failed; ``status`` is the HTTP status (0 when the server was unreachable)."""

    def __init__(
        self, method: str, path: str, status: int, message: str, retry_after: float | None = None
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        self.retry_after = retry_after
        where = "API server unreachable" if status == 0 else f"HTTP {status}"
        super().__init__(f"{method} {path}: {where}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def retriable(self) -> bool:
        """Connection errors, throttling and server errors are worth another try."""
        return self.status == 0 or self.status == 429 or self.status >= 500


@dataclass
class KubeClient:
    """A thin JSON client over ``kubernetes.client.ApiClient``."""

    api: ApiClient
    #: Seconds one request may take; the kubelet gives a whole prepare call 45 s.
    timeout: float = 10.0

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """Send one request and return the decoded JSON response (None for an empty body)."""
        response = self._send(
            method,
            path,
            body=body,
            query=query,
            content_type=content_type,
            timeout=self.timeout if timeout is None else timeout,
        )
        raw = response.read()
        return json.loads(raw) if raw else None

    def stream(self, path: str, query: Mapping[str, str], *, read_timeout: float) -> Any:
        """Start a streaming GET (a watch) and return the open urllib3 response, unread."""
        return self._send(
            "GET", path, query=query, timeout=(self.timeout, read_timeout), stream=True
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float],
        stream: bool = False,
    ) -> Any:
        """The response of a 2xx request; ApiError for any other status or no connection."""
        from urllib3.exceptions import HTTPError  # slow import, kept off start-up

        api = self.api
        try:
            _, url, headers, data, post = api.param_serialize(
                method=method,
                resource_path=path,
                query_params=list((query or {}).items()) or None,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
            )
            # The kubernetes client hands back the urllib3 response unread.
            response = api.call_api(
                method,
                url,
                header_params=headers,
                body=data,
                post_params=post,
                _request_timeout=timeout,
            )
        except (HTTPError, OSError) as exc:
            raise ApiError(method, path, 0, str(exc)) from None
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status is None:
                raise
            raise _api_error(
                method,
                path,
                int(status or 0),
                getattr(exc, "body", None),
                getattr(exc, "reason", ""),
                getattr(exc, "headers", None),
            ) from None
        if not 200 <= response.status < 300:
            raw = response.read()
            raise _api_error(method, path, response.status, raw, response.reason, response.headers)
        return response.response if stream else response

    def get(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)


def _api_error(
    method: str,
    path: str,
    status: int,
    body: Any,
    reason: str | None,
    headers: Mapping[str, str] | None,
) -> ApiError:
    """An ApiError with the message of the API server's Status object, if it sent one."""
    message = reason or ""
    try:
        status_obj = json.loads(body or b"{}")
        message = status_obj.get("message") or message
    except (ValueError, AttributeError, TypeError):
        pass
    retry_after = None
    value = (headers or {}).get("Retry-After")
    if value is not None:
        try:
            retry_after = float(value)
        except ValueError:
            retry_after = None
    return ApiError(method, path, status, message, retry_after)


def load_client(kubeconfig: str | None = None, *, timeout: float = 10.0) -> KubeClient:
    """A client from ``kubeconfig``, else ``$KUBECONFIG``, else the in-cluster service account."""
    from kubernetes import client, config  # slow import, kept off start-up

    path = kubeconfig or os.environ.get("KUBECONFIG")
    configuration = client.Configuration()
    if path:
        config.load_kube_config(config_file=path, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    configuration.retries = 0  # retries are ours, with backoff and Retry-After
    return KubeClient(client.ApiClient(configuration), timeout=timeout)
