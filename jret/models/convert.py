"""Import torchvision and cirtorch weights into jret's Flax models (SPEC §4.2).

Name mapping (see :mod:`jret.models.resnet` and :mod:`jret.models.vgg`):

* ResNet: the Flax path is the torchvision module path split on ``'.'``
  (``layer1.0.conv1.weight`` ↦ ``params/layer1/0/conv1/kernel``).
* VGG-16: ``features.<i>`` ↦ ``conv<b>_<l>`` via :func:`jret.models.vgg.torch_indices`.
* Leaves: conv ``weight`` (OIHW) ↦ ``kernel`` (HWIO, ``transpose(2, 3, 1, 0)``); BatchNorm
  ``weight`` ↦ ``scale``, ``bias`` ↦ ``bias``, ``running_mean`` / ``running_var`` ↦
  ``batch_stats`` ``mean`` / ``var``; Linear ``weight`` (out, in) ↦ ``kernel`` (in, out).
* Ignored: the classifier (``fc.*``, ``classifier.*``) and ``num_batches_tracked``.

cirtorch checkpoints (``{'state_dict': …, 'meta': …}``) hold ``features.<i>.…`` (the torchvision
children up to ``layer4``, or VGG's ``features`` without the last max-pool), ``pool.p`` and
optionally ``whiten.weight`` / ``whiten.bias``; :func:`cirtorch_to_flax` maps them onto
:class:`jret.models.RetrievalNet` and :func:`retrieval_net_from_meta` builds the matching module.

Files: ``.pth`` / ``.pt`` need PyTorch (the ``torch`` extra); ``.npz`` needs only numpy, so a
checkpoint converted once with :func:`save_npz` can be shipped to machines without torch.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jret.models.resnet import ResNet
from jret.models.retrieval import BACKBONES, RetrievalNet, build_backbone
from jret.models.vgg import VGG, torch_indices

META_KEY = "__meta__"
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
CIRTORCH_POOLINGS = {
    "gem": ("gem", False),
    "gemmp": ("gem", True),
    "mac": ("mac", False),
    "spoc": ("spoc", False),
}
_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_IGNORED_PREFIXES = ("fc.", "classifier.")
_READ_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    OSError,
    zipfile.BadZipFile,
    KeyError,
)


def _backbone(arch: str | nn.Module) -> ResNet | VGG:
    module = build_backbone(arch) if arch in BACKBONES else arch
    if not isinstance(module, ResNet | VGG):
        raise ValueError(
            f"arch: expected a name in {list(BACKBONES)} or a ResNet/VGG, got {arch!r}"
        )
    return module


def _torch_name(backbone: ResNet | VGG, path: tuple[str, ...]) -> str:
    """torchvision state-dict name of the Flax leaf at ``path`` (without the collection)."""
    *modules, leaf = path
    if isinstance(backbone, VGG):
        prefix = f"features.{torch_indices(backbone.cfg)[modules[0]]}"
    else:
        prefix = ".".join(modules)
    return f"{prefix}.{_LEAF_TO_TORCH[leaf]}"


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Torch layout of a Flax shape: HWIO → OIHW, (in, out) → (out, in)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


def _from_torch(value: np.ndarray) -> np.ndarray:
    """Flax layout of a torch array: OIHW → HWIO, Linear (out, in) → (in, out)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def _format(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _raise_if(missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"missing keys: {_format(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_format(mismatched)}")
    if problems:
        raise ValueError("state_dict: " + "; ".join(problems))


def torchvision_to_flax(
    state_dict: Mapping[str, Any], arch: str | nn.Module, strict: bool = True
) -> dict[str, Any]:
    """Convert a torchvision ResNet / VGG-16 state dict into Flax variables for the backbone.

    Args:
      state_dict: name → array (numpy or torch tensor), as ``model.state_dict()``.
      arch: ``'resnet18'`` … ``'resnet152'``, ``'vgg16'``, or a :class:`ResNet` / :class:`VGG`
        instance (for non-default configurations, e.g. ``num_stages=3``).
      strict: when False, keys with no place in the backbone (e.g. ``layer4`` for a
        ``num_stages=3`` trunk) are ignored instead of raising.

    Returns ``{'params': …, 'batch_stats': …}`` (``batch_stats`` only for ResNets), float32, with
    the exact tree structure of ``backbone.init``. Raises ``ValueError`` naming every missing,
    unexpected or mis-shaped key.
    """
    backbone = _backbone(arch)
    shapes = jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    flat, used = {}, set()
    missing, mismatched = [], []
    for (collection, *path), spec in traverse_util.flatten_dict(shapes).items():
        name = _torch_name(backbone, tuple(path))
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        value = _from_torch(_to_numpy(state_dict[name]))
        if value.shape != spec.shape:
            mismatched.append(
                f"{name} expected {_torch_shape(spec.shape)}, got {_torch_shape(value.shape)}"
            )
            continue
        flat[(collection, *path)] = jnp.asarray(value, jnp.float32)
    unexpected = [
        k
        for k in state_dict
        if k not in used
        and not k.endswith("num_batches_tracked")
        and not k.startswith(_IGNORED_PREFIXES)
    ]
    _raise_if(missing, unexpected if strict else [], mismatched)
    return traverse_util.unflatten_dict(flat)


def with_backbone(variables: Mapping[str, Any], backbone: Mapping[str, Any]) -> dict[str, Any]:
    """A network's variables with its backbone (the ``features`` submodule of a
    :class:`RetrievalNet` or a HOW network) replaced by ``backbone``, the output of
    :func:`torchvision_to_flax`; the head (GeM p, whitening) keeps its values."""
    out = {**variables, "params": {**variables["params"], "features": backbone["params"]}}
    if "batch_stats" in backbone:
        out["batch_stats"] = {
            **variables.get("batch_stats", {}),
            "features": backbone["batch_stats"],
        }
    return out


def _cirtorch_to_torchvision(name: str, backbone: ResNet | VGG) -> str:
    """``features.<i>.rest`` → the torchvision name (ResNet children; VGG keeps its indices)."""
    if isinstance(backbone, VGG):
        return name
    _, index, rest = name.split(".", 2)
    if not index.isdigit() or int(index) >= len(RESNET_CHILDREN):
        return name
    return f"{RESNET_CHILDREN[int(index)]}.{rest}"


def cirtorch_to_flax(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
    arch: str | nn.Module | None = None,
    strict: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert a cirtorch retrieval checkpoint into :class:`RetrievalNet` variables.

    Args:
      checkpoint: ``{'state_dict': …, 'meta': …}`` (as saved by cirtorch) or a path to one.
      arch: backbone name or module; defaults to ``meta['architecture']``.
      strict: raise on keys that belong nowhere (see :func:`torchvision_to_flax`).

    Returns ``(variables, meta)``: ``params/features`` (backbone), ``params/p`` (GeM power,
    ``()`` for a shared ``pool.p`` of shape ``(1,)``, ``(C,)`` per channel), ``params/whiten``
    (``kernel = whiten.weightᵀ``, ``bias``) when present, ``batch_stats/features`` for ResNets;
    and the checkpoint's meta dict (architecture, pooling, whitening, mean, std, outputdim…).
    """
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = load_checkpoint(checkpoint)
    if "state_dict" not in checkpoint:
        raise ValueError("checkpoint: expected a dict with a 'state_dict' entry")
    state_dict, meta = checkpoint["state_dict"], dict(checkpoint.get("meta") or {})
    arch = meta.get("architecture") if arch is None else arch
    if arch is None:
        raise ValueError("arch: not given and the checkpoint meta has no 'architecture'")
    backbone = _backbone(arch)
    features = {
        _cirtorch_to_torchvision(k, backbone): v
        for k, v in state_dict.items()
        if k.startswith("features.")
    }
    unexpected = [
        k
        for k in state_dict
        if not k.startswith("features.") and k not in ("pool.p", "whiten.weight", "whiten.bias")
    ]
    if strict and unexpected:
        raise ValueError(f"state_dict: unexpected keys: {_format(unexpected)}")
    if meta.get("pooling", "gem") in ("gem", "gemmp") and "pool.p" not in state_dict:
        raise ValueError("state_dict: missing keys: pool.p (the GeM power)")
    converted = torchvision_to_flax(features, backbone, strict=strict)
    params: dict[str, Any] = {"features": converted["params"]}
    if "pool.p" in state_dict:
        p = _to_numpy(state_dict["pool.p"]).astype(np.float32)
        if p.size not in (1, backbone.out_channels):
            raise ValueError(
                f"state_dict: pool.p expected 1 or {backbone.out_channels} values, got {p.shape}"
            )
        params["p"] = jnp.asarray(p.reshape(()) if p.size == 1 else p.reshape(-1))
    if "whiten.weight" in state_dict:
        weight = _to_numpy(state_dict["whiten.weight"]).astype(np.float32)
        if weight.ndim != 2 or weight.shape[1] != backbone.out_channels:
            raise ValueError(
                f"state_dict: whiten.weight expected (out, {backbone.out_channels}), "
                f"got {weight.shape}"
            )
        params["whiten"] = {"kernel": jnp.asarray(weight.T)}
        if "whiten.bias" in state_dict:
            bias = _to_numpy(state_dict["whiten.bias"]).astype(np.float32)
            if bias.shape != weight.shape[:1]:
                raise ValueError(
                    f"state_dict: whiten.bias expected {weight.shape[:1]}, got {bias.shape}"
                )
            params["whiten"]["bias"] = jnp.asarray(bias)
    variables: dict[str, Any] = {"params": params}
    if "batch_stats" in converted:
        variables["batch_stats"] = {"features": converted["batch_stats"]}
    return variables, meta


def retrieval_net_from_meta(meta: Mapping[str, Any], **kwargs: Any) -> RetrievalNet:
    """The :class:`RetrievalNet` matching a cirtorch ``meta`` dict; ``kwargs`` override fields.

    Reads ``architecture``, ``pooling`` (``gem``, ``gemmp`` = per-channel p, ``mac``, ``spoc``),
    ``whitening`` with ``outputdim``, ``mean`` and ``std``. Regional pooling and local whitening
    are not supported.
    """
    if meta.get("regional") or meta.get("local_whitening"):
        raise ValueError("meta: regional pooling and local whitening are not supported")
    pooling = meta.get("pooling", "gem")
    if pooling not in CIRTORCH_POOLINGS:
        raise ValueError(
            f"meta['pooling']: expected one of {list(CIRTORCH_POOLINGS)}, got {pooling!r}"
        )
    name, per_channel = CIRTORCH_POOLINGS[pooling]
    fields: dict[str, Any] = {"pooling": name, "p_per_channel": per_channel}
    if "architecture" in meta:
        fields["backbone"] = meta["architecture"]
    if meta.get("whitening"):
        fields["whiten_dim"] = int(meta["outputdim"])
    for key in ("mean", "std"):
        if key in meta:
            fields[key] = tuple(float(v) for v in meta[key])
    return RetrievalNet(**{**fields, **kwargs})


def _to_numpy(value: Any) -> np.ndarray:
    """numpy copy of a torch tensor (float16/bfloat16 widened to float32) or array-like."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _tensors_to_numpy(obj: Any) -> Any:
    if hasattr(obj, "detach"):
        return _to_numpy(obj)
    if isinstance(obj, Mapping):
        return {k: _tensors_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_tensors_to_numpy(v) for v in obj)
    return obj


def _read_torch(path: str, weights_only: bool) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path}: reading .pth/.pt files needs PyTorch; install the 'torch' extra "
            "(pip install 'jret[torch]'), or convert the file to .npz with "
            "jret.models.convert.save_npz where torch is available"
        ) from e
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _read_npz(path: str) -> dict[str, Any]:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(str(arrays.pop(META_KEY))) if META_KEY in arrays else {}
    return {"state_dict": arrays, "meta": meta}


def load_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """Read ``.pth`` / ``.pt`` (via torch) or ``.npz`` into ``{'state_dict': …, 'meta': …}``.

    A file holding a bare state dict (torchvision weights) gives ``meta = {}``; other entries of
    a training checkpoint (optimizer, epoch) are dropped. Arrays are numpy (float16/bfloat16
    widened to float32). ``weights_only`` is passed to ``torch.load`` (keep it True for files you
    did not write). Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the
    file when it cannot be parsed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".pth", ".pt", ".npz"):
        raise ValueError(f"{path}: expected a .pth, .pt or .npz file")
    try:
        if suffix == ".npz":
            return _read_npz(path)
        obj = _tensors_to_numpy(_read_torch(path, weights_only))
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: could not read the checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
    if "state_dict" in obj:
        return {"state_dict": dict(obj["state_dict"]), "meta": dict(obj.get("meta") or {})}
    return {"state_dict": dict(obj), "meta": {}}


def load_state_dict(path: str | os.PathLike, weights_only: bool = True) -> dict[str, np.ndarray]:
    """The state dict (name → numpy array) of a ``.pth`` / ``.pt`` / ``.npz`` file.

    For a checkpoint dict with a ``'state_dict'`` entry that entry is returned.
    """
    return load_checkpoint(path, weights_only)["state_dict"]


def save_npz(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a state dict (names as keys) and an optional JSON-able ``meta`` to ``path`` (.npz).

    Read it back with :func:`load_checkpoint` / :func:`load_state_dict`; no torch needed.
    """
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    if META_KEY in arrays:
        raise ValueError(f"state_dict: the key {META_KEY!r} is reserved for meta")
    if meta is not None:
        arrays[META_KEY] = np.asarray(
            json.dumps(dict(meta), default=lambda o: np.asarray(o).tolist())
        )
    with open(path, "wb") as f:
        np.savez(f, **arrays)
