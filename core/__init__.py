"""The smolforge model core, shared by every stage.

Importing `core` registers the architecture with transformers' Auto classes, so TRL, PEFT,
accelerate and `AutoModelForCausalLM.from_pretrained(path)` load a saved core checkpoint by path,
with no remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import PRESETS, SmolForgeConfig
from .modeling import SmolForgeForCausalLM, SmolForgeModel

AutoConfig.register(SmolForgeConfig.model_type, SmolForgeConfig, exist_ok=True)
AutoModel.register(SmolForgeConfig, SmolForgeModel, exist_ok=True)
AutoModelForCausalLM.register(SmolForgeConfig, SmolForgeForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "SmolForgeConfig", "SmolForgeForCausalLM", "SmolForgeModel"]
