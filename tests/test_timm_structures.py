"""Routing on the three timm models that anchor it: resnet18, vit_tiny_patch16_224, convnext_atto.

timm cannot be installed here (it needs torchvision, which does not install beside this torch), so
the models are rebuilt with timm's structure, shapes and parameter names (timm 1.0:
timm/models/resnet.py, vision_transformer.py, convnext.py); the forward passes follow timm's.

Oracles: muonkit's rules (docs/API.md) written out per model, and timm's own rule for
create_optimizer_v2(model, "muon") written from its documentation (timm/optim/muon.py, Muon's
`_is_suitable_for_muon`; timm/optim/_param_groups.py for weight decay), so that the
disagreements docs/API.md lists are checked: exactly the input stem and the classifier head.
"""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import muonkit


# ---- resnet18 -------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, inplanes = (64, 128, 256, 512), 64
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean((2, 3)))


# ---- vit_tiny_patch16_224 -------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 16, 16)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, conv: bool = False):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.fc1 = layer(dim, hidden)
        self.fc2 = layer(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VitTiny(nn.Module):
    def __init__(self, num_classes: int = 1000, dim: int = 192, depth: int = 12, heads: int = 3):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 197, dim) * 0.02)
        self.blocks = nn.Sequential(*[VitBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---- convnext_atto --------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, conv_mlp: bool):
        super().__init__()
        self.conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim) if conv_mlp else nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, conv=conv_mlp)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.conv_dw(x)
        if self.conv_mlp:
            y = self.mlp(self.norm(y))
        else:
            y = self.mlp(self.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + y.mul(self.gamma.reshape(1, -1, 1, 1))


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, conv_mlp: bool):
        super().__init__()
        self.downsample = nn.Identity() if in_dim == dim else nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, 2))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, conv_mlp) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x.mean((2, 3), keepdim=True)).flatten(1))


class ConvNeXtAtto(nn.Module):
    """convnext_atto: depths (2, 2, 6, 2), dims (40, 80, 160, 320), conv_mlp=True (1x1 conv MLPs);
    conv_mlp=False gives the Linear MLPs of the larger ConvNeXts."""

    def __init__(self, num_classes: int = 1000, conv_mlp: bool = True):
        super().__init__()
        dims, depths = (40, 80, 160, 320), (2, 2, 6, 2)
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        self.stages = nn.Sequential(*[ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], conv_mlp)
                                      for i in range(4)])
        self.head = ClassifierHead(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


# ---- the oracles ----------------------------------------------------------------------------

MODELS = {
    "resnet18": (ResNet18, (3, 64, 64)),
    "vit_tiny_patch16_224": (VitTiny, (3, 224, 224)),
    "convnext_atto": (ConvNeXtAtto, (3, 64, 64)),
    "convnext_linear_mlp": (lambda: ConvNeXtAtto(conv_mlp=False), (3, 64, 64)),
}
STEMS = {"resnet18": "conv1.weight", "vit_tiny_patch16_224": "patch_embed.proj.weight",
         "convnext_atto": "stem.0.weight", "convnext_linear_mlp": "stem.0.weight"}
HEADS = {"resnet18": "fc.weight", "vit_tiny_patch16_224": "head.weight",
         "convnext_atto": "head.fc.weight", "convnext_linear_mlp": "head.fc.weight"}


def muonkit_expected(model_name: str, model: nn.Module) -> dict[str, str]:
    """docs/API.md's roles: hidden Linear/conv weights, depthwise filters included -> muon; the
    stem, the head, ViT's token and position tables, norms, biases and layer scales -> adamw."""
    expected = {}
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        hidden = isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(".weight")
        edge = name in (STEMS[model_name], HEADS[model_name])
        expected[name] = "muon" if hidden and not edge else "adamw"
    return expected


def depthwise_filters(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


def timm_suitable_for_muon(p: torch.Tensor, min_dim: int = 4, max_aspect: float = 128.0) -> bool:
    """timm's shape rule (Muon's _is_suitable_for_muon, as documented there): at least two
    non-unit dims, no unit size in the first two dims (position tables, depthwise filters),
    the (out, in*kernel) view's sides >= min_dim and their ratio <= max_aspect."""
    if p.ndim < 2 or sum(s > 1 for s in p.shape) < 2 or p.shape[0] == 1 or p.shape[1] == 1:
        return False
    rows, cols = p.shape[0], math.prod(p.shape[1:])
    return min(rows, cols) >= min_dim and max(rows, cols) / min(rows, cols) <= max_aspect


def timm_no_decay(model: nn.Module) -> set[str]:
    """timm's param_groups_weight_decay: 1D and '.bias' parameters, and the top-level
    model.no_weight_decay() names (fnmatch patterns)."""
    listed = getattr(model, "no_weight_decay", lambda: set())()
    return {n for n, p in model.named_parameters()
            if p.ndim <= 1 or n.endswith(".bias") or any(fnmatch.fnmatch(n, pat) for pat in listed)}


@pytest.fixture(scope="module", params=list(MODELS))
def built(request):
    torch.manual_seed(0)
    factory, image = MODELS[request.param]
    return request.param, factory(), (torch.randn(1, *image),)


@pytest.mark.parametrize("with_inputs", [False, True], ids=["registration", "execution"])
def test_routing_follows_the_roles(built, with_inputs):
    name, model, inputs = built
    kw = {"example_inputs": inputs} if with_inputs else {}
    got = {d.name: d.optimizer for d in muonkit.route(model, **kw)}
    assert got == muonkit_expected(name, model)


def test_vit_tables_go_to_adamw_for_their_use():
    torch.manual_seed(0)
    decisions = {d.name: d for d in muonkit.route(VitTiny(), example_inputs=(torch.randn(1, 3, 224, 224),))}
    assert "aten.add" in decisions["pos_embed"].reason and "aten.cat" in decisions["cls_token"].reason
    assert decisions["pos_embed"].no_decay == decisions["cls_token"].no_decay == "model.no_weight_decay()"


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_depthwise_convnext_filters_are_one_matrix(conv_mlp):
    d = {d.name: d for d in muonkit.route(ConvNeXtAtto(conv_mlp=conv_mlp))}["stages.2.blocks.0.conv_dw.weight"]
    assert d.optimizer == "muon" and d.layout == "conv" and "depthwise" in d.reason and "160x49" in d.reason


def test_disagreement_with_timm_is_the_stem_the_head_and_depthwise_filters(built):
    """docs/API.md: timm's create_optimizer_v2(model, "muon") decides by shape and sends the stem
    and the classifier head to Muon and depthwise filters (a unit second dim) to AdamW; muonkit does
    the opposite on all three. Everything else agrees, and so do the weight-decay exclusions (no
    parameter here is a >=2D bias)."""
    name, model, inputs = built
    decisions = muonkit.route(model, example_inputs=inputs)
    ours = {d.name: d.optimizer for d in decisions}
    timm = {n: "muon" if timm_suitable_for_muon(p) else "adamw" for n, p in model.named_parameters()}
    depthwise = depthwise_filters(model)
    assert {n for n in ours if ours[n] != timm[n]} == {STEMS[name], HEADS[name]} | depthwise
    assert timm[STEMS[name]] == timm[HEADS[name]] == "muon"
    assert all(timm[n] == "adamw" and ours[n] == "muon" for n in depthwise)
    assert {d.name for d in decisions if d.no_decay} == timm_no_decay(model)


# Defects found in other Muon implementations (the peers of docs/references.md section 10); each
# test names the peer and the defect it guards against, so that muonkit never has it.


def test_routing_does_not_use_name_substrings():
    # peer 001 routes by "embed" in the name: a Linear named "embedder_proj" went to AdamW and an
    # nn.Embedding named "tokens" went to Muon.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(100, 32)
            self.embedder_proj = nn.Linear(32, 32)
            self.out = nn.Linear(32, 100)

        def forward(self, x):
            return self.out(self.embedder_proj(self.tokens(x)))

    route = {d.name: d.optimizer for d in muonkit.route(Model())}
    assert route["tokens.weight"] == "adamw"
    assert route["embedder_proj.weight"] == "muon"
    assert route["out.weight"] == "adamw"
