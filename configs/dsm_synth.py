"""DSM on the embedded synthetic benchmark: random-initialised ResNet-50, CPU.

python experiments/dsm_stage.py --config configs/dsm_synth.py

The global stages are the main job's (configs/quickstart.py: multi-scale GeM, Lw, αQE); DSM
re-ranks the top 100 of the GeM + Lw + αQE ranking and seeds diffusion from the verified images,
with the defaults of ``experiments/dsm_stage.py:default_config``.
"""

import sys
from pathlib import Path

import ml_collections
from quickstart import get_config as base_config

_EXPERIMENTS = str(Path(__file__).resolve().parents[1] / "experiments")
if _EXPERIMENTS not in sys.path:
    sys.path.append(_EXPERIMENTS)

from dsm_stage import default_config  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.dsm = default_config()
    return c
