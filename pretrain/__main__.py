"""Pretrain (or mid-train) the core.

    python -m pretrain --config recipes/tiny/pretrain.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m pretrain --config recipes/tiny/pretrain.yaml

See pretrain/config.py for every field and pretrain/train.py for the loop.
"""

from core.infra import end_process_group

from .train import main

if __name__ == "__main__":
    main()
    end_process_group()  # every rank leaves the process group together (core/infra/__init__.py says why)
