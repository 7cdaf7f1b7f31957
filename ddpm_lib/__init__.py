"""ddpm_lib: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020), explained and reproduced.

Time indices are 0-based throughout, as in the paper's official code: index i is the paper's
t = i + 1 (so index 0 is the decoder step t = 1, and index T − 1 is t = T).
"""

from .base import __version__ as __version__
from .configs import Config, DiffusionConfig, ModelConfig, TrainConfig, get_config
from .diffusion import GaussianDiffusion
from .generation import generate, sample_images
from .guidance import Guided
from .loading import load_book_model, load_for_sampling
from .pretrained import from_diffusers, load_pretrained
from .samplers import ddim_sample_loop, sample_loop
from .schedules import make_beta_schedule
from .train import train
from .unet import UNet

__all__ = [
    "Config",
    "DiffusionConfig",
    "GaussianDiffusion",
    "Guided",
    "ModelConfig",
    "TrainConfig",
    "UNet",
    "ddim_sample_loop",
    "from_diffusers",
    "generate",
    "get_config",
    "load_book_model",
    "load_pretrained",
    "load_for_sampling",
    "make_beta_schedule",
    "sample_images",
    "sample_loop",
    "train",
]
