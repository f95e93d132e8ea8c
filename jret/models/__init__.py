"""Flax backbones (ResNet, VGG-16) and the global-descriptor ``RetrievalNet`` (SPEC §4.1–4.2)."""

from jret.models.resnet import BasicBlock, Bottleneck, ResNet, resnet
from jret.models.retrieval import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RetrievalNet,
    build_backbone,
    feature_mask,
    init_retrieval_net,
    normalize_images,
    set_whitening,
)
from jret.models.vgg import VGG, VGG16_CFG, vgg16

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG",
    "VGG16_CFG",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "RetrievalNet",
    "build_backbone",
    "feature_mask",
    "init_retrieval_net",
    "normalize_images",
    "resnet",
    "set_whitening",
    "vgg16",
]
