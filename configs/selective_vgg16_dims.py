"""Seed 004's VGG-16 pipeline at its other output dimensions (Table 4) and as a hyper-column.

    python experiments/selective_stage.py --config configs/selective_vgg16_dims.py \
        --set data.root=/path/to/revisitop/data/datasets --set model.weights=/path/to/vgg16.pth \
        --set selective.dim=4096 [--set selective.layers="('conv5_2', 'conv5_1')"]

``selective.dim`` picks (d, anchors) from Table 4: 512 → (32, 20), 1024 → (64, 18),
2048 → (64, 34), 4096 → (64, 66), 8064 → (128, 64); the first 128 components are dropped.
``selective.layers=('conv5_2', 'conv5_1')`` assembles conv5_2 and conv5_1 (max-pooled 2 × 2) with
pool5 into the paper's best hyper-column M_MAX(conv5-3, 5-2, 5-1) (K = 1536). MAX-mask only;
hashing off (the seed binarises the 512-D vectors, configs/selective_vgg16_512.py).
"""

import ml_collections
from selective_vgg16_512 import get_config as vgg16_512_config


def get_config() -> ml_collections.ConfigDict:
    c = vgg16_512_config()
    c.selective.update(dict(masks=("max",), dim=1024))
    c.selective.hashing.update(dict(bits=(), methods=()))
    return c
