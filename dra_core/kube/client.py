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
    ) -> Any:
        """Send one request and return the decoded JSON response (None for an empty body)."""
        from kubernetes.client.exceptions import ApiException  # slow import
        from urllib3.exceptions import HTTPError

        try:
            response = self.api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            raise _api_error(method, path, exc) from None
        except (HTTPError, OSError) as exc:
            raise ApiError(method, path, 0, str(exc)) from None
        data = response.data
        return json.loads(data) if data else None

    def get(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)


def _api_error(method: str, path: str, exc: Any) -> ApiError:
    message = exc.reason or ""
    try:
        status_obj = json.loads(exc.body or "{}")
        message = status_obj.get("message") or message
    except (ValueError, AttributeError):
        pass
    retry_after = None
    headers = exc.headers or {}
    if "Retry-After" in headers:
        try:
            retry_after = float(headers["Retry-After"])
        except ValueError:
            retry_after = None
    return ApiError(method, path, int(exc.status or 0), message, retry_after)


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
