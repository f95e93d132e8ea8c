"""Siamese fine-tuning on the embedded synthetic benchmark from random initialisation (CPU, minutes).

python experiments/train_global.py --config configs/train_synthetic.py --workdir runs/train_synthetic

A ResNet-18 at half width (32 channels in its first stage) + GeM trained with the contrastive
loss on tuples (query, positive, 5 hard negatives) of the benchmark's training split at 128 px;
validation mAP on the benchmark's test set (128 px) every epoch; the best network is exported
with Lw fitted on the training pairs. Training from random initialisation differs from the
paper's fine-tuning recipe in two settings: BatchNorm is trained (batch statistics; frozen
statistics of a random network leave the activations badly scaled and validation mAP wanders
around its initial value) and Adam runs at 1e-3 instead of 1e-6. About 5 minutes on 2 CPU cores
(experiments/results/train_synthetic.md).
"""

import math

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.distributed = False
    c.data = ml_collections.ConfigDict(
        dict(
            name="synthetic",
            root="data",
            synthetic_name="synth",
            synthetic_seed=0,
            synthetic_config=ml_collections.ConfigDict(),
            tfds_dir="data/tfds",
            manual_dir="",
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            kind="global",
            backbone="resnet18",
            backbone_kwargs={"width": 32},
            pooling="gem",
            p=3.0,
            frozen_bn=False,
            weights="",
            weights_format="torchvision",
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            epochs=12,
            query_size=2000,
            pool_size=20000,
            num_negatives=5,
            batch_tuples=5,
            accum_steps=1,
            image_size=128,
            eval_batch_size=16,
            loss="contrastive",
            margin=0.7,
            optimizer="adam",
            lr=1e-3,
            weight_decay=1e-6,
            lr_decay=math.exp(-0.1),
            lr_epoch_offset=0,
            gem_lr_mult=10.0,
            frozen=(),
            augment={},
            save_every_steps=0,
            keep_checkpoints=2,
            validate_every=1,
            data_parallel=False,
            num_devices=0,
        )
    )
    c.val = ml_collections.ConfigDict(
        dict(root="data", name="synth", scales=(1.0,), max_side=128, batch_size=16, pad_multiple=64)
    )
    c.whitening = ml_collections.ConfigDict(
        dict(
            fit=True, scales=(1.0, 2**-0.5, 0.5), max_side=256, pad_multiple=64, variant="cirtorch"
        )
    )
    return c
