"""Data for the tasks: file readers (IDX, CIFAR-10 pickles, text), batch sampling and image
augmentations written in torch (no torchvision)."""

from __future__ import annotations

import gzip
import math
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from muonkit.tasks.base import TaskError

# IDX type code 0x08 is unsigned byte, the only type Fashion-MNIST uses.
_IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise TaskError(f"cannot read IDX file {path}: {e}; replace it with an intact copy") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise TaskError(f"{path} is not an unsigned-byte IDX file (bad magic number); "
                        "replace it with the Fashion-MNIST file of that name")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if ndim == 0 or len(raw) != header + math.prod(dims):
        raise TaskError(f"{path} is truncated or malformed ({len(raw)} bytes, header says {dims}); "
                        "replace it with an intact copy")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_file(directory: Path, stem: str, hint: str) -> Path:
    """`directory/stem` or `directory/stem.gz`, else a TaskError telling how to get it."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise TaskError(f"{directory} has no {stem}[.gz]; {hint}")


def check_dir(directory: Path, hint: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise TaskError(f"data directory {directory} is a file, not a directory; {hint}")
    if not directory.is_dir():
        raise TaskError(f"data directory {directory} does not exist; {hint}")


def load_cifar_dir(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 in the python-pickle format: data_batch_1..5 and test_batch, images as (N, 3, 32, 32)."""
    hint = ("pass --data-dir pointing at the extracted cifar-10-batches-py directory "
            "(data_batch_1..5, test_batch)")
    check_dir(directory, hint)

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = directory / name
        if not path.is_file():
            raise TaskError(f"{directory} has no {name}; {hint}")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as e:  # a corrupt pickle can raise almost anything
            raise TaskError(f"{path} is not a CIFAR-10 python pickle ({type(e).__name__}: {e}); "
                            "replace it with the file from cifar-10-python.tar.gz") from None
        if len(images) != len(labels):
            raise TaskError(f"{path} has {len(images)} images but {len(labels)} labels; replace it")
        return images, labels

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = read("test_batch")
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            test_images, test_labels)


def stdlib_corpus(max_chars: int) -> str:
    """The Python standard library's own top-level .py files, sorted by name, up to `max_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if total == 0:
        raise TaskError(f"no readable .py files in the standard library at {root}; pass --text FILE")
    return "".join(parts)[:max_chars]


def read_text(path: Path, max_chars: int) -> str:
    if path.is_dir():
        raise TaskError(f"{path} is a directory; pass --text with a UTF-8 text file")
    if not path.is_file():
        raise TaskError(f"text file {path} does not exist; pass --text with an existing UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TaskError(f"{path} is not UTF-8 text; pass --text with a UTF-8 text file") from None
    except OSError as e:
        raise TaskError(f"cannot read {path}: {e.strerror}; pass --text with a readable file") from None
    return text[:max_chars]


class Shuffler:
    """Indices of training examples, reshuffled every epoch like DataLoader(shuffle=True)."""

    def __init__(self, n: int, batch_size: int):
        self.n = n
        self.batch_size = min(batch_size, n)
        self.per_epoch = max(1, n // self.batch_size)
        self._order: torch.Tensor | None = None

    def indices(self, step: int, generator: torch.Generator) -> torch.Tensor:
        position = step % self.per_epoch
        if position == 0 or self._order is None:
            self._order = torch.randperm(self.n, generator=generator)
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1]."""
    return images.float().div_(255.0)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flip of each image with probability 1/2."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `padding` and cut a random window of the original size from each image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_erasing(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Zero one random rectangle per image (torchvision RandomErasing(p=1, value=0) defaults).

    Area fraction is uniform in `scale`, log aspect ratio uniform in log(`ratio`); a rectangle that
    does not fit is skipped, as torchvision does after its retries.
    """
    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(*scale, generator=generator) * (h * w)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    eh = (area * log_ratio.exp()).sqrt().round().long()
    ew = (area / log_ratio.exp()).sqrt().round().long()
    fits = (eh < h) & (ew < w)
    top = (torch.rand(n, generator=generator) * (h - eh + 1).clamp(min=1)).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1).clamp(min=1)).long()
    eh, ew = eh * fits, ew * fits
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :]).to(x.device)
    return x.masked_fill(mask[:, None], 0.0)


def color_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Brightness, contrast and saturation factors uniform in [1 - strength, 1 + strength].

    torchvision applies the three in a random order; here the order is fixed (brightness,
    contrast, saturation), which keeps the per-image work vectorized.
    """
    n = len(x)

    def factors() -> torch.Tensor:
        f = torch.empty(n).uniform_(1 - strength, 1 + strength, generator=generator)
        return f.to(x.device)[:, None, None, None]

    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device)[None, :, None, None]
    x = (x * factors()).clamp(0, 1)
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * factors() + mean).clamp(0, 1)
    gray = (x * weights).sum(1, keepdim=True)
    return ((x - gray) * factors() + gray).clamp(0, 1)

