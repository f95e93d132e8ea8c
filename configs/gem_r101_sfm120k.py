"""The GeM paper's ResNet-101 recipe on SfM-120k (Radenović et al., TPAMI 2018): run on an accelerator.

python experiments/train_global.py --config configs/gem_r101_sfm120k.py --workdir runs/gem_r101 \
    --set data.manual_dir=/path/to/retrieval-SfM-120k \
    --set model.weights=/path/to/resnet101-torchvision.pth \
    --set val.root=/path/to/revisitop/data/datasets

Contrastive loss with margin 0.85, Adam lr 5e-7 (weight decay 1e-6, coupled), lr × exp(−0.01)
per epoch, tuples of 1 query + 1 positive + 5 hard negatives, 2000 queries and a pool of 22000
images re-mined every epoch, 5 tuples per step, training images at max side 362, GeM p learned
at 10 × lr. Validation on ROxford5k (single scale, 1024 px); Lw fitted on the SfM-120k training
pairs with the best network at the scales used for indexing.
"""

import math

import ml_collections
from train_synthetic import get_config as synthetic_config


def get_config() -> ml_collections.ConfigDict:
    c = synthetic_config()
    c.data.name = "sfm120k"
    c.data.manual_dir = ""
    c.model.backbone = "resnet101"
    c.model.backbone_kwargs = {}  # full width; BatchNorm frozen, as when fine-tuning ImageNet weights
    c.model.frozen_bn = True
    c.train.update(
        dict(
            epochs=100,
            query_size=2000,
            pool_size=22000,
            num_negatives=5,
            image_size=362,
            eval_batch_size=32,
            margin=0.85,
            lr=5e-7,
            weight_decay=1e-6,
            lr_decay=math.exp(-0.01),
            lr_epoch_offset=1,
            save_every_steps=100,
            validate_every=5,
        )
    )
    # 5 tuples per step, one tuple per micro-batch as the reference (one backward per tuple);
    # with data_parallel on N devices use batch_tuples = N and accum_steps = 5 / N rounded up
    c.train.update(dict(batch_tuples=1, accum_steps=5))
    c.val.update(dict(root="data/datasets", name="roxford5k", max_side=1024, pad_multiple=32))
    c.whitening.update(dict(max_side=1024, pad_multiple=32))
    return c
