"""Issue 30, "the seams": every reward sees what the model wrote, whichever stage calls it.

Through the real `trl.GRPOTrainer` (transformers generate, one step): a tiny policy taught to write a think
block, with a tokenizer whose template `chat_templates.install` set up, so that TRL's reply parser moves the
think block into `reasoning_content`. The rewards, the reward-model scorer and the rollout rows must still
see it; and the same completion must get the same reward from rewards.evaluate's scoring as from GRPO's.
"""

import copy

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM, SmolForgeForSequenceClassification
from core.generation import Sample
from rewards.evaluate import score_samples
from rewards.functions import REWARD_FUNCS, completion_text
from rewards.reward_model_scorer import reward_model_reward
from rewards.suites import SUITES
from rewards.verifier_pool import configure_default_pool
from rl.config import GRPOConfig
from rl.data import build_rewards, reward_setup
from rl.rollouts import rollout_rows

PROMPT = "What is 7+5?"
THINK = "7+5=12"
# R1's template: the one every think-block reward of REWARD_FUNCS reads in full (format, tag_count too).
REPLY = f"<think>\n{THINK}\n</think>\n<answer>\n12\n</answer>"
MAX_COMPLETION_LENGTH = 32


@pytest.fixture(scope="module", autouse=True)
def short_item_limit():
    configure_default_pool(num_workers=1, item_timeout_s=5.0)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    """Our pretraining tokenizer with Qwen 3's template installed: its reply parser splits off think blocks."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_templates.install(tokenizer, "qwen3", add_missing_tokens=True)
    assert tokenizer.response_template is not None
    return tokenizer


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def policy(tokenizer):
    """A small core model that has learned to answer PROMPT with REPLY and stop: trained on that one sequence
    until its greedy reply is REPLY (GRPO samples it at temperature 0.1 below)."""
    torch.manual_seed(0)
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), hidden_size=64,
                                                             intermediate_size=128, num_hidden_layers=2))
    prompt = prompt_ids(tokenizer)
    reply = tokenizer(REPLY + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + reply])
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 1e-2:
            break
    model.eval()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=len(reply), do_sample=False)[0, len(prompt):]
    assert greedy.tolist() == reply, tokenizer.decode(greedy)
    return model


class Recorder:
    """A reward function that records what TRL hands it, and returns what `fn` makes of it."""

    def __init__(self, name: str, fn):
        self.__name__, self.fn, self.calls = name, fn, []

    def __call__(self, completions, **columns):
        values = self.fn(completions=completions, **columns)
        self.calls.append({"completions": completions, "completion_ids": columns.get("completion_ids"),
                           "values": values})
        return values


# One step, 2 completions of PROMPT, transformers generate, near-greedy sampling of the taught reply.
GRPO_ARGS = dict(per_device_train_batch_size=2, num_generations=2, max_steps=1, report_to="none", use_cpu=True,
                 bf16=False, logging_steps=1, max_completion_length=MAX_COMPLETION_LENGTH, use_vllm=False,
                 save_strategy="no", beta=0.0, temperature=0.1)


def grpo_step(policy, tokenizer, tmp_path, reward_funcs):
    """One step of TRL's own GRPOTrainer."""
    args = trl.GRPOConfig(output_dir=str(tmp_path), **GRPO_ARGS)
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT}], "answer": "12"}] * 2)
    trainer = trl.GRPOTrainer(model=copy.deepcopy(policy), reward_funcs=reward_funcs, args=args, train_dataset=rows,
                          processing_class=copy.deepcopy(tokenizer))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer_dir):
    """A random tiny reward model with ChatML, as rl.reward_model saves one (its scores do not matter here)."""
    path = tmp_path_factory.mktemp("rm")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_templates.install(tokenizer, "chatml", add_missing_tokens=True)
    torch.manual_seed(0)
    config = SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 1
    SmolForgeForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_every_reward_and_the_reward_model_see_the_think_block_through_trls_reply_parser(
        policy, tokenizer, tmp_path, reward_model_dir):
    recorders = {name: Recorder(name, fn) for name, fn in REWARD_FUNCS.items() if name != "accuracy"}
    scorer = reward_model_reward(str(reward_model_dir))
    scored_texts = []  # what the reward model reads, decoded from the ids it scores
    score_ids = scorer.score_ids
    scorer.score_ids = lambda ids: scored_texts.extend(scorer.tokenizer.batch_decode(ids)) or score_ids(ids)
    recorders["reward_model"] = Recorder("reward_model", scorer)
    trainer = grpo_step(policy, tokenizer, tmp_path, list(recorders.values()))

    (call,) = recorders["think_format"].calls
    # TRL's parser did split the think block off: what the rewards were handed is not a plain string.
    assert [c[0]["reasoning_content"] for c in call["completions"]] == [THINK, THINK]
    values = {name: recorder.calls[0]["values"] for name, recorder in recorders.items()}
    assert {name: values[name] for name in ("think_format", "format", "tag_count", "answer_consistency")} \
        == {"think_format": [1.0, 1.0], "format": [1.0, 1.0], "tag_count": [1.0, 1.0], "answer_consistency": [1.0, 1.0]}
    assert [completion_text(c) for c in call["completions"]] == [REPLY, REPLY]
    assert all(THINK in text and text.index(THINK) < text.index("<answer>") for text in scored_texts)
    assert len(scored_texts) == 2
    # The rollout rows (rollouts.jsonl) keep the think text too: it is what length hacking grows.
    rows = rollout_rows(trainer._logs["prompt"], trainer._logs["completion"], trainer._logs["rewards"],
                        trainer._logs["advantages"])
    assert [row["completion"] for row in rows] == [REPLY, REPLY]
    assert [row["prompt"] for row in rows] == [PROMPT, PROMPT]
    assert [row["reward/think_format"] for row in rows] == [1.0, 1.0]


@pytest.mark.parametrize("message, text", [
    ({"role": "assistant", "content": "12"}, "12"),
    ({"role": "assistant", "content": "12", "reasoning_content": THINK}, f"<think>\n{THINK}\n</think>\n12"),
    ({"role": "assistant", "content": "\n12", "reasoning_content": f"\n{THINK}\n"}, f"<think>\n{THINK}\n</think>\n12"),
    ({"role": "assistant", "content": "12", "reasoning_content": f"<think>\n{THINK}\n</think>"},
     f"<think>\n{THINK}\n</think>\n12"),
    ({"role": "assistant", "content": f"<think>\n{THINK}\n</think>\n12"}, f"<think>\n{THINK}\n</think>\n12"),
    ({"role": "assistant", "content": None, "reasoning_content": THINK}, f"<think>\n{THINK}\n</think>\n"),
])
def test_completion_text_puts_back_what_any_parser_split_off(message, text):
    assert completion_text([message]) == text
    assert completion_text(text) == text


def test_the_same_completion_gets_the_same_rewards_in_grpo_and_in_evaluation(policy, tokenizer, tmp_path):
    """Every reward of the arithmetic suite, bound as the `rl` stage binds them (rl/data.py), on TRL's
    completions; then the same token ids as rewards.evaluate samples them (EOS cut off), scored by
    `score_samples` with the same generation limit."""
    suite = SUITES["arithmetic"]
    names, _, kwargs = reward_setup(GRPOConfig(output_dir=str(tmp_path), suite="arithmetic", **GRPO_ARGS))
    assert names == list(suite.reward_weights)
    recorders = [Recorder(reward.name, reward) for reward in build_rewards(names, kwargs)]
    grpo_step(policy, tokenizer, tmp_path, recorders)
    completion_ids = recorders[0].calls[0]["completion_ids"]
    grpo = {recorder.__name__: recorder.calls[0]["values"] for recorder in recorders}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(ids[-1] == eos for ids in completion_ids)  # TRL keeps the EOS that stopped the completion
    samples = [[Sample(ids[:-1], truncated=False, eos_token_id=ids[-1]) for ids in completion_ids]]
    evaluated = score_samples(suite, [{"prompt": PROMPT, "answer": "12"}], samples, tokenizer,
                              [prompt_ids(tokenizer)], True, MAX_COMPLETION_LENGTH)
    assert evaluated == grpo
    # Not vacuous: the think block is read (answer_consistency) and the length is in tokens, EOS included.
    assert grpo["answer_consistency"] == [1.0, 1.0] and grpo["accuracy"] == [1.0, 1.0]
    length = len(completion_ids[0])
    short = score_samples(suite, [{"prompt": PROMPT, "answer": "12"}], samples, tokenizer, [prompt_ids(tokenizer)],
                          True, length + 1)
    # DAPO ramp with L_max = length + 1, cache 4: (length + 1 - 4 - length) / 4; without the EOS it was -0.5.
    assert short["soft_overlong_punishment"] == [-0.75, -0.75]
