"""attnreg: Attention Regulation (Zhang et al., ECCV 2024) for diffusers text-to-image pipelines."""

from .config import ConfigError, RegulationConfig, PRESETS
from .recording import AttentionRecorder
from .regulator import AttentionRegulator, GuidanceError, LayerError, UnsupportedPipelineError
from .joint import JointAttentionRegulator  # registers the SD3 / FLUX regulator with AttentionRegulator
from .calibrate import calibrated_layers
from .tokens import TargetError
from .version import __version__

AttentionRegulator.first_use_calibration = staticmethod(calibrated_layers)  # see AttentionRegulator

__all__ = [
    "__version__",
    "AttentionRegulator",
    "AttentionRecorder",
    "JointAttentionRegulator",
    "RegulationConfig",
    "PRESETS",
    "ConfigError",
    "GuidanceError",
    "LayerError",
    "TargetError",
    "UnsupportedPipelineError",
]
