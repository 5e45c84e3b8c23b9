"""TRL's vLLM client with a timeout on every request: served-mode GRPO (core/vllm/trl.py) and a served
distillation teacher (distill/train.py) talk to `python -m rl.serve` through it.

TRL's `VLLMClient` posts without a timeout, so a stalled server hangs the run, and retries a refused
connection for about a minute; here a request fails within `request_timeout` seconds with an error that
names the server, the timeout and its setting, or what the server answered.
"""

from __future__ import annotations

import time

import requests
from requests.adapters import HTTPAdapter
from trl.generation.vllm_client import VLLMClient
from urllib3.util.retry import Retry


class VLLMServerError(RuntimeError):
    """The vLLM server failed, stalled or went away; raised on every trainer rank."""


class TimedVLLMClient(VLLMClient):
    """TRL's client with a timeout on every request, few retries, and errors that name the server."""

    def __init__(self, *args, request_timeout: float, timeout_field: str = "vllm_request_timeout", **kwargs):
        self.request_timeout = request_timeout
        self.timeout_field = timeout_field  # the stage's setting, named in the errors
        super().__init__(*args, **kwargs)  # creates the session, then checks the server (check_server below)

    def _mount_short_retries(self) -> None:
        # TRL retries 5 times with backoff 2..32 s (about a minute) before a refused connection counts;
        # a server that went away should be reported within seconds instead. Only connecting is retried:
        # with `read` retries a stalled server took 3 x request_timeout (15 minutes at the default) to fail,
        # reported as "ConnectionError" (issue 30), and a POST that reached the server must not be sent twice.
        # read=False re-raises the read timeout itself, so requests raises ReadTimeout and the error below
        # names it.
        adapter = HTTPAdapter(max_retries=Retry(total=2, connect=2, read=False, status=0, backoff_factor=0.5,
                                                allowed_methods=["POST", "GET"]))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _timed_out(self, url: str, error: Exception) -> VLLMServerError:
        return VLLMServerError(f"vLLM server {self.base_url} did not answer {url} within "
                               f"{self.timeout_field}={self.request_timeout} s (stalled?): {error}")

    def _request(self, method: str, url: str, **kwargs) -> dict:
        try:
            response = self.session.request(method, url, timeout=self.request_timeout, **kwargs)
        except requests.exceptions.Timeout as error:
            raise self._timed_out(url, error) from error
        except requests.exceptions.RequestException as error:
            raise VLLMServerError(f"vLLM server {self.base_url} is unreachable ({url}): "
                                  f"{type(error).__name__}: {error}") from error
        if response.status_code != 200:
            raise VLLMServerError(f"vLLM server {self.base_url} answered {url} with HTTP {response.status_code}: "
                                  f"{response.text[:2000]}")
        return response.json() if response.content else {}

    def _get(self, url: str, **kwargs) -> dict:
        return self._request("GET", url, **kwargs)

    def _post(self, url: str, **kwargs) -> dict:
        return self._request("POST", url, **kwargs)

    def check_server(self, total_timeout: float = 0.0, retry_interval: float = 2.0) -> None:
        """Wait up to `total_timeout` s for the server to come up, as TRL's check does, but each poll of
        /health with the request timeout: TRL's has none, so a server that accepts and never answers hung
        the client's construction."""
        # TRL's __init__ calls this first after creating the session: from here on every request of the
        # session (the model list that __init__ reads next included) has the short retries.
        self._mount_short_retries()
        url = f"{self.base_url}/health"
        deadline = time.monotonic() + total_timeout
        while True:
            try:
                response = self.session.get(url, timeout=self.request_timeout)
                if response.status_code == 200:
                    return
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            except requests.exceptions.Timeout as error:
                raise self._timed_out(url, error) from error
            except requests.exceptions.RequestException as error:
                problem = f"{type(error).__name__}: {error}"
            if time.monotonic() >= deadline:
                raise VLLMServerError(f"vLLM server {self.base_url} is not up after {total_timeout} s "
                                      f"(the connection timeout): {problem}")
            time.sleep(retry_interval)
