"""Training of retrieval networks: losses, hard-negative mining, Optax optimisers, the train
state and steps, data parallelism over a device mesh, Orbax checkpoints and the epoch loop."""

from jret.train.checkpoint import CheckpointError, Checkpoints, load_export
from jret.train.losses import contrastive_loss, triplet_loss
from jret.train.mining import mine_hard_negatives
from jret.train.optim import make_optimizer
from jret.train.state import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "CheckpointError",
    "Checkpoints",
    "TrainState",
    "contrastive_loss",
    "create_train_state",
    "eval_step",
    "load_export",
    "make_optimizer",
    "mine_hard_negatives",
    "train_step",
    "triplet_loss",
]
