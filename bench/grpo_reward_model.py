"""Issue 16's GRPO check, until the `rl` stage takes reward models by recipe: TRL's GRPOTrainer on the tiny
SFT model with the learned reward alone; on the 40 held-out prompts (greedy, no-think), the reward-model
score and the verifiable accuracy reward before and after, so a policy that only hacks the learned reward
shows as a higher score with no more correct answers.

    make demo && python -m rl.reward_model --config recipes/tiny/reward_model.yaml
    python bench/grpo_reward_model.py [--policy out/tiny/sft] [--reward_model out/tiny/reward_model] [--steps 30]

Not measured on the trained pipeline yet (issue 16 report: the 2-core machine was shared at load 10, where
pretraining ran at 8 s/step); checked end to end on a random policy (2 steps).
"""
import argparse
import time

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import core  # noqa: F401  (registers the core with the Auto classes)
from core.arithmetic import answer, question, split_of
from rewards.functions import REWARD_FUNCS
from rewards.reward_model import reward_model_reward

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--policy", default="out/tiny/sft")
parser.add_argument("--reward_model", default="out/tiny/reward_model")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--learning_rate", type=float, default=5e-4)
parser.add_argument("--output_dir", default="out/tiny/grpo_reward_model")
cli = parser.parse_args()
policy_path, rm_path, steps, lr = cli.policy, cli.reward_model, cli.steps, cli.learning_rate
KW = {"enable_thinking": False}
tok = AutoTokenizer.from_pretrained(policy_path)
policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
rm = reward_model_reward(rm_path, batch_size=32)


def rows(split):
    return [{"prompt": [{"role": "user", "content": question(f)}], "answer": str(answer(f)),
             "chat_template_kwargs": KW} for f in split_of(split)]


train, test = rows("train"), rows("test")
eos = policy.generation_config.eos_token_id


@torch.no_grad()
def evaluate(model, label):
    model.eval()
    comps = []
    for r in test:
        ids = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True, **KW)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        comps.append([{"role": "assistant", "content": tok.decode(out[0, len(ids):], skip_special_tokens=True)}])
    reward = rm(comps, prompts=[r["prompt"] for r in test], chat_template_kwargs=[KW] * len(test))
    acc = REWARD_FUNCS["accuracy"](comps, answer=[r["answer"] for r in test])
    print(f"{label}: held-out ({len(test)} prompts, greedy) reward-model score {sum(reward)/len(reward):.3f}, "
          f"accuracy {sum(acc)/len(acc):.3f}; e.g. {[c[0]['content'] for c in comps[:4]]}", flush=True)


t0 = time.time()
evaluate(policy, "before GRPO")
args = trl.GRPOConfig(output_dir=cli.output_dir, per_device_train_batch_size=32, num_generations=8,
                      max_completion_length=32, learning_rate=lr, max_steps=steps, logging_steps=5, save_strategy="no",
                      report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                      chat_template_kwargs=KW)
trainer = trl.GRPOTrainer(model=policy, reward_funcs=[rm], args=args, train_dataset=Dataset.from_list(train),
                          processing_class=tok)
trainer.train()
print("training reward by step:", [(h["step"], round(h["reward"], 3)) for h in trainer.state.log_history if "reward" in h])
evaluate(trainer.model, f"after {steps} GRPO steps")
print(f"{time.time() - t0:.0f} s")
