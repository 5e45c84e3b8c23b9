"""Chat templates you can trust: Jinja templates for ChatML, SmolLM3, Llama 3 and Qwen 3, each in an
inference and a training variant, with a REPL API to render, tokenize, show and check them.

    >>> import chat_templates as ct
    >>> ct.SHIPPED_NAMES
    ('chatml', 'smollm3', 'qwen3', 'llama3')
    >>> msgs = [{"role": "system", "content": "Be brief. /no_think"},
    ...         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> print(ct.render(msgs, "smollm3"))                      # the text the model sees
    >>> print(ct.render(msgs[:2], "qwen3", add_generation_prompt=True, enable_thinking=False))
    >>> ct.install(tokenizer, "smollm3")                       # -> control tokens the tokenizer lacks
    >>> ct.show(msgs, tokenizer)                               # tokens; the trained span highlighted
    >>> ids, mask = ct.assistant_mask(msgs, tokenizer)         # what SFT's assistant-only loss uses
    >>> for finding in ct.check("smollm3", tokenizer): print(finding)
    >>> ct.check(tokenizer)                                    # the template the tokenizer ships

The templates live in chat_templates/templates/ (`<name>.jinja` and `<name>_training.jinja`);
each file's header says how it renders and where it deviates from the model's original (only where
the original fails silently: list content, tools it cannot express, control tokens inside content).

For SFT:
- `install` puts the training variant on the tokenizer by default; it renders the same text as the
  inference variant, so the saved checkpoint serves inference and TRL's `assistant_only_loss` alike.
  It reports missing control tokens; `add_missing_tokens=True` adds them (then resize embeddings).
- The trained span of a turn is the reply and its end-of-turn token (`load(name).end_of_turn`, the
  token generation must stop on), never the role header or what the generation prompt supplies
  (SmolLM3 / Qwen 3 no-think: the empty think block).
- Qwen 3 re-renders earlier assistant turns without their reasoning, so only the turns after the
  last user query are trained; split multi-turn data per turn to train every turn.
- `assistant_mask` returns an all-zero mask as is; refusing it is the caller's decision.
"""

from .check import Finding, check
from .template import (
    SHIPPED_NAMES,
    ChatTemplate,
    assistant_mask,
    encode,
    from_source,
    install,
    load,
    missing_tokens,
    render,
    render_spans,
    show,
)

__all__ = [
    "SHIPPED_NAMES",
    "ChatTemplate",
    "Finding",
    "assistant_mask",
    "check",
    "encode",
    "from_source",
    "install",
    "load",
    "missing_tokens",
    "render",
    "render_spans",
    "show",
]
