"""Issue 15, item 5: <think> and </think> are ordinary added tokens (special=False), as in the SmolLM3 and
Qwen3 tokenizers. TRL decodes completions with skip_special_tokens=True before reward functions see them,
which deleted the tags when they were special, so a correct think block scored 0."""

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

import chat_templates as ct
from rewards.functions import REWARD_FUNCS
from test_chat_templates import build_tokenizer

COMPLETION = "<think>\n7 plus 5 is 12.\n</think>\n<answer>\n12\n</answer>"


def trl_completion_texts(tokenizer, completion_ids: list[list[int]]) -> list[str]:
    # What GRPOTrainer hands reward functions (trl 1.16, grpo_trainer.py, _generate_and_score_completions).
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


def pretrain_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def installed_tokenizer(tokenizer_dir):
    tokenizer = build_tokenizer(special_tokens=[])  # has none of the chat tokens: install adds them
    assert ct.install(tokenizer, "qwen3", add_missing_tokens=True) == ["<|im_start|>", "<|im_end|>", *ct.REASONING_TOKENS]
    return tokenizer


@pytest.mark.parametrize("make", [pretrain_tokenizer, installed_tokenizer])
def test_a_reward_sees_the_think_block_the_model_generated(make, tokenizer_dir, tmp_path):
    make(tokenizer_dir).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # as a checkpoint's tokenizer is loaded by the RL stage
    for tag in ct.REASONING_TOKENS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1  # still one token each
        assert tag not in tokenizer.all_special_tokens
    # The ids the model generates for a correct think block, ended by the end-of-turn token.
    generated = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    texts = trl_completion_texts(tokenizer, [generated])
    assert texts == [COMPLETION]  # the think tags survive; the control token is still dropped
    assert REWARD_FUNCS["format"](texts) == [1.0]
    assert REWARD_FUNCS["tag_count"](texts) == [1.0]


def test_check_reports_reasoning_tags_registered_as_special():
    tokenizer = build_tokenizer(special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.add_special_tokens({"extra_special_tokens": list(ct.REASONING_TOKENS)}, replace_extra_special_tokens=False)
    assert trl_completion_texts(tokenizer, [tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]]) != [COMPLETION]
    findings = [f for f in ct.check("qwen3", tokenizer) if f.code == "special-reasoning-token"]
    assert [f.message.split("]")[0] for f in findings] == ["[tokenizer <think>", "[tokenizer </think>"]
    ordinary = build_tokenizer(special_tokens=["<|im_start|>", "<|im_end|>"])
    ordinary.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in ct.REASONING_TOKENS])
    assert ct.check("qwen3", ordinary) == []
