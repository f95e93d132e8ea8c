"""Training throughput: one jret optimiser step next to the same step in PyTorch (images / s).

    python experiments/benchmarks/train_throughput.py --suite cpu          # tiny shapes, CPU
    python experiments/benchmarks/train_throughput.py --suite gpu          # R50 @ 362, R101 @ 1024
    python experiments/benchmarks/train_throughput.py --suite gpu --dtype bfloat16 --channels-last
    python experiments/benchmarks/train_throughput.py --suite gpu --cases resnet50:362:8

The step is the siamese fine-tuning step of Radenović et al. (GeM, TPAMI 2018; SPEC §4.2–4.5):
a batch of ``B`` tuples of ``T = 1 + 1 + negatives`` images (query, positive, 5 hard negatives),
each square ``S × S``; the descriptors are GeM (p = 3, learnable, eps 1e-6) of the last ResNet
activations, ℓ2-normalised; the loss is the contrastive loss (margin 0.7) summed over the
``B · (T − 1)`` pairs; BatchNorm is frozen (running statistics, affine parameters trained); Adam
with coupled weight decay, the GeM power at 10 × the learning rate without decay. jret runs
``jret.train.state.jit_train_step`` on a :class:`jret.models.RetrievalNet`; PyTorch runs the
same network (torchvision's ResNet, or the torchvision-layout copy in ``torch_resnet.py`` when
torchvision is missing) with BatchNorm in eval mode, on CUDA when the GPU suite runs.

Per case: the first step (jret: trace + compile + run; torch: cuDNN autotuning, ``torch.compile``)
is timed apart, ``--warmup`` steps more are run untimed, then ``--repeats`` rounds of ``--steps``
timed steps alternate between the two (each round ends with ``block_until_ready`` /
``torch.cuda.synchronize``) and the best round counts. The same batch is reused: data loading is
not measured. A parity check converts a torch network's weights to jret
(``jret.models.convert.torchvision_to_flax``) and compares the loss and the GeM-p gradient on one
tuple, in float32. Writes ``train_throughput_<suite>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

sys.path.append(
    str(Path(__file__).resolve().parent)
)  # for common.py; last, so asmk.py shadows nothing
from common import (  # noqa: E402
    command_line,
    markdown_head,
    run_info,
    single_xla_thread,
    write_results,
)

SUITES = {
    "cpu": ("resnet18:96:1", "resnet50:128:1"),
    "gpu": ("resnet50:362:5", "resnet101:1024:1"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GEM_EPS = 1e-6
L2N_EPS = 1e-6


class Case(NamedTuple):
    """One benchmark case: backbone name, image side ``S`` and tuples per micro-batch ``B``."""

    arch: str
    size: int
    tuples: int


def parse_case(text: str) -> Case:
    """``'resnet50:362:5'`` → ``Case('resnet50', 362, 5)``."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"expected ARCH:SIZE:TUPLES, got {text!r}")
    return Case(parts[0], int(parts[1]), int(parts[2]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=tuple(SUITES), default="cpu")
    p.add_argument(
        "--cases",
        type=parse_case,
        nargs="+",
        default=None,
        help="ARCH:SIZE:TUPLES cases replacing the suite's (cpu: "
        + " ".join(SUITES["cpu"])
        + "; gpu: "
        + " ".join(SUITES["gpu"])
        + ")",
    )
    p.add_argument("--width", type=int, default=64, help="ResNet base width (64 = standard)")
    p.add_argument("--negatives", type=int, default=5, help="negatives per tuple")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches A per step")
    p.add_argument("--margin", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (cpu 3, gpu 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (the best one counts)")
    p.add_argument("--compile", action="store_true", help="torch.compile the torch forward")
    p.add_argument("--channels-last", action="store_true", help="torch channels_last layout")
    p.add_argument("--fused-adam", action="store_true", help="torch Adam(fused=True)")
    p.add_argument("--single-thread", action="store_true", help="one thread for XLA and torch")
    p.add_argument("--parity-size", type=int, default=64, help="image side of the parity check")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument(
        "--name", default=None, help="output file stem (default train_throughput_<suite>)"
    )
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.suite == "gpu" else 3
    return args


def tuple_batch(case: Case, accum_steps: int, negatives: int, seed: int) -> dict[str, np.ndarray]:
    """Images ``(A, B, T, S, S, 3)`` in [0, 1] (blocky noise), all-valid masks ``(A, B, T, S, S)``
    and labels ``(A, B, T − 1)`` ``(1, 0, …, 0)``, with ``T = negatives + 2``."""
    a, t, s = accum_steps, negatives + 2, case.size
    rng = np.random.default_rng(seed)
    low = rng.uniform(size=(a, case.tuples, t, -(-s // 8), -(-s // 8), 3)).astype(np.float32)
    images = low.repeat(8, axis=3).repeat(8, axis=4)[:, :, :, :s, :s]
    images = np.clip(images + 0.05 * rng.standard_normal(images.shape, np.float32), 0.0, 1.0)
    labels = np.zeros((a, case.tuples, t - 1), np.int32)
    labels[..., 0] = 1
    return {"images": images, "masks": np.ones(images.shape[:5], bool), "labels": labels}


class TorchGeMNet(nn.Module):
    """ImageNet normalisation → ResNet trunk → GeM (p learnable, eps 1e-6) → ℓ2 (eps 1e-6)."""

    def __init__(self, backbone: nn.Module, p: float = 3.0):
        super().__init__()
        self.backbone = backbone
        self.p = nn.Parameter(torch.full((1,), p))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """conv5_x activations of [0, 1] images ``(N, 3, H, W)`` (torchvision children)."""
        m = self.backbone
        x = m.maxpool(m.relu(m.bn1(m.conv1((x - self.mean) / self.std))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors ``(N, C)``; pooling and normalisation in float32."""
        f = self.features(x).float()
        g = f.clamp(min=GEM_EPS).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)
        return g / (torch.linalg.vector_norm(g, dim=1, keepdim=True) + L2N_EPS)


def torch_backbone(arch: str, width: int = 64) -> nn.Module:
    """torchvision's ResNet when importable (standard width), else the torchvision-layout copy."""
    if width == 64:
        try:
            import torchvision
        except ImportError:
            pass
        else:
            return getattr(torchvision.models, arch)(weights=None)
    from torch_resnet import resnet

    return resnet(arch, width)


def torch_contrastive(
    desc: torch.Tensor, labels: torch.Tensor, margin: float = 0.7, eps: float = 1e-6
) -> torch.Tensor:
    """Contrastive loss summed over pairs, as ``jret.train.losses.contrastive_loss``.

    ``desc (B, T, D)``: row 0 of each tuple is the anchor, rows ``1..T−1`` its pairs with
    ``labels (B, T − 1)`` (1 = matching); ``d = ‖a − x + eps‖``, ``½ d²`` or
    ``½ max(0, margin − d)²``.
    """
    d = torch.linalg.vector_norm(desc[:, :1] - desc[:, 1:] + eps, dim=-1)
    y = labels.to(d.dtype)
    return (0.5 * y * d**2 + 0.5 * (1 - y) * torch.clamp(margin - d, min=0.0) ** 2).sum()


def freeze_batchnorm(net: nn.Module) -> nn.Module:
    """Training mode with every BatchNorm in eval mode (running statistics, as cirtorch)."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net


def calibrate_batchnorm(net: TorchGeMNet, images: torch.Tensor) -> None:
    """Set the BatchNorm running statistics to the statistics of ``images`` (one pass)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(images)
    net.eval()


def torch_optimizer(net: TorchGeMNet, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam with coupled weight decay; GeM p at 10 × lr without decay (cirtorch's groups)."""
    groups = [
        {"params": list(net.backbone.parameters()), "weight_decay": args.weight_decay},
        {"params": [net.p], "lr": 10 * args.lr, "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=args.lr, fused=True if args.fused_adam else None)


def sync(device: torch.device) -> None:
    """Wait for the queued CUDA work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchStep:
    """The PyTorch training step on a fixed batch; ``run(n)`` times ``n`` steps."""

    def __init__(self, case: Case, args: argparse.Namespace, batch: dict, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        net = TorchGeMNet(torch_backbone(case.arch, args.width)).to(device, memory_format=fmt)
        self.net = freeze_batchnorm(net)
        self.forward = torch.compile(self.net) if args.compile else self.net
        self.opt = torch_optimizer(self.net, args)
        images = torch.from_numpy(batch["images"]).to(device)
        b, t, s = images.shape[1:4]
        self.images = [
            x.reshape(b * t, s, s, 3).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            for x in images
        ]
        self.labels = torch.from_numpy(batch["labels"]).to(device)
        self.shape, self.margin = (b, t), args.margin
        self.dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
        t0 = time.perf_counter()
        self.loss = self.step()
        sync(device)
        self.first_step_s = time.perf_counter() - t0

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for x, labels in zip(self.images, self.labels, strict=True):
            with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
                desc = self.forward(x)
            loss = torch_contrastive(desc.float().view(*self.shape, -1), labels, self.margin)
            loss.backward()
            total = total + loss.detach()
        self.opt.step()
        return total

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.loss = self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def peak_memory_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20


def jret_model_kwargs(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """``RetrievalNet`` keyword arguments: GeM pooling, compute ``dtype``, ``--width``."""
    import jax.numpy as jnp

    kwargs: dict[str, Any] = {"pooling": "gem", "dtype": getattr(jnp, dtype)}
    if args.width != 64:
        kwargs["backbone_kwargs"] = {"width": args.width}
    return kwargs


class JretStep:
    """``jit_train_step`` compiled ahead of time on a fixed batch; ``run(n)`` times ``n`` steps."""

    def __init__(self, case: Case, args: argparse.Namespace, batch: dict):
        import jax

        from jret.models import RetrievalNet, init_retrieval_net
        from jret.train.optim import make_optimizer
        from jret.train.state import create_train_state, jit_train_step

        kwargs = jret_model_kwargs(args, args.dtype)
        model = RetrievalNet(backbone=case.arch, **kwargs)
        variables = init_retrieval_net(jax.random.key(args.seed), case.arch, **kwargs)
        tx = make_optimizer(
            variables["params"],
            lr=args.lr,
            weight_decay=args.weight_decay,
            steps_per_epoch=1000,
        )
        self.state = create_train_state(variables, tx, args.seed)
        self.batch = jax.device_put(batch)
        t0 = time.perf_counter()
        step = jit_train_step(model=model, tx=tx, loss="contrastive", margin=args.margin)
        self.fn = step.lower(self.state, self.batch).compile()
        self.state, self.metrics = self.fn(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        self.first_step_s = time.perf_counter() - t0
        stats = self.fn.memory_analysis()
        self.program_mb = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes
        ) / 2**20

    def run(self, steps: int) -> float:
        import jax

        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, self.metrics = self.fn(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t0


def parity(
    arch: str, size: int, args: argparse.Namespace, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Loss and GeM-p gradient of one tuple: torch network vs its weights converted to jret.

    BatchNorm statistics are first set from the tuple's images, so that the random network's
    activations are well scaled. Both sides run in float32 with full-precision convolutions
    (no TF32).
    """
    import jax
    import jax.numpy as jnp

    from jret.models import RetrievalNet, build_backbone
    from jret.models.convert import torchvision_to_flax
    from jret.train.state import tuple_loss

    torch.manual_seed(seed)
    case = Case(arch, size, 1)
    batch = tuple_batch(case, 1, args.negatives, seed)
    net = TorchGeMNet(torch_backbone(arch, args.width)).to(device)
    x = torch.from_numpy(batch["images"][0, 0]).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(batch["labels"][0]).to(device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        calibrate_batchnorm(net, x)
        loss_t = torch_contrastive(net(x).view(1, x.shape[0], -1), labels, args.margin)
        loss_t.backward()
    kwargs = jret_model_kwargs(args, "float32")
    model = RetrievalNet(backbone=arch, **kwargs)
    backbone = build_backbone(arch, **kwargs.get("backbone_kwargs", {}))
    state_dict = {k: v.detach().cpu().numpy() for k, v in net.backbone.state_dict().items()}
    converted = torchvision_to_flax(state_dict, backbone)
    params = {"features": converted["params"], "p": jnp.asarray(net.p.item(), jnp.float32)}
    stats = {"features": converted["batch_stats"]}

    def loss_fn(params):
        value, _ = tuple_loss(
            model,
            params,
            stats,
            batch["images"][0],
            batch["masks"][0],
            batch["labels"][0],
            margin=args.margin,
        )
        return value

    with jax.default_matmul_precision("highest"):
        loss_j, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    loss_j, loss_t = float(loss_j), float(loss_t.detach())
    grad_j, grad_t = float(grads["p"]), float(net.p.grad.item())
    return {
        "arch": arch,
        "width": args.width,
        "size": size,
        "images": x.shape[0],
        "loss_jret": loss_j,
        "loss_torch": loss_t,
        "loss_rel_diff": abs(loss_j - loss_t) / abs(loss_t),
        "p_grad_jret": grad_j,
        "p_grad_torch": grad_t,
        "p_grad_rel_diff": abs(grad_j - grad_t) / abs(grad_t),
    }


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Throughput of both implementations on one case, plus the parity check."""
    batch = tuple_batch(case, args.accum_steps, args.negatives, args.seed)
    images_per_step = int(np.prod(batch["images"].shape[:3]))
    jret_step = JretStep(case, args, batch)
    torch.manual_seed(args.seed)
    torch_step = TorchStep(case, args, batch, device)
    jret_step.run(args.warmup)
    torch_step.run(args.warmup)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"jret": [], "torch": []}
    for _ in range(args.repeats):
        times["jret"].append(jret_step.run(args.steps))
        times["torch"].append(torch_step.run(args.steps))
    row: dict[str, Any] = {
        "arch": case.arch,
        "width": args.width,
        "size": case.size,
        "accum_steps": args.accum_steps,
        "tuples": case.tuples,
        "images_per_step": images_per_step,
        "dtype": args.dtype,
        "device": str(device),
        "steps": args.steps,
        "times_s": times,
        "images_per_s": {k: images_per_step * args.steps / min(v) for k, v in times.items()},
        "first_step_s": {"jret": jret_step.first_step_s, "torch": torch_step.first_step_s},
        "memory_mb": {"jret_xla_program": jret_step.program_mb, "torch_peak": None},
        "last_loss": {
            "jret": float(jret_step.metrics["loss"]),
            "torch": float(torch_step.loss.detach()),
        },
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }
    row["memory_mb"]["torch_peak"] = torch_step.peak_memory_mb()
    row["ratio_jret_to_torch"] = row["images_per_s"]["jret"] / row["images_per_s"]["torch"]
    del jret_step, torch_step
    if not args.skip_parity:
        row["parity"] = parity(case.arch, args.parity_size, args, device, args.seed)
    print_row(row)
    return row


def print_row(row: dict[str, Any]) -> None:
    ips, first = row["images_per_s"], row["first_step_s"]
    text = (
        f"{row['arch']} S={row['size']} {row['accum_steps']}x{row['tuples']} tuples "
        f"({row['images_per_step']} images/step) {row['dtype']} on {row['device']}: "
        f"jret {ips['jret']:.2f} img/s, torch {ips['torch']:.2f} img/s, "
        f"jret/torch {row['ratio_jret_to_torch']:.2f}; first step jret {first['jret']:.1f}s "
        f"torch {first['torch']:.1f}s"
    )
    if "parity" in row:
        par = row["parity"]
        text += (
            f"; parity loss rel {par['loss_rel_diff']:.1e}, "
            f"GeM-p grad rel {par['p_grad_rel_diff']:.1e}"
        )
    print(text, flush=True)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(args: argparse.Namespace, command: str, rows: list[dict], info: dict) -> str:
    from jret.experiment import markdown_table

    lines = markdown_head(f"Training throughput, jret vs PyTorch ({args.suite})", command, info)
    header = ["backbone", "S", "images/step", "dtype", "device", "jret img/s", "torch img/s"]
    header += ["jret / torch", "first step s jret", "first step s torch", "MiB jret (XLA)"]
    header += ["MiB torch (peak)", "load"]
    table = []
    for r in rows:
        ips, first, mem = r["images_per_s"], r["first_step_s"], r["memory_mb"]
        table.append(
            [r["arch"] + ("" if r["width"] == 64 else f" (width {r['width']})"), r["size"]]
            + [r["images_per_step"], r["dtype"], r["device"]]
            + [f"{ips['jret']:.2f}", f"{ips['torch']:.2f}", f"{r['ratio_jret_to_torch']:.2f}"]
            + [f"{first['jret']:.1f}", f"{first['torch']:.1f}"]
            + [_mb(mem["jret_xla_program"]), _mb(mem["torch_peak"])]
            + ["{:.1f} / {:.1f}".format(*r["loadavg_1min"])]
        )
    lines.append(markdown_table(header, table))
    checks = [r["parity"] for r in rows if "parity" in r]
    if checks:
        lines += ["", "Parity (torch weights converted to jret, one tuple, float32, no TF32):", ""]
        header = ["backbone", "S", "images", "loss jret", "loss torch", "rel. diff"]
        header += ["GeM-p grad jret", "GeM-p grad torch", "rel. diff"]
        table = [
            [c["arch"], c["size"], c["images"], f"{c['loss_jret']:.6f}", f"{c['loss_torch']:.6f}"]
            + [f"{c['loss_rel_diff']:.1e}", f"{c['p_grad_jret']:.4e}", f"{c['p_grad_torch']:.4e}"]
            + [f"{c['p_grad_rel_diff']:.1e}"]
            for c in checks
        ]
        lines.append(markdown_table(header, table))
    lines += ["", notes(args, info)]
    return "\n".join(lines) + "\n"


TORCH_BACKBONES = {
    "torchvision.models.resnet": "torchvision's ResNet",
    "torch_resnet": "the torchvision-layout ResNet of torch_resnet.py (torchvision not installed)",
}


def notes(args: argparse.Namespace, info: dict) -> str:
    """The paragraph under the tables: what was measured and how to read it."""
    backbone = TORCH_BACKBONES.get(info["torch_backbone"], info["torch_backbone"])
    text = (
        f"One step = A = {args.accum_steps} micro-batch(es) of B tuples, "
        f"{args.negatives + 2} images per tuple (query, positive, {args.negatives} negatives), "
        f"S × S images; contrastive loss (margin {args.margin}) on GeM descriptors, frozen "
        "BatchNorm, Adam (GeM p at 10 × lr). Images per second = images per step × "
        f"{args.steps} steps / the best of {args.repeats} timed rounds (the rounds alternate "
        "jret and torch); the first step (jret: trace and compile; torch: first call) is "
        f"excluded and shown apart, as are {args.warmup} warm-up steps. The batch stays on "
        "the device: data loading is not measured. `MiB jret (XLA)`: arguments + outputs − "
        "donated aliases + temporaries of the compiled step; `MiB torch (peak)`: "
        "`torch.cuda.max_memory_allocated` (CUDA only). `load`: 1-minute load average before "
        f"and after the timed rounds. torch backbone: {backbone}."
    )
    if args.single_thread:
        text += (
            " XLA and torch ran on one thread each (`--single-thread`): on a shared CPU, "
            "torch's OpenMP threads slow down erratically when other processes hold a core."
        )
    if args.suite == "gpu" and args.dtype == "float32":
        text += " float32 on the GPU: both frameworks' defaults allow TF32 convolutions."
    if args.suite == "cpu":
        text += (
            "\n\nCPU absolute times depend on the machine and its load: read the ratios only. "
            "The GPU figures (ResNet-50 at 362 px, ResNet-101 at 1024 px) come from "
            "`python experiments/benchmarks/train_throughput.py --suite gpu` on a GPU machine "
            "such as an H100 (add `--dtype bfloat16` for mixed precision), written to "
            "train_throughput_gpu.md."
        )
        if not info["gpu_visible"]:
            text += (
                " No GPU was available to this run: the H100 numbers are not measured here; "
                "run that command on one to obtain them."
            )
    return text


def pick_device(suite: str) -> torch.device:
    """CUDA for the GPU suite (jax must see the GPU too), the CPU for the CPU suite."""
    if suite == "cpu":
        return torch.device("cpu")
    import jax

    if not torch.cuda.is_available() or jax.default_backend() != "gpu":
        raise SystemExit("--suite gpu needs a GPU visible to both torch and jax")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda")


def gpu_visible() -> bool:
    if torch.cuda.is_available():
        return True
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.single_thread:
        single_xla_thread()
        torch.set_num_threads(1)
    if args.suite == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # both frameworks share the GPU: JAX allocates on demand instead of 75 % up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    command = command_line("experiments/benchmarks/train_throughput.py", argv)
    t0 = time.perf_counter()
    device = pick_device(args.suite)
    cases = args.cases or [parse_case(c) for c in SUITES[args.suite]]
    rows = [measure(case, args, device) for case in cases]
    backbone = type(torch_backbone("resnet18", args.width)).__module__
    info = run_info(
        t0,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        single_thread=args.single_thread,
        torch_backbone=backbone,
        torch_compile=args.compile,
        channels_last=args.channels_last,
        gpu_visible=args.suite == "gpu" or gpu_visible(),
    )
    if device.type == "cuda":
        import jax

        info["gpu"] = torch.cuda.get_device_name(device)
        jax_stats = jax.devices()[0].memory_stats() or {}
        info["jax_peak_bytes_in_use_mb"] = jax_stats.get("peak_bytes_in_use", 0) / 2**20
    name = args.name or f"train_throughput_{args.suite}"
    write_results(args.out, name, command, args, info, rows, markdown(args, command, rows, info))
    return rows


if __name__ == "__main__":
    main()
