"""Does the model stop and follow the requested reasoning mode? Greedy generations on held-out prompts.

SFT's most common silent failure is a model that never learned its stop token: the loss looks fine
and every generation runs to max_new_tokens. `generation_check` asks each held-out prompt in both
reasoning modes (`enable_thinking` true and false) and reports

  - end_of_turn_rate: generations that end with the template's end-of-turn token (within budget);
  - mode_rate: generations that follow the requested mode: in think mode a non-empty
    `<think>...</think>` block first, then an answer; in no-think mode no `<think>` at all (the
    template's generation prompt already holds the empty block);
  - answer_rate: for rows whose reference reply is known, the final answer equals it.

Greedy `transformers.generate` through core/generation.py, the helper evaluation uses too (SFT
evaluates the trainer's own model, before and after training).
"""

from __future__ import annotations

from core.generation import GenerationSettings, generate_transformers

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def final_answer(text: str) -> str:
    """The text after the last </think>, stripped: what the user sees."""
    return text.rsplit(THINK_CLOSE, 1)[-1].strip()


def follows_mode(text: str, think: bool) -> bool:
    if not think:
        return bool(text.strip()) and THINK_OPEN not in text and THINK_CLOSE not in text
    if not text.startswith(THINK_OPEN) or text.count(THINK_CLOSE) != 1:
        return False
    reasoning, _, reply = text[len(THINK_OPEN):].partition(THINK_CLOSE)
    return bool(reasoning.strip()) and bool(reply.strip())


def generation_check(model, tokenizer, end_of_turn: str, rows: list[dict], max_new_tokens: int = 48,
                     batch_size: int = 32) -> dict[str, float]:
    """Rates over `rows` (messages ending with the reference assistant reply) x both modes."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    counts = {"end_of_turn": 0, "mode": 0, "answer": 0, "total": 0}
    for think in (True, False):
        # Rendered to text, then tokenised without extra special tokens (the template writes its own),
        # exactly as evaluation builds its prompts.
        texts = [tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=think) for row in rows]
        prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        samples = generate_transformers(model, prompts, [eot_id], settings, batch_size)
        for row, (sample,) in zip(rows, samples):
            stopped = not sample.truncated
            text = tokenizer.decode(sample.token_ids, skip_special_tokens=False).strip()
            reference = row["messages"][-1]["content"]
            counts["end_of_turn"] += stopped
            counts["mode"] += stopped and follows_mode(text, think)
            # A reference reply in the other mode still has the same final answer.
            counts["answer"] += stopped and final_answer(text) == final_answer(reference)
            counts["total"] += 1
    total = max(counts.pop("total"), 1)
    return {f"{name}_rate": value / total for name, value in counts.items()}


def format_rates(before: dict[str, float], after: dict[str, float]) -> str:
    return "; ".join(f"{name} {100 * before[name]:.1f}% -> {100 * after[name]:.1f}%" for name in before)

