"""llmcomm: communication of distributed LLM inference — derived (sympy), measured (DeepSpeed), predicted."""
from .spec import SpecError, ModelSpec, Layout, Workload, load_model, preset_names, stage_layers

__version__ = "0.1.0"
__all__ = ["SpecError", "ModelSpec", "Layout", "Workload", "load_model", "preset_names", "stage_layers"]
