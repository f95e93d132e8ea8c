"""HOW trained from random initialisation on the embedded synthetic benchmark (CPU, minutes).

python experiments/train_global.py --config configs/how_synthetic.py --workdir runs/how_synthetic

Tolias, Jenicek & Chum, "Learning and aggregating deep local descriptors for instance-level
recognition" (ECCV 2020; SPEC §5.1) in the loop of configs/train_synthetic.py: a half-width
ResNet-18 cut after conv4_x (HOW's ¬R18 trunk, D = 128 here), the reduction layer to d = 64
initialised by PCA whitening (shrinkage 1) of the smoothed descriptors of 64 training images and
frozen, the contrastive loss with HOW's margin 0.8 on the global head (attention-weighted sum
of the reduced descriptors, ℓ2), validation by that head (single scale, 128 px). As for the global
network trained from scratch, BatchNorm is trained and Adam runs at 1e-3. Use the result for
ASMK★ with

python experiments/retrieve_local.py --config configs/local_synth.py \
    --set local.checkpoint=runs/how_synthetic/checkpoints
"""

import ml_collections
from train_synthetic import get_config as synthetic_config


def get_config() -> ml_collections.ConfigDict:
    c = synthetic_config()
    c.model.kind = "how"
    c.model.backbone_kwargs = {"width": 32, "num_stages": 3}
    c.model.dim = 64
    c.model.whitening_images = 64
    c.train.margin = 0.8
    c.whitening.fit = False  # HOW's whitening is its frozen reduction layer, not Lw
    return c
