"""vLLM serves the core (through the plugin entry point) with the HF model's greedy tokens."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import VOCAB, tiny_model

# A missing or broken vLLM fails every test here (conftest.vllm_module), it is not skipped.
pytestmark = pytest.mark.usefixtures("vllm_module")

PROMPTS = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 5, 12, 31)]
NEW_TOKENS = 24


def vllm_greedy(llm) -> list[list[int]]:
    import vllm

    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_greedy(model) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False)[0, len(p):].tolist() for p in PROMPTS]


def test_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    assert "core.vllm:register" in [e.value for e in entry_points(group="vllm.general_plugins")]


def test_tiny_preset_greedy_equals_hf_before_and_after_weight_update(vllm_llm_factory):
    from core.vllm import update_weights

    model = tiny_model(seed=1)
    llm = vllm_llm_factory("tiny", model)
    before = vllm_greedy(llm)
    assert before == hf_greedy(model)

    with torch.no_grad():  # a training step's worth of change to every weight
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    update_weights(llm, model.state_dict().items())
    after = vllm_greedy(llm)
    assert after == hf_greedy(model)
    assert after != before  # the update really changed what vLLM generates


@pytest.mark.parametrize("name, knobs", [
    ("rope-knobs", dict(qk_norm=True, no_rope_layer_interval=2, rope_low_freq_removed=0.25,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                         "original_max_position_embeddings": 256, "partial_rotary_factor": 0.5})),
    ("learned-untied", dict(position_embedding="learned", tie_word_embeddings=False, num_key_value_heads=2)),
])
def test_knobs_greedy_equals_hf(vllm_llm_factory, name, knobs):
    model = tiny_model(seed=2, **knobs)
    assert vllm_greedy(vllm_llm_factory(name, model)) == hf_greedy(model)


def test_head_dim_rejected_by_cpu_attention_fails_naming_the_field(tmp_path, vllm_module):
    vllm = vllm_module
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the head_dim restriction is vLLM's CPU attention backend's")
    model = tiny_model(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head_dim=16"):
        vllm.LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                 kv_cache_memory_bytes=64 << 20, max_model_len=256)


# Run as a separate Python process: whether vLLM starts engine processes is read from the environment
# once per process, and the rest of the test session runs vLLM in-process (conftest.vllm_llm_factory).
# The script does not import `core`: the frontend and each engine process find the architecture only
# through the `vllm.general_plugins` entry point, as a user's `vllm.LLM(model=dir)` would.
ENGINE_PROCESS_SCRIPT = """
import json, sys
import vllm

if __name__ == "__main__":  # engine processes may be spawned (shared/FACTS.md)
    path, prompts, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = vllm.LLM(model=path, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                   kv_cache_memory_bytes=64 << 20, max_model_len=512, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "client": type(llm.llm_engine.engine_core).__name__}), flush=True)
"""


def test_engine_processes_serve_the_plugin_with_hf_greedy_tokens(tmp_path):
    """The multi-process path the README promises (VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's default):
    the model is built inside an engine process that registered the core through the plugin."""
    model = tiny_model(seed=3, qk_norm=True, no_rope_layer_interval=2)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "serve.py").write_text(ENGINE_PROCESS_SCRIPT)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    run = subprocess.run([sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "model"), json.dumps(PROMPTS),
                          str(NEW_TOKENS)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["client"] == "SyncMPClient"  # the engine core ran in its own process, not InprocClient
    assert result["tokens"] == hf_greedy(model)


# vLLM's default on CPU compiles the decoder stack with inductor (`@support_torch_compile` on
# core.vllm.model.SmolForgeModel; `vllm_cpu_compile` in RL recipes). In a process of its own: dynamo's and
# inductor's caches would otherwise carry into the rest of the session.
COMPILED_SCRIPT = """
import json, sys
import vllm
from safetensors.torch import load_file
from core.vllm import update_weights

first, second, prompts, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
llm = vllm.LLM(model=first, skip_tokenizer_init=True, dtype="float32", enforce_eager=False,
               kv_cache_memory_bytes=64 << 20, max_model_len=512, seed=0)
assert llm.llm_engine.vllm_config.compilation_config.mode != 0, "the engine did not compile"
params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
def greedy():
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
before = greedy()
update_weights(llm, load_file(second + "/model.safetensors").items())
print("RESULT " + json.dumps({"before": before, "after": greedy()}), flush=True)
"""


def test_compiled_engine_greedy_equals_hf_before_and_after_weight_update(tmp_path):
    """The compiled graph reads the weights that the in-place reload writes (not constants frozen at compile)."""
    model = tiny_model(seed=4, qk_norm=True)
    model.save_pretrained(tmp_path / "first")
    expected_before = hf_greedy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "second")
    (tmp_path / "compiled.py").write_text(COMPILED_SCRIPT)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run([sys.executable, str(tmp_path / "compiled.py"), str(tmp_path / "first"),
                          str(tmp_path / "second"), json.dumps(PROMPTS), str(NEW_TOKENS)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["before"] == expected_before
    assert result["after"] == hf_greedy(model) != expected_before


class StalledServer:
    """A real HTTP server on 127.0.0.1 that accepts every request and never answers the stalled ones
    (POSTs; with `stall_get` also GETs) until the test releases it: what a hung vLLM server looks like
    to the client."""

    def __init__(self, stall_get: bool = False):
        import http.server
        import threading

        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if stall_get:
                    server.release.wait(60)  # bounded: the thread ends even if the test forgets to release
                self.answer({"data": [{"id": "stalled"}]} if self.path == "/v1/models" else {})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.release.wait(60)
                self.answer({"choices": []})

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def call_bounded(function, limit: float) -> tuple[BaseException | None, float]:
    """Run `function` in a thread, wait at most `limit` s; (the error it raised, seconds it took). A call still
    running at the limit fails the test here instead of hanging it (e.g. a client without a timeout)."""
    import threading
    import time

    outcome: dict = {}

    def target():
        started = time.monotonic()
        try:
            function()
        except BaseException as error:  # noqa: BLE001  (handed to the test to inspect)
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the request did not fail within {limit} s: no timeout"
    return outcome.get("error"), outcome["seconds"]


@pytest.mark.parametrize("stall_get", [False, True], ids=["stalled-generate", "stalled-health-check"])
def test_timed_client_fails_a_stalled_server_within_one_timeout_naming_it(stall_get):
    """Issue 30: a read timeout was retried (3 x vllm_request_timeout, 15 minutes at the default) and reported
    as 'unreachable ... ConnectionError'; TRL's own health check had no timeout at all."""
    from core.vllm.client import TimedVLLMClient, VLLMServerError

    timeout = 1.5
    server = StalledServer(stall_get=stall_get)
    try:
        def request():
            client = TimedVLLMClient(base_url=server.url, connection_timeout=5, request_timeout=timeout)
            client.generate(prompts=["What is 7+5?"], max_tokens=4)

        error, seconds = call_bounded(request, limit=8 * timeout)
    finally:
        server.close()
    assert isinstance(error, VLLMServerError), repr(error)
    assert seconds < 2 * timeout, f"failed after {seconds:.1f} s: the timed-out request was retried"
    assert f"vllm_request_timeout={timeout} s" in str(error) and "did not answer" in str(error), str(error)
    assert ("/health" if stall_get else "/v1/completions") in str(error)


def test_timed_client_retries_a_refused_connection_briefly():
    import socket
    import time

    from core.vllm.client import TimedVLLMClient, VLLMServerError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(VLLMServerError, match=f"127.0.0.1:{port} is not up after 0 s.*ConnectionError"):
        TimedVLLMClient(base_url=f"http://127.0.0.1:{port}", connection_timeout=0, request_timeout=30)
    assert time.monotonic() - started < 10  # TRL's retries took about a minute
