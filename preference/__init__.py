"""The preference stage (issue 14): DPO and its loss family (APO-zero/down, IPO, hinge, ..., weighted
mixes), KTO and ORPO on TRL's trainers; on-policy pair building; checkpoint merging.

    python -m preference --config recipes/tiny/dpo.yaml                   # train (method: dpo | kto | orpo)
    python -m preference.build_pairs --model_name_or_path out/tiny/sft --suite arithmetic --output_dir out/tiny/pairs
    python -m preference.merge --config recipes/tiny/merge.yaml           # linear soup / merge of checkpoints

The SmolLM3 sequence on the tiny pipeline (after `make demo` has written out/tiny/sft): on-policy
pairs, APO-zero against the SFT reference, a half-and-half merge with the SFT parent, and the
held-out arithmetic suite for all three, greedy:

    python -m preference.build_pairs --config recipes/tiny/build_pairs.yaml
    python -m preference --config recipes/tiny/dpo.yaml
    python -m preference.merge --config recipes/tiny/merge.yaml
    python -m rewards.evaluate --model_name_or_path out/tiny/sft out/tiny/dpo out/tiny/merged --suite arithmetic \
        --split test --temperature 0 --num_samples 1 --max_new_tokens 64 --output_dir out/tiny/eval-preference

See preference/__main__.py for launch commands, preference/config.py for the one config and how the
method is chosen, preference/data.py for the row formats and checks, preference/train.py for how the
stage deviates from TRL.
"""
