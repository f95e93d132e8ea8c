"""ROxford5k with HOW ¬R50 local features + ASMK★ (the ECCV 2020 test-time recipe), next to GeM.

Point it at data in the revisitop layout, a released HOW checkpoint and the SfM-120k training
images (for the codebook), e.g.

    python experiments/retrieve_local.py --config configs/how_r50_roxford.py \\
        --set data.root=/path/to/revisitop/data/datasets \\
        --set local.weights=/path/to/how_r50-_2000.pth \\
        --set local.train_pickle=/path/to/retrieval-SfM-120k.pkl \\
        --set local.train_image_dir=/path/to/sfm120k/ims

The backbone and the whitening come from the checkpoint; GeM runs on the same backbone. Images
at max side 1024, HOW's 7 scales, the strongest 2000 features (1000 for the *_1000 models), a
65,536-word codebook from single-scale descriptors of the first 20,000 training images, ASMK★
with query MA 5, α = 3, τ = 0 (SPEC §5.1, §6). An accelerator job. Use ``data.name=rparis6k`` for
RParis6k.
"""

import ml_collections
from local_synth import get_config as local_config


def get_config() -> ml_collections.ConfigDict:
    c = local_config()
    c.data.update(dict(root="data/datasets", name="roxford5k", synthetic=False))
    c.extract.update(dict(max_side=1024, batch_size=1, pad_multiple=64, query_pad_multiple=64))
    c.local.update(
        dict(
            scales=(2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25),
            n_features=2000,
            batch_size=1,
            window=64,  # 64 images × 7 scales × 2000 features × 132 floats ≈ 0.5 GB
            pad_multiple=64,
            query_pad_multiple=64,
            train_scale=1.0,
            whitening_images=5000,
            codebook_images=20000,
            codebook_size=65536,
        )
    )
    return c
