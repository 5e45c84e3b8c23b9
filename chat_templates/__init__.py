"""Chat templates you can trust: Jinja templates for ChatML, SmolLM3, Llama 3 and Qwen 3 that TRL's SFT,
GRPO and distillation trainers accept as they are, with a REPL API to render, compare, tokenize, show and
check them.

    >>> import chat_templates as ct
    >>> ct.SHIPPED_NAMES
    ('chatml', 'smollm3', 'qwen3', 'llama3')
    >>> msgs = [{"role": "system", "content": "Be brief. /no_think"},
    ...         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> print(ct.render(msgs, "smollm3"))                      # the text the model sees
    >>> print(ct.render(msgs[:2], "qwen3", add_generation_prompt=True, enable_thinking=False))
    >>> print(ct.diff("chatml", "qwen3", msgs[1:]))            # two templates, trained spans in ⟦ ⟧
    >>> ct.install(tokenizer, "smollm3")                       # -> control tokens the tokenizer lacks
    >>> tokenizer, added = ct.load_tokenizer("out/sft", "smollm3")  # what a training stage loads
    >>> ct.show(msgs, tokenizer)                               # tokens; the trained span highlighted
    >>> ct.show(msgs, tokenizer, ids=True)                     # one token per line, with its id
    >>> ids, mask = ct.assistant_mask(msgs, tokenizer)         # what SFT's assistant-only loss uses
    >>> for finding in ct.check("smollm3", tokenizer): print(finding)
    >>> ct.check(tokenizer)                                    # the template the tokenizer ships
    >>> ct.check("out/sft")                                    # a checkpoint directory

Wherever a template goes, any of these works: a shipped name, Jinja source text, a .jinja path, a
tokenizer, a tokenizer or checkpoint directory, or a ChatTemplate.

Each shipped template is one file, chat_templates/templates/<name>_training.jinja; its inference
variant is derived from it by removing the `{% generation %}` markers, so both render the same text.
Each file's header says how it renders and where it deviates from the model's original (only where
the original fails silently or breaks training: list content, tools or reasoning it cannot express,
control tokens inside content, Qwen 3's history turns).

For SFT and RL:
- `install` puts the training variant on the tokenizer by default; it renders the same text as the
  inference variant, so the saved checkpoint serves inference and TRL's `assistant_only_loss` alike.
  It also sets `tokenizer.response_template`, the reply parser TRL's GRPO and distillation trainers use
  to read tool calls. It reports missing control tokens; `add_missing_tokens=True` adds them (then
  resize embeddings), reasoning tags (<think>, </think>) as ordinary tokens so that decoding with
  skip_special_tokens=True, as TRL does before rewards, keeps them.
- Which turns are trained: every assistant turn of a conversation, in every shipped template. Each turn
  renders exactly as the model generated it (appending messages never changes earlier turns: the
  templates are prefix-preserving), so a multi-step tool conversation trains its tool-call turns too.
  The trained span of a turn is the reply and its end-of-turn token (`load(name).end_of_turn`, the
  token generation must stop on), never the role header or what the generation prompt supplies
  (SmolLM3 / Qwen 3 no-think: the empty think block). `check` reports an untrained turn after the last
  user message.
- The templates refuse what they cannot express instead of dropping it: tools and reasoning in ChatML
  and Llama 3, reasoning under enable_thinking=False in SmolLM3 and Qwen 3, unknown roles everywhere.
  enable_thinking must be a bool: the string "false" is refused, not read as true.
- `assistant_mask` returns an all-zero mask as is; refusing it is the caller's decision.
"""

from .check import Finding, check
from .template import (
    REASONING_TOKENS,
    SHIPPED_NAMES,
    ChatTemplate,
    assistant_mask,
    diff,
    encode,
    end_of_turn,
    from_source,
    from_tokenizer,
    install,
    load,
    load_tokenizer,
    missing_tokens,
    render,
    render_spans,
    resolve,
    show,
    validate_messages,
)

__all__ = [
    "REASONING_TOKENS",
    "SHIPPED_NAMES",
    "ChatTemplate",
    "Finding",
    "assistant_mask",
    "check",
    "diff",
    "encode",
    "end_of_turn",
    "from_source",
    "from_tokenizer",
    "install",
    "load",
    "load_tokenizer",
    "missing_tokens",
    "render",
    "render_spans",
    "resolve",
    "show",
    "validate_messages",
]
