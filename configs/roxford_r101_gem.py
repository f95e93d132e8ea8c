"""ROxford5k with ResNet-101 GeM on the revisited protocol (the published test-time recipe).

Point it at data in the revisitop layout and a weights file, e.g.

    python experiments/retrieve.py --config configs/roxford_r101_gem.py \
        --set data.root=/path/to/revisitop/data/datasets \
        --set model.weights=/path/to/retrievalSfM120k-resnet101-gem.pth \
        --set whitening.pairs_file=/path/to/retrieval-SfM-120k-whiten.pkl \
        --set whitening.image_dir=/path/to/sfm120k/ims

Multi-scale (1, 1/√2, 1/2) at max side 1024, Lw fitted on the SfM-120k whitening pairs, αQE with
the paper's defaults (k = 50, α = 3). Use ``data.name=rparis6k`` for RParis6k.
"""

import ml_collections
from quickstart import get_config as quickstart_config


def get_config() -> ml_collections.ConfigDict:
    c = quickstart_config()
    c.data.update(dict(root="data/datasets", name="roxford5k", synthetic=False))
    c.model.update(dict(backbone="resnet101", weights="", weights_format="cirtorch"))
    c.extract.update(dict(max_side=1024, batch_size=1, pad_multiple=64, query_pad_multiple=64))
    c.whitening.update(dict(pairs="pickle", split="val", pairs_file="", image_dir=""))
    c.qe.update(dict(k=50, alpha=3.0))
    return c
