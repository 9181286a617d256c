"""Train a reference model (``cifar10_vit``, ``cifar10_swin``) on the shipped CIFAR-10 training set.

Two stages, both resumable from per-epoch checkpoints in ``--work``:

1. Fine-tune the ResNet-56 CIFAR-10 teacher (../shared/models/resnet56-cifar10.th)
   on the JPEG training images: it scores 83.2% on the JPEG test copies out of the
   box (93.4% on the originals), so a short fine-tune buys back most of the gap.
2. Train the timm ViT / Swin (``--model``) from scratch with knowledge distillation from that teacher
   (soft targets, as in DeiT's CNN-teacher recipe), label smoothing, crop+flip
   augmentation, AdamW with warm-up and cosine decay, bf16 autocast on CPUs with native bf16
   (``--precision auto``; on an AVX2-only CPU bf16 runs ~10x slower than fp32, so fp32 there) and
   on GPUs (``--device cuda``: the images stay on the CPU, where the augmentation draws its crops,
   and each batch moves to the device).

Reproduce: the commands that produced the shipped checkpoints are the first lines of
benchmarks/train_reference.md (cifar10_vit) and benchmarks/train_reference_swin.md (cifar10_swin).

The shipped checkpoint is written to src/vitq/assets/<model>/ with a JSON of its config and
measured accuracy; the curve goes to benchmarks/train_reference[_swin].json/.md.
Stop it at any time (Ctrl-C); the same command resumes from the last finished epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vitq.data import atomic_write_bytes, load_cifar10  # noqa: E402
from vitq.models import CIFAR10_MEAN, CIFAR10_STD, REFERENCE_MODELS, build_reference  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- teacher: CIFAR ResNet-56 (option A)
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return x
        # "option A": subsample and zero-pad channels, no parameters
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 9, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


def load_teacher(path: Path) -> ResNetCifar:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = ResNetCifar()
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------- data on tensors (fast, no PIL in the loop)
def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop from a 4-pixel reflect-padded image, and a horizontal flip."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    ox = torch.randint(0, 9, (n,), generator=gen)
    oy = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


_AUTOCAST_BF16 = True  # set by main() from --precision
DEVICE = torch.device("cpu")  # set by main() from --device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (without them bf16 matmuls are emulated, ~10x slower)."""
    from vitq.report import cpu_features

    return bool({"avx512_bf16", "amx_bf16"} & cpu_features())


def autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=_AUTOCAST_BF16)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        with autocast():
            logits = model(normalise(x[i:i + batch].to(DEVICE), mean, std))
        correct += (logits.argmax(1).cpu() == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x)


def save_atomic(obj, path: Path) -> None:
    atomic_write_bytes(path, lambda fh: torch.save(obj, fh))


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def run_epochs(name, model, opt, epochs, batch, base_lr, warmup_epochs, loss_fn, x_tr, y_tr, x_te, y_te,
               mean, std, ckpt_path: Path, seed: int, log: list):
    """A resumable training loop: one checkpoint per finished epoch."""
    start = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"]
        log[:] = state["log"]
        print(f"[{name}] resumed after epoch {start}", flush=True)
    steps_per_epoch = len(x_tr) // batch
    total = epochs * steps_per_epoch
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(x_tr), generator=gen)
        model.train()
        t0, run_loss = time.time(), 0.0
        for it in range(steps_per_epoch):
            step = epoch * steps_per_epoch + it
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup_epochs * steps_per_epoch, base_lr)
            idx = perm[it * batch:(it + 1) * batch]
            xb = augment(x_tr[idx], gen).to(DEVICE)
            with autocast():
                loss = loss_fn(model, xb, y_tr[idx].to(DEVICE))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item()
            if it % 50 == 0:
                el = time.time() - t0
                print(f"[{name}] epoch {epoch + 1}/{epochs} it {it}/{steps_per_epoch} loss {run_loss / (it + 1):.4f} "
                      f"{(it + 1) * batch / max(el, 1e-9):.0f} img/s", flush=True)
        acc = evaluate(model, x_te, y_te, mean, std)
        seconds = time.time() - t0
        log.append({"epoch": epoch + 1, "train_loss": run_loss / steps_per_epoch, "test_top1": acc, "seconds": seconds})
        print(f"[{name}] epoch {epoch + 1} done: test top-1 {acc:.2f}% in {seconds:.0f}s", flush=True)
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "log": log}, ckpt_path)
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(REFERENCE_MODELS), default="cifar10_vit")
    ap.add_argument("--teacher", type=Path, default=Path("../shared/models/resnet56-cifar10.th"))
    ap.add_argument("--work", type=Path, default=None, help="checkpoints (default runs/train_<model>)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument("--kd-temp", type=float, default=4.0)
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="extra distillation epochs after the main schedule, cosine from --finetune-lr to 0")
    ap.add_argument("--finetune-lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="training/eval autocast: bf16 where the CPU or GPU has native bf16 (auto), or forced")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (checkpoints resume on either)")
    ap.add_argument("--out", type=Path, default=None, help="model folder (default src/vitq/assets/<model>)")
    args = ap.parse_args()
    args.work = args.work or Path(f"runs/train_{args.model}")
    args.out = args.out or Path(__file__).resolve().parents[1] / "src/vitq/assets" / args.model
    family, arch = REFERENCE_MODELS[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    global _AUTOCAST_BF16, DEVICE
    try:
        DEVICE = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"--device {args.device}: not a device name; use cpu or cuda[:N]")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    native_bf16 = torch.cuda.is_bf16_supported() if DEVICE.type == "cuda" else cpu_has_native_bf16()
    _AUTOCAST_BF16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16)
    print(f"autocast: {'bf16' if _AUTOCAST_BF16 else 'fp32 (no native bf16 on this device)'}", flush=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    tr_img, tr_lab = load_cifar10("train")
    te_img, te_lab = load_cifar10("test")
    x_tr, y_tr = to_float(tr_img), torch.from_numpy(tr_lab)
    x_te, y_te = to_float(te_img), torch.from_numpy(te_lab)

    # ---- stage 1: teacher fine-tune
    teacher = load_teacher(args.teacher).to(DEVICE)
    teacher_log: list = []
    teacher_before = evaluate(teacher, x_te, y_te, IMAGENET_MEAN, IMAGENET_STD)
    print(f"[teacher] before fine-tuning: {teacher_before:.2f}%", flush=True)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)

    def teacher_loss(m, xb, yb):
        return F.cross_entropy(m(normalise(xb, IMAGENET_MEAN, IMAGENET_STD)), yb)

    run_epochs("teacher", teacher, t_opt, args.teacher_epochs, args.batch_size, 0.01, 0, teacher_loss,
               x_tr, y_tr, x_te, y_te, IMAGENET_MEAN, IMAGENET_STD, args.work / "teacher.pt", args.seed, teacher_log)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_teacher = time.time() - t_start

    # ---- stage 2: the student, distilled
    torch.manual_seed(args.seed)
    student = build_reference(args.model).to(DEVICE)
    def decayed(n: str, p: torch.Tensor) -> bool:
        return p.ndim > 1 and not any(k in n for k in ("pos_embed", "cls_token", "relative_position_bias_table"))

    decay = [p for n, p in student.named_parameters() if decayed(n, p)]
    no_decay = [p for n, p in student.named_parameters() if not decayed(n, p)]
    s_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.999))
    T, a = args.kd_temp, args.kd_alpha

    def student_loss(m, xb, yb):
        with torch.no_grad():
            t_logits = teacher(normalise(xb, IMAGENET_MEAN, IMAGENET_STD)).float()
        s_logits = m(normalise(xb, CIFAR10_MEAN, CIFAR10_STD)).float()
        ce = F.cross_entropy(s_logits, yb, label_smoothing=0.1)
        kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean",
                      log_target=True) * T * T
        return (1 - a) * ce + a * kd

    student_log: list = []
    run_epochs("student", student, s_opt, args.epochs, args.batch_size, args.lr, 1, student_loss,
               x_tr, y_tr, x_te, y_te, CIFAR10_MEAN, CIFAR10_STD, args.work / "student.pt", args.seed, student_log)
    if args.finetune_epochs:
        # a second, short low-learning-rate schedule on top of the finished one (its own checkpoint)
        ft_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                   lr=args.finetune_lr)
        ft_log: list = []
        run_epochs("finetune", student, ft_opt, args.finetune_epochs, args.batch_size, args.finetune_lr, 0,
                   student_loss, x_tr, y_tr, x_te, y_te, CIFAR10_MEAN, CIFAR10_STD, args.work / "student_ft.pt",
                   args.seed + 1, ft_log)
        student_log = student_log + [{**r, "epoch": args.epochs + r["epoch"], "stage": "finetune"} for r in ft_log]

    # ---- final fp32 evaluation and export
    student.eval()
    with torch.no_grad():
        correct = sum((student(normalise(x_te[i:i + 500].to(DEVICE), CIFAR10_MEAN, CIFAR10_STD)).argmax(1).cpu()
                       == y_te[i:i + 500]).sum().item()
                      for i in range(0, len(x_te), 500))
    fp32_top1 = 100.0 * correct / len(x_te)
    total_s = time.time() - t_start
    print(f"[student] final fp32 test top-1 {fp32_top1:.2f}%", flush=True)

    from safetensors.torch import save_file
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp))
    os.replace(tmp, args.out / "model.safetensors")
    meta = {
        "name": args.model,
        "architecture": f"{type(student).__module__}.{type(student).__name__}",
        "family": family,
        "arch_kwargs": arch,
        "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "test_top1": fp32_top1, "test_images": len(x_te),
        "training": {
            "command": "python benchmarks/train_reference.py " + " ".join(sys.argv[1:]),
            "epochs": args.epochs, "teacher_epochs": args.teacher_epochs, "batch_size": args.batch_size,
            "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr,
            "lr": args.lr, "kd_alpha": a, "kd_temp": T, "seed": args.seed, "device": DEVICE.type,
            "teacher_top1_before": teacher_before, "precision": "bf16" if _AUTOCAST_BF16 else "fp32", "teacher_top1_after": teacher_log[-1]["test_top1"] if teacher_log else None,
        },
    }
    atomic_write_bytes(args.out / "config.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    report = {"teacher": teacher_log, "student": student_log, "final_fp32_top1": fp32_top1,
              "teacher_seconds": t_teacher, "total_seconds_this_run": total_s, "meta": meta}
    bench = Path(__file__).resolve().parent
    stem = "train_reference" if args.model == "cifar10_vit" else f"train_reference_{family}"
    atomic_write_bytes(bench / f"{stem}.json", lambda fh: fh.write(json.dumps(report, indent=2).encode()))
    rows = "\n".join(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['test_top1']:.2f} | {r['seconds']:.0f} |" for r in student_log)
    md = (f"# Reference model training\n\nCommand:\n\n    {meta['training']['command']}\n\n"
          f"Teacher (ResNet-56) on the JPEG test set: {teacher_before:.2f}% before, "
          f"{meta['training']['teacher_top1_after']}% after {args.teacher_epochs} fine-tune epochs.\n\n"
          f"Student `{args.model}` ({arch}): final fp32 test top-1 **{fp32_top1:.2f}%** on 10,000 images.\n\n"
          f"| epoch | train loss | test top-1 ({'bf16' if _AUTOCAST_BF16 else 'fp32'} eval) | seconds |\n|---|---|---|---|\n{rows}\n")
    atomic_write_bytes(bench / f"{stem}.md", lambda fh: fh.write(md.encode()))


if __name__ == "__main__":
    main()
