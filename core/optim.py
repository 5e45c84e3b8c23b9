"""The AdamW parameter groups of the core, shared by pretraining and the throughput benches (so a bench
runs the optimizer the loop runs, without importing the pretraining stage)."""

from torch import nn

from .kernels import RMSNorm
from .ssm import SmolForgeGatedDeltaNet


def parameter_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """AdamW groups: no decay on embeddings, norm gains and biases (configurable), decay elsewhere.

    Decaying an embedding pulls rare tokens toward zero, and decaying a norm gain fights the scale
    it exists to learn (the usual GPT/Llama practice; nanoGPT decays only >=2-D weights). The decay rates
    of the hybrid's delta-net layers (A_log, dt_bias: core/ssm.py) are never decayed, as in Mamba."""
    unknown = set(no_decay) - {"embeddings", "norms", "biases"}
    if unknown:
        raise ValueError(f"no_decay has unknown kinds {sorted(unknown)}; use embeddings, norms, biases")
    exempt: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if (("embeddings" in no_decay and isinstance(module, nn.Embedding))
                    or ("norms" in no_decay and isinstance(module, RMSNorm))
                    or ("biases" in no_decay and pname == "bias")
                    or (isinstance(module, SmolForgeGatedDeltaNet) and pname in module.no_weight_decay)):
                exempt.add(id(p))
    params = list(model.parameters())  # tied weights appear once
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
