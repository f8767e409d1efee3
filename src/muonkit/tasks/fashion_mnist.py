"""Fashion-MNIST with the seed notebook's network (one input channel) and its augmentations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from muonkit.tasks.base import DataOptions, Task, TaskError, accuracy, batchnorm_statistics_from
from muonkit.tasks.data import (Shuffler, check_dir, find_file, random_crop, random_erasing, random_flip,
                                read_idx, to_float_images)
from muonkit.tasks.vision import Net

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_HINT = ("install it with `apt-get install dataset-fashion-mnist` or pass --data-dir with "
         "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
         "t10k-labels-idx1-ubyte[.gz]")
# Evaluating the notebook's network costs ~5 ms per image on 2 CPU cores, so validation uses a
# fixed slice of the test set; the full 10,000 would cost more than the training it measures.
VAL_IMAGES = 1000
# Training images whose BatchNorm statistics an evaluation uses (~a quarter of its cost).
BN_IMAGES = 256


@dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 (N, C, H, W) on device
    train_labels: torch.Tensor
    val_images: torch.Tensor  # float in [0, 1]
    val_labels: torch.Tensor
    shuffler: Shuffler


def load_idx_pair(directory: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(find_file(directory, f"{prefix}-images-idx3-ubyte", _HINT))
    labels = read_idx(find_file(directory, f"{prefix}-labels-idx1-ubyte", _HINT))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise TaskError(f"{directory}: {prefix} images {images.shape} and labels {labels.shape} do not "
                        f"match; {_HINT}")
    if len(images) == 0 or int(labels.max()) >= 10 or int(labels.min()) < 0:
        raise TaskError(f"{directory}: {prefix} set is empty or has labels outside 0..9; {_HINT}")
    if images.shape[1:] != (28, 28):
        raise TaskError(f"{directory}: {prefix} images are {images.shape[1]}x{images.shape[2]}, not 28x28; {_HINT}")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype("int64"))


class FashionMNIST(Task):
    name = "fashion-mnist"
    summary = "the seed notebook's CIFAR network (1 input channel) on Fashion-MNIST; validation accuracy"
    metric = "val_acc"
    higher_is_better = True
    target = 0.75
    default_steps = 200
    sweep_steps = 150
    eval_every = 100
    weight_decay = 1e-3
    evaluation = (f"BatchNorm statistics recomputed on the first {BN_IMAGES} training images before each "
                  "evaluation: the running averages lag the weights, and after a few dozen steps an eval-mode "
                  "network with them scores near chance")
    batch_size = 32
    width = 96
    default_optimizers = ("muon", "adamw", "torch-muon")
    lrs = {"muon": 1e-1, "normuon": 3e-2, "adamuon": 1e-1, "muon+cwd": 1e-1, "normuon+cwd": 3e-2, "muon-kj": 3e-2, "adamw": 1e-2, "sgd": 1.0, "torch-muon": 3e-2}
    sweep_grid = {"muon": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0), "normuon": (3e-3, 1e-2, 3e-2, 1e-1), "adamuon": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1), "muon-kj": (1e-2, 3e-2, 1e-1), "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
                  "sgd": (1e-2, 3e-2, 1e-1, 3e-1), "torch-muon": (3e-2,)}
    # The classifier is named: the network is an nn.Sequential of the notebook's layer names, so
    # nothing but registration order would mark its last Linear as the output layer (param_groups
    # warns when order alone decides).
    routing = {"adamw": ("8.4.weight",)}
    # torch-muon's own lr is unused here: torch.optim.Muon takes only 2D matrices and this network's
    # Muon-routed tensors are all conv filters, so torch-muon is AdamW at the AdamW lr.

    def load(self, options: DataOptions, device: torch.device) -> ImageData:
        directory = options.data_dir or DEFAULT_DIR
        check_dir(directory, _HINT)
        train_x, train_y = load_idx_pair(directory, "train")
        val_x, val_y = load_idx_pair(directory, "t10k")
        return ImageData(train_x.to(device), train_y.to(device), to_float_images(val_x[:VAL_IMAGES]).to(device),
                         val_y[:VAL_IMAGES].to(device), Shuffler(len(train_x), self.batch_size))

    def model(self, data: ImageData | None) -> nn.Module:
        return Net(10, width=self.width, in_channels=1)

    def explain_model(self, options: DataOptions) -> nn.Module:
        return self.model(None)

    def steps_per_epoch(self, data: ImageData) -> int:
        return data.shuffler.per_epoch

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = random_flip(x, generator)
        x = random_crop(x, padding=4, generator=generator)
        return random_erasing(x, generator)

    def batch(self, data: ImageData, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = data.shuffler.indices(step, generator).to(data.train_images.device)
        x = to_float_images(data.train_images[idx])
        return self.augment(x, generator), data.train_labels[idx]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs), targets)

    def evaluate(self, model: nn.Module, data: ImageData) -> float:
        """Validation accuracy, with BatchNorm statistics of the current weights (`evaluation`)."""
        with batchnorm_statistics_from(model, to_float_images(data.train_images[:BN_IMAGES])):
            return accuracy(model, data.val_images, data.val_labels, batch_size=250)
