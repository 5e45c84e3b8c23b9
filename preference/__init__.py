"""The preference stage (issue 14): DPO and its loss family (APO-zero/down, IPO, hinge, ..., weighted
mixes), KTO and ORPO on TRL's trainers; on-policy pair building; checkpoint merging.

    python -m preference --config recipes/tiny/dpo.yaml                   # train (method: dpo | kto | orpo)
    python -m preference.build_pairs --model_name_or_path out/tiny/sft --suite arithmetic --output_dir out/tiny/pairs
    python -m preference.merge --config recipes/tiny/merge.yaml           # linear soup / merge of checkpoints

See preference/__main__.py for launch commands, preference/config.py for the one config and how the
method is chosen, preference/data.py for the row formats and checks, preference/train.py for how the
stage deviates from TRL.
"""
