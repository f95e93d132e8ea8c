"""HOW + ASMK★ next to GeM on the embedded synthetic benchmark, random-initialised ResNet-50, CPU.

python experiments/retrieve_local.py --config configs/local_synth.py

The main job's settings (configs/quickstart.py: data, backbone, GeM extraction, Lw) plus the
``local`` section with the defaults of ``experiments/retrieve_local.py`` (default_config).
"""

import sys
from pathlib import Path

import ml_collections
from quickstart import get_config as quickstart_config

_EXPERIMENTS = str(Path(__file__).resolve().parents[1] / "experiments")
sys.path.insert(0, _EXPERIMENTS)
try:
    from retrieve_local import default_config
finally:
    sys.path.remove(_EXPERIMENTS)


def get_config() -> ml_collections.ConfigDict:
    c = quickstart_config()
    c.local = default_config()
    return c
