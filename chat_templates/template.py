"""Load, render, tokenize and display chat templates.

A `ChatTemplate` is a pair of Jinja sources that render the same text: `inference` (what a
tokenizer ships for generation) and `training` (the same, with `{% generation %}` markers around
what the model must learn to write in each assistant turn, for transformers'
`return_assistant_tokens_mask`). Rendering goes through transformers' own sandboxed environment
(`render_jinja_template`, an ImmutableSandboxedEnvironment), so a render here and
`tokenizer.apply_chat_template` with the template installed are the same text by construction.

    >>> import chat_templates as ct
    >>> qwen = ct.load("qwen3")                       # or a path to a .jinja file
    >>> msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> print(ct.render(msgs, qwen))
    >>> print(ct.render(msgs[:1], qwen, add_generation_prompt=True, enable_thinking=False))
    >>> missing = ct.install(tokenizer, "qwen3")      # sets tokenizer.chat_template
    >>> ids, mask = ct.assistant_mask(msgs, tokenizer)
    >>> ct.show(msgs, tokenizer)                      # tokens, trained ones highlighted
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from transformers.utils.chat_template_utils import render_jinja_template

TEMPLATE_DIR = Path(__file__).parent / "templates"

# Control tokens each shipped template writes. They must each be ONE token of the tokenizer: a
# control token split into pieces is never learned as a unit, and an end-of-turn split that way
# cannot stop generation.
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_SHIPPED = {
    "chatml": dict(end_of_turn="<|im_end|>", special_tokens=_CHATML_TOKENS),
    "smollm3": dict(end_of_turn="<|im_end|>", special_tokens=(*_CHATML_TOKENS, "<think>", "</think>")),
    "qwen3": dict(end_of_turn="<|im_end|>", special_tokens=(*_CHATML_TOKENS, "<think>", "</think>")),
    "llama3": dict(
        end_of_turn="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos_token="<|begin_of_text|>",
    ),
}
SHIPPED_NAMES = tuple(_SHIPPED)

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Where a template does not declare its tokens: <|...|> is unambiguously a control token; the
# end-of-turn token may also be <...> or </...> (</s>, <end_of_turn>), but such strings are often
# plain text (<tool_call>), so only the one found right after a reply is taken as a control token.
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]+\|>")
_TOKEN_LIKE = re.compile(r"<\|[^<>|\s]+\|>|</?[A-Za-z_][A-Za-z0-9_]*>")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template in its two variants, and the tokens it relies on."""

    name: str
    inference: str  # Jinja source for generation: what a tokenizer ships
    training: str  # the same render, with {% generation %} around each trained span
    end_of_turn: str  # the token that closes an assistant turn (the model's stop token)
    special_tokens: tuple[str, ...]  # control tokens that must be single tokens of the tokenizer
    bos_token: str | None = None  # what `bos_token` renders as when no tokenizer supplies it

    @property
    def has_generation_markers(self) -> bool:
        return bool(GENERATION_TAG.search(self.training))


def load(name_or_path: str | os.PathLike, end_of_turn: str | None = None) -> ChatTemplate:
    """A shipped template by name (`chatml`, `smollm3`, `llama3`, `qwen3`) or a `.jinja` file.

    For a file `x.jinja`, `x_training.jinja` next to it is the training variant; without one, the
    file serves as both (it may carry its own generation markers). The end-of-turn token of a file
    is the first token-like string after the assistant content of a one-turn render, unless given.
    """
    name = str(name_or_path)
    if name in _SHIPPED:
        return ChatTemplate(
            name=name,
            inference=(TEMPLATE_DIR / f"{name}.jinja").read_text(),
            training=(TEMPLATE_DIR / f"{name}_training.jinja").read_text(),
            **_SHIPPED[name],
        )
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"chat template {name!r} is neither a shipped template ({', '.join(SHIPPED_NAMES)}) nor a file"
        )
    training_path = path.with_name(f"{path.stem}_training{path.suffix}")
    return from_source(
        path.read_text(),
        training=training_path.read_text() if training_path.is_file() else None,
        name=str(path),
        end_of_turn=end_of_turn,
    )


def from_source(
    source: str,
    training: str | None = None,
    name: str = "<source>",
    end_of_turn: str | None = None,
    bos_token: str | None = None,
) -> ChatTemplate:
    """A ChatTemplate from Jinja text (a tokenizer's `chat_template`, a file's content).

    A source identical to a shipped variant is that shipped template. Otherwise the control tokens
    are the <|...|> strings the template writes plus the end-of-turn token, which, if not given, is
    the first token-like string right after the assistant content of a one-turn render.
    """
    for shipped in map(load, SHIPPED_NAMES):
        if source in (shipped.inference, shipped.training):
            return shipped
    training = source if training is None else training
    if end_of_turn is None:
        end_of_turn = _infer_end_of_turn(source, name, bos_token)
    special = tuple(dict.fromkeys([*_CONTROL_TOKEN.findall(source), end_of_turn]))
    return ChatTemplate(name, source, training, end_of_turn, special, bos_token)


def _infer_end_of_turn(source: str, name: str, bos_token: str | None) -> str:
    marker = "Assistant reply used to locate the end-of-turn token."
    text = render_jinja_template(
        [[{"role": "user", "content": "Hello."}, {"role": "assistant", "content": marker}]],
        chat_template=source,
        **({"bos_token": bos_token} if bos_token else {}),
    )[0][0]
    after = text[text.index(marker) + len(marker) :].lstrip()
    match = _TOKEN_LIKE.match(after)
    if not match:
        raise ValueError(
            f"chat template {name}: no control token follows the assistant content "
            f"(it is followed by {after[:40]!r}); pass end_of_turn= explicitly"
        )
    return match.group(0)


def resolve(template: ChatTemplate | str | os.PathLike) -> ChatTemplate:
    """`template` itself, or `load(template)` for a name or path."""
    return template if isinstance(template, ChatTemplate) else load(template)


def _template_kwargs(template: ChatTemplate, enable_thinking: bool | None, extra: dict) -> dict:
    kwargs = {"bos_token": template.bos_token} if template.bos_token else {}
    if enable_thinking is not None:  # unset means the template's own default, as in transformers
        kwargs["enable_thinking"] = enable_thinking
    return {**kwargs, **extra}


def render_spans(
    messages: list[dict],
    template: ChatTemplate | str | os.PathLike,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> tuple[str, list[tuple[int, int]]]:
    """The training variant's render and its trained spans as (start, end) character offsets."""
    text, spans = _render(messages, template, "training", add_generation_prompt, enable_thinking, tools,
                          template_kwargs)
    return text, [tuple(span) for span in spans]


def render(
    messages: list[dict],
    template: ChatTemplate | str | os.PathLike,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> str:
    """The inference variant's render of `messages` (extra keyword arguments reach the template:
    `date_string`, `bos_token`, ...)."""
    return _render(messages, template, "inference", add_generation_prompt, enable_thinking, tools, template_kwargs)[0]


def _render(messages, template, variant: str, add_generation_prompt, enable_thinking, tools, template_kwargs):
    """(text, trained spans) of one variant; spans are only computed for the training variant."""
    template = resolve(template)
    if not messages:
        raise ValueError("cannot render an empty conversation: give at least one message")
    texts, spans = render_jinja_template(
        [messages],
        tools=tools,
        chat_template=getattr(template, variant),
        return_assistant_tokens_mask=variant == "training",
        add_generation_prompt=add_generation_prompt,
        **_template_kwargs(template, enable_thinking, template_kwargs),
    )
    return texts[0], spans[0] if spans else []


def encode(
    messages: list[dict],
    tokenizer,
    template: ChatTemplate | str | os.PathLike,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> list[int]:
    """Token ids of `render(...)`, with the tokenizer's special tokens as template variables and no
    special tokens added on encoding: exactly what `tokenizer.apply_chat_template` does."""
    text = render(
        messages,
        template,
        add_generation_prompt,
        enable_thinking,
        tools,
        **{**tokenizer.special_tokens_map, **template_kwargs},
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_mask(
    messages: list[dict],
    tokenizer,
    template: ChatTemplate | str | os.PathLike | None = None,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) with mask[i] == 1 for tokens the model is trained on, through transformers'
    `return_assistant_tokens_mask` and the template's training variant (the tokenizer's own
    chat_template when `template` is None). An all-zero mask is returned as is: deciding that it is
    an error is the caller's job (SFT refuses such a batch)."""
    chat_template = resolve(template).training if template is not None else tokenizer.chat_template
    if chat_template is None or not GENERATION_TAG.search(chat_template):
        source = "the tokenizer's chat_template" if template is None else f"template {resolve(template).name}"
        raise ValueError(
            f"{source} has no {{% generation %}} markers, so no assistant mask can be computed; "
            f"install a training variant (chat_templates.install(tokenizer, name))"
        )
    kwargs = {"enable_thinking": enable_thinking} if enable_thinking is not None else {}
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tools=tools,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **kwargs,
        **template_kwargs,
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def missing_tokens(tokenizer, template: ChatTemplate | str | os.PathLike) -> list[str]:
    """The template's control tokens that are not single tokens of `tokenizer`."""
    template = resolve(template)
    return [
        token
        for token in template.special_tokens
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1
    ]


def install(
    tokenizer,
    template: ChatTemplate | str | os.PathLike,
    variant: str = "training",
    add_missing_tokens: bool = False,
) -> list[str]:
    """Set `tokenizer.chat_template` and report the control tokens the tokenizer lacks.

    Returns the template's control tokens that are not single tokens of the tokenizer. By default
    they are only reported: adding tokens grows the vocabulary, and the model's embeddings must then
    be resized (`model.resize_token_embeddings(len(tokenizer))`), so it is the caller's explicit
    choice. With `add_missing_tokens=True` they are added as special tokens (and, for a template
    that writes `bos_token`, the tokenizer's bos_token is set to it) and the list says what was added.

    The training variant is installed by default: it renders exactly the same text as the inference
    variant, and a checkpoint saved with it supports `assistant_only_loss` in TRL without a swap.
    """
    template = resolve(template)
    if variant not in ("training", "inference"):
        raise ValueError(f"variant must be 'training' or 'inference', got {variant!r}")
    missing = missing_tokens(tokenizer, template)
    bos_mismatch = template.bos_token is not None and tokenizer.bos_token != template.bos_token
    if add_missing_tokens:
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        if bos_mismatch:
            tokenizer.bos_token = template.bos_token
    elif bos_mismatch:
        raise ValueError(
            f"template {template.name} writes bos_token {template.bos_token!r} but the tokenizer's bos_token is "
            f"{tokenizer.bos_token!r}; pass add_missing_tokens=True or set tokenizer.bos_token"
        )
    tokenizer.chat_template = template.training if variant == "training" else template.inference
    return missing


# Two shades per kind, alternating per token so token boundaries stay visible.
_TRAINED_STYLES = ("\x1b[30;42m", "\x1b[30;102m")  # black on green / bright green
_PROMPT_STYLES = ("\x1b[2m", "\x1b[2;4m")  # dim / dim underlined
_RESET = "\x1b[0m"
# Plain-text markers around trained runs where colours are not available (a file, a log, NO_COLOR).
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def format_tokens(tokens: list[str], mask: list[int], color: bool) -> str:
    """Tokens as text with the trained ones highlighted (colour) or bracketed in ⟦ ⟧ (plain)."""
    pieces = []
    in_trained = False
    for i, (token, trained) in enumerate(zip(tokens, mask)):
        token = token.replace("\n", "↵\n")  # newlines visible, line structure kept
        if color:
            styles = _TRAINED_STYLES if trained else _PROMPT_STYLES
            pieces.append(f"{styles[i % 2]}{token}{_RESET}")
            continue
        if trained and not in_trained:
            pieces.append(TRAINED_OPEN)
        if not trained and in_trained:
            pieces.append(TRAINED_CLOSE)
        in_trained = bool(trained)
        pieces.append(token)
    if in_trained and not color:
        pieces.append(TRAINED_CLOSE)
    n_trained = sum(mask)
    summary = f"{len(tokens)} tokens, {n_trained} trained ({100 * n_trained / max(len(tokens), 1):.0f}%)"
    legend = "trained: green" if color else f"trained: {TRAINED_OPEN}...{TRAINED_CLOSE}"
    return "".join(pieces) + f"\n-- {summary}; {legend}"


def show(
    messages: list[dict],
    tokenizer,
    template: ChatTemplate | str | os.PathLike | None = None,
    file: TextIO | None = None,
    color: bool | None = None,
    **render_kwargs,
) -> None:
    """Print the tokens of `messages` with the trained span highlighted.

    Colours when writing to a terminal (and NO_COLOR is unset), ⟦ ⟧ around trained tokens otherwise;
    `color=` forces either. `render_kwargs` go to `assistant_mask` (enable_thinking, tools, ...).
    """
    file = sys.stdout if file is None else file
    if color is None:
        color = file.isatty() and "NO_COLOR" not in os.environ
    ids, mask = assistant_mask(messages, tokenizer, template, **render_kwargs)
    tokens = [tokenizer.decode([token_id]) for token_id in ids]
    print(format_tokens(tokens, mask, color), file=file)
