"""The main job: the embedded synthetic benchmark, a random-initialised ResNet-50 + GeM, on CPU.

python experiments/retrieve.py --config configs/quickstart.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(
        dict(
            root="data",
            name="synth",
            synthetic=True,
            crop_mode="python",
            synthetic_config=ml_collections.ConfigDict(),
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            backbone="resnet50",
            pooling="gem",
            p=3.0,
            weights="",
            checkpoint="",
            weights_format="torchvision",
        )
    )
    c.extract = ml_collections.ConfigDict(
        dict(
            scales=(1.0, 2**-0.5, 0.5),
            max_side=256,
            batch_size=16,
            pad_multiple=32,
            # query crops come in many sizes: pad them to one shape per scale, so that a CPU
            # compiles a handful of programs instead of one per crop size
            query_pad_multiple=256,
        )
    )
    c.whitening = ml_collections.ConfigDict(
        dict(
            kind="lw",
            variant="cirtorch",
            dims=None,
            pairs="cluster",
            split="train",
            pairs_file="",
            image_dir="",
        )
    )
    c.qe = ml_collections.ConfigDict(dict(k=10, alpha=3.0))
    c.eval = ml_collections.ConfigDict(dict(n_plot_queries=4, top_show=8))
    # further stages, each a script of its own (experiments/retrieve.py STAGES), e.g.
    # --set "stages=('diffusion', 'dsm', 'local', 'selective')"
    c.stages = ()
    return c
