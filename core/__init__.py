"""The smolforge model core, shared by every stage.

Importing `core` registers the architecture with transformers' Auto classes, so TRL, PEFT,
accelerate and `AutoModelForCausalLM.from_pretrained(path)` load a saved core checkpoint by path,
with no remote code; `AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)` loads
it with a score head instead, as a reward model (issue 16).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .config import PRESETS, SmolForgeConfig
from .modeling import SmolForgeForCausalLM, SmolForgeForSequenceClassification, SmolForgeModel

AutoConfig.register(SmolForgeConfig.model_type, SmolForgeConfig, exist_ok=True)
AutoModel.register(SmolForgeConfig, SmolForgeModel, exist_ok=True)
AutoModelForCausalLM.register(SmolForgeConfig, SmolForgeForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(SmolForgeConfig, SmolForgeForSequenceClassification, exist_ok=True)

__all__ = ["PRESETS", "SmolForgeConfig", "SmolForgeForCausalLM", "SmolForgeForSequenceClassification", "SmolForgeModel"]
