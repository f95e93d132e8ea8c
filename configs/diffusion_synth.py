"""Diffusion stages on the embedded synthetic benchmark: random-initialised ResNet-50, CPU.

python experiments/diffusion_stages.py --config configs/diffusion_synth.py

The global stage is the main job's (configs/quickstart.py: multi-scale GeM, Lw, αQE with k = 10,
α = 3); diffusion, FSR and hybrid run on the same GeM + Lw descriptors with the defaults of the
stage (``default_config()`` of experiments/diffusion_stages.py). ``tune`` is the grid of graph k,
kq and γ evaluated first on the training split (the defaults' k comes from it). The results are
published to experiments/results/diffusion_synth.{json,md}.
"""

import importlib.util
from pathlib import Path

import ml_collections
from quickstart import get_config as base_config

STAGE = Path(__file__).resolve().parents[1] / "experiments" / "diffusion_stages.py"


def stage_defaults() -> ml_collections.ConfigDict:
    """``default_config()`` of the experiment script (the one place the defaults live)."""
    spec = importlib.util.spec_from_file_location("diffusion_stages", STAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.default_config()


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.diffusion = stage_defaults()
    c.tune = ml_collections.ConfigDict(
        dict(k=(3, 5, 7, 10, 20, 50), kq=(1, 3, 5, 10), gamma=(1.0, 3.0))
    )
    c.publish = "experiments/results/diffusion_synth"
    return c
