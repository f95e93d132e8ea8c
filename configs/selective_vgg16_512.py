"""Seed 004's final pipeline on ROxford5k: VGG-16 pool5, M* + Temb + democratic at 512-D, hashed.

    python experiments/selective_stage.py --config configs/selective_vgg16_512.py \
        --set data.root=/path/to/revisitop/data/datasets \
        --set model.weights=/path/to/vgg16.pth

Images at max side 1024 (the main job's ``extract.max_side``), one scale, VGG-16 up to pool5
(K = 512, torchvision weights), d = 32 and 20 anchors (Table 4: D = 32·20 − 128 = 512). The
learning set is the other revisited city (RParis6k for ROxford5k, as the paper learns on Paris6k
for Oxford5k; ``data.name=rparis6k`` with ``selective.learning.name=roxford5k`` gives the Paris
side). MAX-, SUM- and SIFT-masks; the MAX-mask vectors are hashed to 64–512 bits by ITQ, RBA and
KMH (Table 7). Other output dimensions: configs/selective_vgg16_dims.py.
"""

import ml_collections
from roxford_r101_gem import get_config as roxford_config
from selective_synth import stage_module


def get_config() -> ml_collections.ConfigDict:
    c = roxford_config()
    c.model.update(dict(backbone="vgg16", pooling="mac", weights="", weights_format="torchvision"))
    c.model.backbone_kwargs = ml_collections.ConfigDict(dict(pool5=True))
    c.selective = stage_module().default_config()
    c.selective.update(dict(scale=1.0, masks=("max", "sum", "sift")))
    c.selective.hashing.source = "max"
    c.selective.learning.update(dict(source="revisited", name="rparis6k", max_images=0))
    c.selective.hashing.update(dict(bits=(64, 128, 256, 512), methods=("itq", "rba", "kmh")))
    return c
