"""HOW ¬R50 training on SfM-120k, the paper's recipe (an accelerator job).

python experiments/train_global.py --config configs/how_r50_sfm120k.py --workdir runs/how_r50 \
    --set data.manual_dir=/path/to/retrieval-SfM-120k --set model.weights=/path/to/resnet50.pth \
    --set val.root=/path/to/revisitop/data/datasets

Tolias, Jenicek & Chum (ECCV 2020; SPEC §4.6, §5.1): ResNet-50 from ImageNet weights cut after
conv4_x (D = 1024), BatchNorm frozen, the reduction layer to d = 128 initialised by PCA whitening
(shrinkage 1) of the smoothed descriptors of 5,000 training images and frozen; tuples of a query,
a positive and 5 hard negatives (2,000 queries and a pool of 20,000 per epoch, 5 tuples per
step) at max side 1024; the contrastive loss with margin 0.8 on the global head; Adam 1e-5 (the
paper's value; the public configuration uses 1e-6), weight decay 1e-4, the learning rate × 0.99
per epoch, 20 epochs. The paper selects the epoch by ASMK mAP on its SfM-120k validation split;
here validation ranks ROxford5k by HOW's global head over its 7 scales every 5 epochs (a
cheaper proxy). Build the ASMK★ index with experiments/retrieve_local.py and
``--set local.checkpoint=runs/how_r50/checkpoints`` (configs/how_r50_roxford.py).
"""

import ml_collections
from gem_r101_sfm120k import get_config as gem_config

from jret.local import HOW_SCALES


def get_config() -> ml_collections.ConfigDict:
    c = gem_config()
    c.model.kind = "how"
    c.model.backbone = "resnet50"
    c.model.backbone_kwargs = {"num_stages": 3}
    c.model.dim = 128
    c.model.whitening_images = 5000
    c.train.update(
        dict(
            epochs=20,
            pool_size=20000,
            image_size=1024,
            margin=0.8,
            lr=1e-5,
            weight_decay=1e-4,
            lr_decay=0.99,
            lr_epoch_offset=0,
            validate_every=5,
        )
    )
    c.val.scales = HOW_SCALES
    c.whitening.fit = False
    return c
