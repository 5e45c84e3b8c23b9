"""The SFT stage: TRL's SFTTrainer on chat data with chat_templates' training templates, built-in
arithmetic conversations in think / no-think modes, and checks that fail before training.

    python -m sft --config recipes/tiny/sft.yaml

See sft/__main__.py for launch commands and sft/train.py for how the stage deviates from TRL.
"""
