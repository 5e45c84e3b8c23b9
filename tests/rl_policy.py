"""A tiny chat policy for the RL tests, built in seconds: the arithmetic facts taught briefly, so a
GRPO group gets mixed rewards (a random model scores 0 everywhere and learns nothing).

Not the real pipeline's SFT checkpoint (tokenizer -> pretrain -> midtrain -> sft, minutes): the
tokenizer is the test session's 512-token BPE with the ChatML template installed (no system-prompt
boilerplate: prompts of about 15 tokens keep every step cheap), and the model
is the `tiny` preset (or `preset`) trained with plain cross-entropy on the no-think replies to every fact.
"""

import random

import torch
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM
from core.arithmetic import FACTS, answer, question


def build_policy(tokenizer_dir, out_dir, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3,
                 preset: str = "tiny"):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = chat_templates.load("chatml")
    chat_templates.install(tokenizer, template, variant="training", add_missing_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    eot = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    examples = []
    for fact in FACTS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question(fact)}], tokenize=True,
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
        reply = tokenizer(str(answer(fact)), add_special_tokens=False)["input_ids"] + [eot]
        examples.append((prompt, reply))
    # One thread: a tiny model's steps are too small to share between threads, and on a busy machine
    # two threads were 10x slower than one (measured: 4.8 s vs 0.47 s per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset(preset, vocab_size=len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, batch_size)
        length = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)
        for row, (prompt, reply) in enumerate(batch):
            ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
            labels[row, len(prompt): len(prompt) + len(reply)] = torch.tensor(reply)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.eval()
    model.generation_config.eos_token_id = [eot, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, loss.item()
