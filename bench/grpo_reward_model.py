"""Issue 16's GRPO check: the `rl` stage with the learned reward alone (`reward_funcs: []`, `reward_models:
[{path: ..., normalize: true}]` over recipes/tiny/grpo.yaml) on the tiny SFT model; on the 40 held-out
prompts (greedy), the reward-model score and the verifiable accuracy reward before and after, so a policy
that only hacks the learned reward shows as a higher score with no more correct answers.

    make demo && python -m rl.reward_model --config recipes/tiny/reward_model.yaml
    python bench/grpo_reward_model.py [--policy out/tiny/sft] [--reward_model out/tiny/reward_model] [--steps 30]
"""
import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import core  # noqa: F401  (registers the core with the Auto classes)
from core.arithmetic import answer, question, split_of
from core.recipe import parse_recipe
from rewards.functions import REWARD_FUNCS
from rewards.reward_model_scorer import reward_model_reward
from rl.config import GRPOConfig
from rl.train import run

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--policy", default="out/tiny/sft")
parser.add_argument("--reward_model", default="out/tiny/reward_model")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--learning_rate", type=float, default=None, help="default: recipes/tiny/grpo.yaml's")
parser.add_argument("--beta", type=float, default=1.0,
                    help="KL to the starting policy: a learned reward is exploited without it (InstructGPT's KL "
                         "penalty). Measured with recipes/tiny/reward_model.yaml, 30 steps, held-out RM score / "
                         "accuracy from 1.174 / 0.350: beta 0.1 -> 1.462 / 0.250 (exploited), 0.3 -> 1.348 / 0.375, "
                         "0.5 -> 1.331 / 0.300, 1.0 -> 1.319 / 0.400 (40 greedy answers: 0.025 each)")
parser.add_argument("--accuracy_weight", type=float, default=0.0,
                    help="0: the learned reward alone; > 0: next to the verifiable accuracy reward, the reward model "
                         "normalised per batch and weighted 0.5")
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


test = rows("test")
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
recipe = yaml.safe_load(Path("recipes/tiny/grpo.yaml").read_text())
alone = cli.accuracy_weight == 0
recipe.update(model_name_or_path=policy_path, output_dir=cli.output_dir, reward_kwargs=None,
              reward_funcs=[] if alone else ["accuracy"], reward_weights=None if alone else [cli.accuracy_weight],
              # Alone, GRPO's group advantages set the scale; next to accuracy, normalised so that neither swamps.
              reward_models=[{"path": rm_path, "weight": 1.0} if alone else {"path": rm_path, "weight": 0.5,
                                                                           "normalize": True}],
              beta=cli.beta,
              learning_rate=lr or recipe["learning_rate"], max_steps=steps, save_strategy="no", held_out_eval=False,
              report_to="none", chat_template_kwargs=KW)
recipe = {k: v for k, v in recipe.items() if v is not None}
recipe_file = Path(cli.output_dir + ".yaml")
recipe_file.parent.mkdir(parents=True, exist_ok=True)
recipe_file.write_text(yaml.safe_dump(recipe))
(cfg,) = parse_recipe(GRPOConfig, args=["--config", str(recipe_file)])
run(cfg)
logged = [json.loads(line) for line in (Path(cli.output_dir) / "metrics.jsonl").read_text().splitlines()]
for name in ("reward_model", "accuracy"):
    scores = [e[f"rewards/{name}/mean"] for e in logged if f"rewards/{name}/mean" in e]
    if scores:
        print(f"training {name} reward (normalised: 0 on average), mean of each 10 steps:",
              [round(sum(scores[i:i + 10]) / len(scores[i:i + 10]), 3) for i in range(0, len(scores), 10)])
evaluate(AutoModelForCausalLM.from_pretrained(cli.output_dir, dtype=torch.float32), f"after {steps} GRPO steps")
print(f"{time.time() - t0:.0f} s")
