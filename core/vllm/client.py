"""TRL's vLLM client with a timeout on every request: served-mode GRPO (core/vllm/trl.py) and a served
distillation teacher (distill/train.py) talk to `python -m rl.serve` through it.

TRL's `VLLMClient` posts without a timeout, so a stalled server hangs the run, and retries a refused
connection for about a minute; here a request fails within `request_timeout` seconds with an error that
names the server and what it answered.
"""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from trl.generation.vllm_client import VLLMClient
from urllib3.util.retry import Retry


class VLLMServerError(RuntimeError):
    """The vLLM server failed, stalled or went away; raised on every trainer rank."""


class TimedVLLMClient(VLLMClient):
    """TRL's client with a timeout on every request, few retries, and errors that name the server."""

    def __init__(self, *args, request_timeout: float, **kwargs):
        self.request_timeout = request_timeout
        super().__init__(*args, **kwargs)
        # TRL retries 5 times with backoff 2..32 s (about a minute) before a refused connection counts;
        # a server that went away should be reported within the timeout instead.
        adapter = HTTPAdapter(max_retries=Retry(total=2, backoff_factor=0.5, allowed_methods=["POST", "GET"]))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _request(self, method: str, url: str, **kwargs) -> dict:
        try:
            response = self.session.request(method, url, timeout=self.request_timeout, **kwargs)
        except requests.exceptions.Timeout as error:
            raise VLLMServerError(f"vLLM server {self.base_url} did not answer {url} within "
                                  f"vllm_request_timeout={self.request_timeout} s (stalled?): {error}") from error
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

