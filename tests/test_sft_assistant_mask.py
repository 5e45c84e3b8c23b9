"""The SFT defaults train on assistant turns only: a fast check of `SFTConfig`'s defaults through one
batch of the trainer (issue 11: turning `assistant_only_loss` off was caught only by the slow
end-to-end learning test in tests/test_sft_stage.py)."""

import torch
from datasets import Dataset
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM
from sft.config import SFTConfig
from sft.train import BASE_TEMPLATE, SFTTrainer

CONVERSATIONS = [
    # /think: the whole think block and the answer are the assistant's (the template's generation span).
    {"messages": [{"role": "user", "content": "What is 2+3?"},
                  {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n5"},
                  {"role": "user", "content": "And 4+4?"},
                  {"role": "assistant", "content": "<think>\nFour and four.\n</think>\n8"}],
     "chat_template_kwargs": {"enable_thinking": True}},
    # /no_think: the empty think block belongs to the assistant header, so it is not trained.
    {"messages": [{"role": "user", "content": "What is 7+1?"}, {"role": "assistant", "content": "8"}],
     "chat_template_kwargs": {"enable_thinking": False}},
]


def test_default_config_trains_only_inside_generation_spans(tmp_path, tokenizer_dir):
    cfg = SFTConfig(output_dir=str(tmp_path / "run"))  # every other field at its default
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # chat_template null: what SFT installs on a base checkpoint without one (sft/train.py BASE_TEMPLATE)
    assert cfg.chat_template is None
    assert chat_templates.install(tokenizer, BASE_TEMPLATE) == []  # the training variant, with its spans
    torch.manual_seed(0)
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(CONVERSATIONS))
    batch = next(iter(trainer.get_train_dataloader()))

    # Where the spans are, from transformers' rendering of {% generation %} (per conversation).
    spans = {}
    for row in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True, **row["chat_template_kwargs"])
        spans[tuple(rendered["input_ids"])] = torch.tensor(rendered["assistant_masks"], dtype=torch.bool)

    # Each packed document (position_ids restart at 0) is one conversation; bfd may reorder them.
    seen = 0
    for input_ids, labels, position_ids in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = [*(position_ids == 0).nonzero().flatten().tolist(), len(position_ids)]
        for start, end in zip(starts[:-1], starts[1:]):
            ids, doc_labels = input_ids[start:end], labels[start:end]
            if tokenizer.pad_token_id is not None and (ids == tokenizer.pad_token_id).all():
                continue  # padding after the last document
            in_span = spans[tuple(ids.tolist())]
            assert in_span.any() and not in_span.all()  # the check below is not vacuous
            outside = doc_labels[~in_span]
            assert (outside == -100).all(), \
                f"labels outside the assistant spans: {tokenizer.decode(ids[~in_span][outside != -100])!r}"
            assert torch.equal(doc_labels[in_span], ids[in_span])  # every assistant token is trained
            seen += 1
    assert seen == len(CONVERSATIONS)
    trained = tokenizer.decode(batch["input_ids"][batch["labels"] != -100])
    assert "What is" not in trained and "<think>\nTwo plus three." in trained and "<|im_end|>" in trained
