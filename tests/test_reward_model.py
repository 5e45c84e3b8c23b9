"""Reward models (issue 16): the core's sequence-classification head, `python -m rl.reward_model` on the
built-in preference pairs (held-out accuracy, resume after kill -9, bad data, LoRA on a Llama), and
rewards/reward_model_scorer.py, the reward function GRPO uses (its own template, batches, normalisation, the
served variant, and the `rl` stage calling it by recipe)."""

import json
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM, SmolForgeForSequenceClassification
from core.arithmetic import answer, question, split_of
from rewards.reward_model_scorer import RewardModelError, make_server, reward_model_reward
from core.recipe import parse_recipe
from rl.config import GRPOConfig
from rl.reward_model import PreferenceDataError
from rl.reward_model import main as reward_model_main
from rl.train import run as rl_run

from conftest import free_port, launch_stage, logged_losses, ok, write_recipe


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised tiny core causal LM with the pretraining tokenizer."""
    path = tmp_path_factory.mktemp("rm-base")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe(tmp_path: Path, base: Path, **overrides) -> Path:
    # ChatML: no system prompt, so the pairs are short (SmolLM3's adds ~100 tokens to every row).
    cfg = {"model_name_or_path": str(base), "chat_template": "chatml", "max_length": 256,
           "sources": [{"path": "builtin:arithmetic_preferences", "max_rows": 48}], "eval_sources": None,
           "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1,
           "save_strategy": "steps", "save_steps": 2, "seed": 0, "report_to": "none", "disable_tqdm": True}
    return write_recipe(tmp_path, {**cfg, **overrides})


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, base) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("rm-trained")
    r = recipe(tmp, base, sources=[{"path": "builtin:arithmetic_preferences", "max_rows": 160}],
               eval_sources=[{"path": "builtin:arithmetic_preferences", "split": "test", "max_rows": 120}],
               max_steps=20, per_device_train_batch_size=8, per_device_eval_batch_size=40, save_strategy="no",
               center_rewards_coefficient=0.01)
    metrics = reward_model_main(["--config", str(r), "--output_dir", str(tmp / "rm")])
    return tmp / "rm", metrics


# --- the model core's score head ---------------------------------------------------------------------

def test_core_sequence_classifier_reads_the_last_non_pad_token(tmp_path):
    config = SmolForgeConfig.from_preset("tiny", vocab_size=64, pad_token_id=0)
    torch.manual_seed(0)
    SmolForgeForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    assert type(model) is SmolForgeForSequenceClassification and model.config.num_labels == 1
    lm = load_file(tmp_path / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, lm["model.embed_tokens.weight"])  # decoder kept
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])  # row 1 right-padded
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=(ids != 0).long()).logits  # (2, 1)
        alone = model(input_ids=ids[1:, :3]).logits
        left = model(input_ids=torch.tensor([[0, 0, 5, 6, 7]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1]]),
                     position_ids=torch.tensor([[0, 0, 0, 1, 2]])).logits
    assert padded.shape == (2, 1)
    torch.testing.assert_close(padded[1], alone[0])
    torch.testing.assert_close(left[0], alone[0])


# --- training ---------------------------------------------------------------------------------------

def test_reward_model_ranks_held_out_pairs_above_chance(trained_rm, capsys):
    path, metrics = trained_rm
    with capsys.disabled():
        print(f"\nheld-out pairs (120, test facts), chosen ranked above rejected: before "
              f"{metrics['heldout_before/accuracy']:.3f} -> after {metrics['heldout/accuracy']:.3f} "
              f"(" + ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items()
                               if k.startswith("heldout/accuracy/")) + ")")
    assert metrics["heldout/accuracy"] >= 0.7  # chance is 0.5
    assert metrics["heldout/accuracy"] > metrics["heldout_before/accuracy"] + 0.1
    manifest = json.loads((path / "stage.json").read_text())
    assert manifest["stage"] == "reward_model" and manifest["metrics"]["heldout/accuracy"] == metrics["heldout/accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert type(model) is SmolForgeForSequenceClassification and model.config.pad_token_id is not None
    assert AutoTokenizer.from_pretrained(path).chat_template == chat_templates.load("chatml").training


def test_resume_after_kill_gives_the_same_losses(tmp_path, base):
    r = recipe(tmp_path, base)
    full, out = tmp_path / "full", tmp_path / "run"
    reward_model_main(["--config", str(r), "--output_dir", str(full)])  # in this process: one launch fewer
    killed = launch_stage("rl.reward_model", r, out, fault="kill_after_step:2")
    assert killed.returncode != 0 and (out / "checkpoint-2").is_dir() and not (out / "stage.json").exists()
    ok(launch_stage("rl.reward_model", r, out, "--resume_from_checkpoint", "true"))
    assert sorted(logged_losses(out)) == [1, 2, 3, 4]
    assert logged_losses(out) == logged_losses(full)  # bit-identical, step by step
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


GOOD = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}
BAD_PAIRS = {
    "no_rejected": ({"prompt": GOOD["prompt"], "chosen": GOOD["chosen"]}, r"row 2 has no 'rejected' field"),
    "strings_and_messages": ({**GOOD, "rejected": "five"}, r"row 2 mixes strings and message lists"),
    "identical_sides": ({**GOOD, "rejected": GOOD["chosen"]}, r"row 2: 'chosen' and 'rejected' are identical"),
    "ends_with_user": ({**GOOD, "chosen": [{"role": "user", "content": "4"}]},
                       r"row 2: field 'chosen' ends with a 'user' message"),
    "template_refuses": ({**GOOD, "chosen": [{"role": "assistant", "content": "4<|im_end|>"}]},
                         r"row 2: the chat template refuses this pair: .*control token <\|im_end\|>"),
    "longer_than_max_length": ({**GOOD, "chosen": [{"role": "assistant", "content": "4 " * 80}]},
                               r"row 2: \d+ tokens, longer than max_length 64 \(TRL would drop the row silently\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_pairs_fail_before_training_naming_the_row(tmp_path, base, case):
    bad, message = BAD_PAIRS[case]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (GOOD, GOOD, bad, GOOD)))
    r = recipe(tmp_path, base, sources=[{"path": str(data)}], max_length=64)
    out = tmp_path / "run"
    with pytest.raises(PreferenceDataError, match=f"source {data} {message}"):
        reward_model_main(["--config", str(r), "--output_dir", str(out)])
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_lora_reward_model_from_a_llama_checkpoint(tmp_path, base):
    """Any HF causal LM: its own *ForSequenceClassification; LoRA adapters and the score head are trained
    and merged into a plain checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    llama = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    r = recipe(tmp_path, llama, use_peft=True, lora_r=4, lora_alpha=8, max_steps=3, save_strategy="no")
    reward_model_main(["--config", str(r), "--output_dir", str(tmp_path / "rm")])
    saved = load_file(tmp_path / "rm" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in saved)
    before = load_file(llama / "model.safetensors")
    changed = [k for k in before if k in saved and not torch.equal(before[k], saved[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed  # a merged adapter
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert type(model).__name__ == "LlamaForSequenceClassification" and "score.weight" in saved


# --- the reward function -----------------------------------------------------------------------------

def prompts_and_completions():
    """TRL's conversational form, as its reply parser gives it: a think block split off into reasoning_content."""
    facts = split_of("test")[:3]
    prompts = [[{"role": "user", "content": question(f)}] for f in facts]
    completions = [[{"role": "assistant", "content": str(answer(facts[0]))}],
                   [{"role": "assistant", "content": "13", "reasoning_content": "Adding them up."}],
                   [{"role": "assistant", "content": "I am not sure."}]]
    return prompts, completions


def test_reward_function_applies_the_reward_models_own_template(trained_rm):
    """The policy writes with SmolLM3's template and its own tokenizer; the reward model was trained on
    ChatML. It must score the ChatML render of the decoded reply, not the policy's text."""
    path, _ = trained_rm
    score = reward_model_reward(str(path), batch_size=2)
    prompts, completions = prompts_and_completions()
    texts = score.texts(completions, prompts, None)
    expected = [chat_templates.render(p + [{"role": "assistant", "content": c[0]["content"]}], "chatml")
                for p, c in zip(prompts, completions)]
    expected[1] = chat_templates.render(prompts[1] + [{"role": "assistant", "content":
                                                        "<think>\nAdding them up.\n</think>\n13"}], "chatml")
    assert texts == expected
    scores = score(completions, prompts=prompts, chat_template_kwargs=[{"enable_thinking": False}] * 3)
    assert scores == pytest.approx(score.score_texts(expected), abs=1e-6)
    policy_texts = [chat_templates.render(p + c, "smollm3", enable_thinking=True) for p, c in zip(prompts, completions)]
    assert all(abs(a - b) > 1e-4 for a, b in zip(score.score_texts(policy_texts), scores))
    # A control token the policy generated is not a turn boundary for the reward model.
    faked = [[{"role": "assistant", "content": "5<|im_end|>\n<|im_start|>assistant\n7"}]]
    assert score.texts(faked, prompts[:1], None)[0].count("<|im_start|>") == 2


def test_scores_are_batched_on_device_and_normalised_per_call(trained_rm):
    path, _ = trained_rm
    prompts, completions = prompts_and_completions()
    prompts, completions = prompts * 3, completions * 3
    one = reward_model_reward(str(path), batch_size=1)(completions, prompts=prompts)
    batched = reward_model_reward(str(path), batch_size=4)(completions, prompts=prompts)  # padded batches
    assert batched == pytest.approx(one, abs=1e-5)
    normed = torch.tensor(reward_model_reward(str(path), normalize=True)(completions, prompts=prompts))
    assert abs(normed.mean()) < 1e-5 and abs(normed.std(unbiased=False) - 1) < 1e-4
    plain = reward_model_reward(str(path))
    assert plain.texts(["4"], ["2+2="], None) == ["2+2=4" + plain.tokenizer.eos_token]
    with pytest.raises(RewardModelError, match="either as path .* or as url"):
        reward_model_reward(str(path), url="http://127.0.0.1:1")


def test_normalisation_is_over_the_batch_of_every_process(tmp_path):
    """Issue 30: GRPO calls the reward on every process with that process's completions, and one group's
    completions can sit on two processes. Normalised per process, the same score became a different
    reward on each; normalised over the batch gathered from both, each gets what one process would give
    for the whole batch. Two real processes over gloo."""
    from torch.multiprocessing import spawn

    from reward_model_ranks import normalize_on_rank
    from rewards.reward_model_scorer import normalized

    scores = [[0.0, 1.0, 2.0], [10.0, 11.0]]
    spawn(normalize_on_rank, args=(2, free_port(), scores, str(tmp_path)), nprocs=2)
    on_ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert on_ranks[0] + on_ranks[1] == pytest.approx(normalized(scores[0] + scores[1]), abs=1e-9)
    assert on_ranks[0] != pytest.approx(normalized(scores[0]))  # not what each process alone would give


def test_scores_read_the_token_ids_training_read(tmp_path, base):
    """Issue 30: RewardTrainer trained on `tokenizer(prompt + chosen + eos)` (rl/reward_model.py
    tokenize_pair), BOS included for a tokenizer that adds one (Llama's), while scoring tokenised strings
    without special tokens: the model read its strings without the BOS it was trained with."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from rl.reward_model import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"bos_token": "<|bos|>"})
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    assert tokenizer("2+2=")["input_ids"][0] == tokenizer.bos_token_id  # Llama-style: BOS added
    torch.manual_seed(0)
    config = SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 1
    SmolForgeForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    score = reward_model_reward(str(tmp_path / "rm"))
    trained_on = [tokenize_pair({"prompt": "2+2=", "chosen": answer, "rejected": "?"}, score.tokenizer)[0]
                  for answer in ("4", "5")]
    assert trained_on[0][0] == tokenizer.bos_token_id
    with torch.no_grad():
        expected = [score.model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in trained_on]
    assert score(["4", "5"], prompts=["2+2=", "2+2="]) == pytest.approx(expected, abs=1e-5)
    assert score.encode(["4", "5"], ["2+2=", "2+2="]) == trained_on


def test_served_reward_model_matches_the_local_one_and_names_errors(trained_rm):
    path, _ = trained_rm
    local = reward_model_reward(str(path))
    server = make_server(local)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        prompts, completions = prompts_and_completions()
        assert reward_model_reward(url=url)(completions, prompts=prompts) == pytest.approx(
            local(completions, prompts=prompts), abs=1e-6)
        with pytest.raises(RewardModelError, match=r"failed \(400\): .*3 completions but 1 prompts"):
            reward_model_reward(url=url)(completions, prompts=prompts[:1])
    finally:
        server.shutdown()
        server.server_close()
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        with pytest.raises(TimeoutError, match=r"did not answer within timeout=0.5s"):
            reward_model_reward(url=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)(["4"], prompts=["2+2="])
    finally:
        silent.close()


def test_rl_stage_scores_policy_completions_with_the_reward_model_named_in_its_recipe(tmp_path, trained_rm):
    """The `rl` stage with `reward_models` in its recipe and no verifiable reward: a policy with another
    tokenizer (vocabulary and template) than the reward model's; its replies go through TRL's reply parser,
    control tokens and all, and the learned score is TRL's only reward."""
    from pretrain.tokenizer import sample_sources, train_tokenizer

    path, _ = trained_rm
    tokenizer = train_tokenizer(sample_sources([{"name": "math", "path": "builtin:math"}], 100), 320)
    chat_templates.install(tokenizer, "smollm3", add_missing_tokens=True)
    torch.manual_seed(0)
    policy = tmp_path / "policy"
    SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    initial = load_file(policy / "model.safetensors")
    fields = {"model_name_or_path": str(policy), "output_dir": str(tmp_path / "grpo"), "suite": "arithmetic",
              "reward_funcs": [], "reward_models": [{"path": str(path), "weight": 1.0, "normalize": True}],
              "use_vllm": False, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8,
              "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
              "held_out_eval": False, "seed": 0}
    (cfg,) = parse_recipe(GRPOConfig, args=["--config", str(write_recipe(tmp_path, fields))])
    rl_run(cfg)
    logged = [json.loads(line) for line in (tmp_path / "grpo/metrics.jsonl").read_text().splitlines()]
    logged = [entry for entry in logged if "rewards/reward_model/mean" in entry]
    assert len(logged) == 2 and all(entry["rewards/reward_model/std"] > 0 for entry in logged)
    assert not any(key.startswith("rewards/accuracy") for entry in logged for key in entry)
    trained = load_file(tmp_path / "grpo/model.safetensors")
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
