"""Selective conv features (seed 004) on the embedded synthetic benchmark, random-initialised ResNet-50.

python experiments/selective_stage.py --config configs/selective_synth.py

The main job's data and network (configs/quickstart.py) with the ``selective`` section of
experiments/selective_stage.py: single-scale maps at the main job's second scale (181 px, 2048
channels); the learning set is the whole training split (640 images: the hash functions learn from
their vectors, and ITQ's rotation needs well more of them than the 256 bits of the longest code;
the main job's default takes 320 to save time); MAX-, SUM- and SIFT-masks (and no mask) + Temb
(d 32, 20 anchors) + democratic aggregation → 512-D, against SPoC and MAC of the same maps; the
SUM-mask vectors hashed to 32–256 bits by ITQ, PCA + random rotation, a random rotation, KMH and
RBA; 3 keys.
"""

import importlib.util
from pathlib import Path

import ml_collections
from quickstart import get_config as quickstart_config


def stage_module():
    """experiments/selective_stage.py, imported from its path (it is not a package)."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "selective_stage.py"
    spec = importlib.util.spec_from_file_location("selective_stage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    c = quickstart_config()
    c.selective = stage_module().default_config()
    c.selective.learning.max_images = 0
    c.selective.masks = ("max", "sum", "sift", "none")
    c.selective.hashing.methods = ("itq", "pca_rr", "rr", "kmh", "rba")
    c.selective.seeds = 3
    return c
