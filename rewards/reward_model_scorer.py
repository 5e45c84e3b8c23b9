"""A learned reward model as a reward function: GRPO scores completions with it next to the verifiable rewards.

    from rewards.reward_model_scorer import reward_model_reward
    score = reward_model_reward("out/tiny/reward_model", normalize=True, batch_size=16)
    score(completions, prompts=prompts)          # -> list[float], one per completion

The function keeps the contract of every reward function here (rewards/functions.py) and TRL's
GRPOTrainer signature: `fn(completions, prompts=..., **columns) -> list[float | None]`, called with
the decoded completions (strings, or TRL's conversational completions: one assistant message each)
and their prompts (strings, or message lists). `chat_template_kwargs`, when the dataset has that
column, is passed to the template per completion; every other column is ignored.

What is scored is what the reward model was trained on (rl/reward_model.py, TRL's RewardTrainer):
  - conversational: `prompt + completion` rendered with the *reward model's own* chat template, the one
    saved with its tokenizer. GRPO hands reward functions decoded text, never token ids, so a reward
    model whose tokenizer or template differs from the policy's scores what it was trained on. TRL's
    reply parser may have split a think block off into `reasoning_content`; it is put back in front of
    the content as the policy wrote it (`<think>\\n...\\n</think>\\n`), so a template without a reasoning
    field (ChatML) scores the same text as one with it;
  - standard (strings): `prompt + completion + eos`, eos appended as RewardTrainer does in training
    (TRL's GRPOTrainer scores `prompt + completion` without it; here training and scoring agree);
  - the reward model's special tokens are removed from completions first. TRL decodes with
    skip_special_tokens=True only where the policy's tokenizer has no reply parser; with one (every
    template `chat_templates.install` sets up), a generated `<|im_start|>` stays in the content. Left
    there, the reward model's template would refuse the reply (ours do) or, worse, read it as a turn
    boundary: a policy could then write a fake "assistant" turn for the reward model to score.
Scores are computed in batches of `batch_size` under `torch.inference_mode`, on the trainer's device
(accelerate's `PartialState().device`: this process's GPU under `accelerate launch`, else the CPU),
where the model is moved on the first call; token ids as training tokenised them (`encode`: strings
with the tokenizer's special tokens, BOS included, rendered conversations with the template's own).
`normalize=True` returns (score - mean) / (std + 1e-6) over the completions of one call on every
process (the batch GRPO scores at once, gathered over torch.distributed), so a reward model's scale
does not swamp the 0/1 verifiable rewards it is weighted against.

Served from another process, so that a large reward model does not sit in trainer memory:

    python -m rewards.reward_model_scorer --model out/tiny/reward_model --port 8011      # 127.0.0.1 by default
    score = reward_model_reward(url="http://127.0.0.1:8011", normalize=True, timeout=60)

The server scores the same way (POST /score with {"prompts", "completions", "chat_template_kwargs"}
-> {"scores"}; GET /health); normalisation happens in the client. A server error reaches the caller
with the server's own message, and a server that does not answer within `timeout` seconds is an error
naming its URL, never a silent zero.

A GRPO recipe names reward models next to its verifiable rewards, with a weight each
(`RewardModelSpec`, one mapping per model; the `rl` stage appends them to its reward functions, and its
weights to `reward_weights`; rl/data.py `reward_model_specs` checks them before anything loads):

    reward_funcs: [accuracy]
    reward_weights: [1.0]
    reward_models:
      - {path: out/tiny/reward_model, weight: 0.5, normalize: true, batch_size: 16}
      - {url: "http://127.0.0.1:8011", weight: 0.5, normalize: true, timeout: 60}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch

from rewards.functions import message_text


class RewardModelError(ValueError):
    """A reward model cannot be used as asked: names the model (path or URL) and what to do instead."""


def without_tokens(text: str, tokens: Sequence[str]) -> str:
    for token in tokens:
        text = text.replace(token, "")
    return text


def decoded_messages(completion: list[dict], special_tokens: Sequence[str]) -> list[dict]:
    """TRL's conversational completion as the reward model should read it: any `reasoning_content` put
    back into the content as the policy generated it (`rewards.functions.message_text`, the one place
    every reward reads a reply), so every template renders the same reply; and the reward model's special
    tokens removed from the content."""
    messages = []
    for message in completion:
        content = message_text(message) if message.get("reasoning_content") else message.get("content")
        message = {k: v for k, v in message.items() if k != "reasoning_content"}
        if isinstance(content, str):
            content = without_tokens(content, special_tokens)
        messages.append({**message, "content": content})
    return messages


class LocalRewardModel:
    """A reward-model checkpoint (a sequence classifier with one output) as a reward function."""

    def __init__(self, path: str, normalize: bool = False, batch_size: int = 16, device: str | None = None):
        import core  # noqa: F401  (registers our core with AutoModelForSequenceClassification)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise RewardModelError(f"reward model {path}: batch_size must be >= 1, got {batch_size}")
        self.path, self.normalize, self.batch_size, self.device = str(path), normalize, batch_size, device
        self.__name__ = f"reward_model:{Path(path).name}"  # TRL logs a reward function under its __name__
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.num_labels != 1:
            raise RewardModelError(f"reward model {path}: the checkpoint has num_labels={self.model.config.num_labels}; "
                                   f"a reward model has one output (train one with `python -m rl.reward_model`)")
        if self.tokenizer.pad_token is None:
            # As TRL's GRPOTrainer does for a reward model without a pad token.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Longest first, so no shorter token is removed from inside a longer one.
        self.special_tokens = sorted(self.tokenizer.all_special_tokens, key=len, reverse=True)
        self._on_device = False

    def texts(self, completions: Sequence, prompts: Sequence | None, chat_template_kwargs: Sequence | None) -> list[str]:
        """What the reward model reads for each completion (see the module docstring)."""
        prompts = prompts if prompts is not None else [None] * len(completions)
        kwargs_list = chat_template_kwargs if chat_template_kwargs is not None else [None] * len(completions)
        if len(prompts) != len(completions) or len(kwargs_list) != len(completions):
            raise RewardModelError(f"reward model {self.path}: {len(completions)} completions but {len(prompts)} "
                                   f"prompts and {len(kwargs_list)} chat_template_kwargs; give one per completion")
        texts = []
        for prompt, completion, kwargs in zip(prompts, completions, kwargs_list):
            if isinstance(completion, str):
                if prompt is not None and not isinstance(prompt, str):
                    raise RewardModelError(f"reward model {self.path}: a string completion with a message-list "
                                           f"prompt; give both as strings or both as messages")
                eos = self.tokenizer.eos_token or ""
                texts.append((prompt or "") + without_tokens(completion, self.special_tokens) + eos)
                continue
            if not self.tokenizer.chat_template:
                raise RewardModelError(f"reward model {self.path}: conversational completions need a chat template, "
                                       f"and its tokenizer has none; train it with rl.reward_model (which saves one) "
                                       f"or install one with chat_templates.install")
            messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or []))
            texts.append(self.tokenizer.apply_chat_template(messages + decoded_messages(completion, self.special_tokens),
                                                            tokenize=False,
                                                            **(kwargs or {})))
        return texts

    def encode(self, completions: Sequence, prompts: Sequence | None = None,
               chat_template_kwargs: Sequence | None = None) -> list[list[int]]:
        """The token ids the reward model reads for each completion: `texts`, tokenised exactly as training
        tokenised them (rl/reward_model.py `tokenize_pair`, TRL's RewardTrainer). A rendered conversation
        carries the template's own BOS (no special tokens added); a plain string gets the tokenizer's
        special tokens, as `tokenizer(prompt + chosen + eos)` added them in training: scoring without them
        read a Llama-style reward model's strings without the BOS it was trained with (issue 30)."""
        texts = self.texts(completions, prompts, chat_template_kwargs)
        return [self.tokenizer(text, add_special_tokens=isinstance(completion, str))["input_ids"]
                for text, completion in zip(texts, completions)]

    def score_texts(self, texts: list[str]) -> list[float]:
        """Scores of rendered conversations (`texts` of conversational completions)."""
        return self.score_ids([self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts])

    @torch.inference_mode()
    def score_ids(self, ids: list[list[int]]) -> list[float]:
        if not self._on_device:
            from accelerate import PartialState

            self.model.to(self.device or PartialState().device)
            self._on_device = True
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(ids), self.batch_size):
            batch = self.tokenizer.pad({"input_ids": ids[start:start + self.batch_size]}, return_tensors="pt",
                                       padding_side="right").to(device)
            scores.extend(self.model(**batch).logits[:, 0].float().tolist())
        return scores

    def __call__(self, completions: Sequence, prompts: Sequence | None = None,
                 chat_template_kwargs: Sequence | None = None, **columns) -> list[float | None]:
        scores = self.score_ids(self.encode(completions, prompts, chat_template_kwargs))
        return normalized(scores) if self.normalize else scores


class ServedRewardModel:
    """The client of a reward model served by `python -m rewards.reward_model_scorer` (same contract)."""

    def __init__(self, url: str, normalize: bool = False, timeout: float = 60.0):
        self.url, self.normalize, self.timeout = url.rstrip("/"), normalize, timeout
        self.__name__ = f"reward_model:{self.url}"

    def __call__(self, completions: Sequence, prompts: Sequence | None = None,
                 chat_template_kwargs: Sequence | None = None, **columns) -> list[float | None]:
        body = json.dumps({"completions": list(completions), "prompts": None if prompts is None else list(prompts),
                           "chat_template_kwargs": None if chat_template_kwargs is None else list(chat_template_kwargs)})
        request = urllib.request.Request(f"{self.url}/score", data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                scores = json.loads(response.read())["scores"]
        except urllib.error.HTTPError as error:
            message = json.loads(error.read() or b"{}").get("error", error.reason)
            raise RewardModelError(f"reward model server {self.url} failed ({error.code}): {message}") from error
        except (TimeoutError, socket.timeout) as error:
            raise TimeoutError(f"reward model server {self.url} did not answer within timeout={self.timeout}s; "
                               f"raise `timeout` or check the server") from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise TimeoutError(f"reward model server {self.url} did not answer within timeout={self.timeout}s; "
                                   f"raise `timeout` or check the server") from error
            raise RewardModelError(f"reward model server {self.url} cannot be reached: {error.reason}; start it with "
                                   f"`python -m rewards.reward_model_scorer --model <checkpoint> --port <port>`") from error
        if len(scores) != len(completions):
            raise RewardModelError(f"reward model server {self.url} returned {len(scores)} scores for "
                                   f"{len(completions)} completions")
        return normalized(scores) if self.normalize else scores


def normalized(scores: list[float]) -> list[float]:
    """(score - mean) / (std + 1e-6), mean and population std over the whole batch GRPO scores at once:
    this call's completions on every process (`gathered`). Per process, the completions of one GRPO group
    split over two processes were scaled differently (issue 30). A single completion normalises to 0.0:
    alone, it is neither better nor worse than its batch."""
    batch = gathered(scores)
    mean = sum(batch) / len(batch)
    std = math.sqrt(sum((s - mean) ** 2 for s in batch) / len(batch))
    return [(s - mean) / (std + 1e-6) for s in scores]


def gathered(scores: list[float]) -> list[float]:
    """The scores of this call on every process, in rank order, when torch.distributed is initialised (TRL
    calls each reward function on every process at every step); else `scores`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores
    everyone: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(scores))
    return [score for part in everyone for score in part]


def reward_model_reward(path: str | None = None, *, url: str | None = None, normalize: bool = False,
                        batch_size: int = 16, timeout: float = 60.0, device: str | None = None):
    """The reward function of a reward-model checkpoint (`path`) or of a served one (`url`)."""
    if (path is None) == (url is None):
        raise RewardModelError(f"give a reward model either as path (a checkpoint) or as url (a server), not "
                               f"{'both' if path else 'neither'} (path={path!r}, url={url!r})")
    if url is not None:
        return ServedRewardModel(url, normalize=normalize, timeout=timeout)
    return LocalRewardModel(path, normalize=normalize, batch_size=batch_size, device=device)


@dataclass
class RewardModelSpec:
    """One entry of a GRPO recipe's `reward_models` list."""

    path: str | None = None
    url: str | None = None
    weight: float = 1.0
    normalize: bool = False
    batch_size: int = 16
    timeout: float = 60.0

    @classmethod
    def from_dict(cls, raw: dict, index: int) -> RewardModelSpec:
        where = f"reward_models[{index}]"
        if not isinstance(raw, dict):
            raise RewardModelError(f"{where} must be a mapping such as {{path: out/reward_model, weight: 0.5}}, "
                                   f"got {raw!r}")
        keys = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise RewardModelError(f"{where}: unknown keys {unknown}; keys: {keys}")
        spec = cls(**raw)
        if (spec.path is None) == (spec.url is None):
            raise RewardModelError(f"{where}: give either path (a checkpoint) or url (a server started with "
                                   f"`python -m rewards.reward_model_scorer`), got path={spec.path!r}, url={spec.url!r}")
        if spec.path is not None and not Path(spec.path).is_dir():
            raise RewardModelError(f"{where}: path {spec.path!r} is not a checkpoint directory; train one with "
                                   f"`python -m rl.reward_model --config recipes/tiny/reward_model.yaml`")
        return spec

    def build(self):
        return reward_model_reward(self.path, url=self.url, normalize=self.normalize, batch_size=self.batch_size,
                                   timeout=self.timeout)


# --- the server ------------------------------------------------------------------------------------

def make_server(model: LocalRewardModel, host: str = "127.0.0.1", port: int = 0) -> HTTPServer:
    """An HTTP server scoring with `model` (one request at a time: the model is not shared between threads).
    Port 0 picks a free port: `server.server_address[1]`."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {"model": model.path})
            else:
                self._reply(404, {"error": f"no route {self.path}; routes: GET /health, POST /score"})

        def do_POST(self):
            if self.path != "/score":
                self._reply(404, {"error": f"no route {self.path}; routes: GET /health, POST /score"})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scores = model.score_ids(model.encode(request["completions"], request.get("prompts"),
                                                      request.get("chat_template_kwargs")))
            except Exception as error:  # the client raises it with this message: name the cause
                self._reply(400 if isinstance(error, (KeyError, ValueError, TypeError)) else 500,
                            {"error": f"{type(error).__name__}: {error}"})
                return
            self._reply(200, {"scores": scores})

        def log_message(self, format, *args):  # quiet: GRPO calls it every step
            pass

    return HTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rewards.reward_model_scorer",
                                     description="Serve a reward model over HTTP for GRPO (rewards/reward_model_scorer.py).")
    parser.add_argument("--model", required=True, help="Reward-model checkpoint (python -m rl.reward_model output).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only).")
    parser.add_argument("--port", type=int, default=8011, help="Port to listen on (0: any free port).")
    parser.add_argument("--batch_size", type=int, default=16, help="Completions per forward pass.")
    parser.add_argument("--device", default=None, help="torch device (default: the first GPU if any, else CPU).")
    args = parser.parse_args(argv)
    server = make_server(LocalRewardModel(args.model, batch_size=args.batch_size, device=args.device),
                         args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving reward model {args.model} on http://{host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
