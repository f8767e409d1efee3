"""muonkit with the real libraries people train with: transformers (Conv1D, GPT-2, Trainer) and
Lightning. They come with the `integrations` extra, which scripts/setup.sh installs.

Oracles: the real transformers.pytorch_utils.Conv1D and GPT2LMHeadModel; a float64 SVD polar
factor for the Conv1D update; for resumes, the same run without interruption (bit for bit).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

# transformers loads a model class or the Trainer on first use (its lazy module): ~3 CPU-s that the
# pytest-xdist worker which does not run this file would otherwise pay at collection.
import transformers

import muonkit

SRC = Path(__file__).resolve().parents[1] / "src"
VOCAB, CONTEXT = 97, 16


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=CONTEXT,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


# ---- MuonFactory ----------------------------------------------------------------------------

def test_factory_routes_and_passes_the_rest_to_muon():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    factory = muonkit.MuonFactory(adamw=["1.weight"], lr=0.5)
    opt = factory(model, lr=0.02, scale="mup", muon_options={"rms": 0.3})
    expected = muonkit.Muon(muonkit.param_groups(model, adamw=["1.weight"], muon_options={"rms": 0.3}),
                            lr=0.02, scale="mup")
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in expected.param_groups]
    assert [n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]] == ["2.weight"]
    assert "MuonFactory(adamw=['1.weight'], lr=0.5)" == repr(factory)


def test_factory_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="expected the model .* got list"):
        muonkit.MuonFactory()([torch.zeros(2, 2)], lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lrr'"):
        muonkit.MuonFactory()(nn.Linear(2, 2), lrr=0.1)


# ---- transformers' Conv1D -------------------------------------------------------------------

def test_conv1d_is_read_as_stored_in_out():
    """Conv1D(nf=256, nx=64) stores its weight (64, 256) = (in, out): the matrix is 256 x 64."""
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.Linear(8, 64), Conv1D(256, 64), nn.ReLU(), Conv1D(64, 256), nn.Linear(64, 2))
    decisions = {d.name: d for d in muonkit.route(model)}
    for name, (rows, cols) in {"1.weight": (256, 64), "3.weight": (64, 256)}.items():
        d = decisions[name]
        assert d.optimizer == "muon" and d.layout == muonkit.Layout(rows=(1,), cols=(0,))
        assert f"transformers Conv1D weight {rows}x{cols}" in d.reason and "stored (in, out)" in d.reason
        assert muonkit.layout.matrix_shape(model.get_parameter(name).shape, d.layout) == (1, rows, cols)


def test_gpt2_routing():
    """Embeddings and the tied head -> AdamW; every Conv1D (attention and MLP) -> Muon with the
    (in, out) layout, the fused c_attn cut into q, k and v; norms and biases -> AdamW without decay."""
    model = tiny_gpt2()
    decisions = muonkit.route(model, example_inputs=(torch.randint(0, VOCAB, (2, CONTEXT)),))
    for d in decisions:
        is_conv1d = d.name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        assert d.optimizer == ("muon" if is_conv1d else "adamw"), d
        if is_conv1d:
            blocks = ((1, 3),) if d.name.endswith("c_attn.weight") else ()
            assert d.layout == muonkit.Layout(rows=(1,), cols=(0,), blocks=blocks), d
        assert (d.no_decay == "1D") == (len(d.shape) == 1), d
    assert {d.name for d in decisions} >= {"transformer.wte.weight", "transformer.wpe.weight"}


def test_conv1d_update_has_the_keller_jordan_scale_of_its_true_shape():
    """One step on GPT-2's c_fc (stored 64 x 256, a 256 x 64 map): the update is
    -lr * sqrt(256/64) * polar(G^T)^T, whose RMS is lr * 2/sqrt(256) = 0.125 lr (read as the
    stored 64 x 256 it would be lr * 1/sqrt(256) = 0.0625 lr)."""
    model = tiny_gpt2()
    weight = model.transformer.h[0].mlp.c_fc.weight
    groups = muonkit.param_groups(model, muon_options={"scale": "keller_jordan", "orthogonalizer": "svd"})
    opt = muonkit.Muon(groups, lr=0.01, weight_decay=0.0)
    grad = torch.randn_like(weight)
    weight.grad = grad.clone()
    before = weight.detach().clone()
    opt.step()
    u, _, vh = torch.linalg.svd(grad.double().T, full_matrices=False)
    expected = before.double() - 0.01 * 2.0 * (u @ vh).T
    torch.testing.assert_close(weight.detach().double(), expected, rtol=0, atol=1e-7)
    rms = (weight.detach() - before).pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.01 * 0.125, rel=1e-3)


# ---- Hugging Face Trainer -------------------------------------------------------------------

class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24):
        self.ids = torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_trainer(model: transformers.GPT2LMHeadModel, out: Path) -> transformers.Trainer:
    transformers.logging.set_verbosity_error()
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2,
                                          per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0,
                                          logging_steps=1000, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                optimizer_cls_and_kwargs=(muonkit.MuonFactory, {"lr": 3e-3, "weight_decay": 0.1}))


def test_hf_trainer_with_the_factory_resumes_bit_for_bit(tmp_path):
    full = tiny_gpt2()
    trainer = hf_trainer(full, tmp_path / "full")
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(opt, muonkit.Muon)
    muon_names = {n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]}
    assert "transformer.h.0.mlp.c_fc.weight" in muon_names and "transformer.wte.weight" not in muon_names
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}

    resumed = tiny_gpt2()
    hf_trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    start = tiny_gpt2().state_dict()
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert any(not torch.equal(start[n], v) for n, v in full.state_dict().items())


def test_hf_trainer_with_muon_as_a_class_fails_loudly(tmp_path):
    """docs/API.md: (muonkit.Muon, kwargs) makes the Trainer pass its own groups of bare tensors,
    biases included, without routing: Muon refuses the first 1D one instead of misusing it."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args,
                                   optimizer_cls_and_kwargs=(muonkit.Muon, {"lr": 3e-3}))
    with pytest.raises(ValueError, match=r"Muon needs a matrix .*optimizer_cls_and_kwargs=\(muonkit.MuonFactory, kwargs\)"):
        trainer.create_optimizer()


# ---- Lightning ------------------------------------------------------------------------------

@functools.cache
def classifier_class() -> type:
    """The LightningModule of these tests, defined on first use: importing lightning takes ~3.5 CPU-s,
    which every pytest-xdist worker would pay at collection for tests that run on one of them."""
    import lightning

    class Classifier(lightning.LightningModule):
        """The recipe in docs/API.md: one muonkit.Muon and a per-step scheduler."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.ReLU(),
                                     nn.Linear(32, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = muonkit.Muon(muonkit.param_groups(self), lr=1e-2, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Classifier


def batches():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 8, generator=g), torch.randint(0, 4, (12,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def lightning_trainer(out: Path) -> lightning.Trainer:
    import lightning

    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_top_k=-1)
    return lightning.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=out, callbacks=[checkpoints])


def test_lightning_fit_and_resume_bit_for_bit(tmp_path):
    Classifier = classifier_class()
    full = Classifier()
    trainer = lightning_trainer(tmp_path / "full")
    trainer.fit(full, batches())
    assert isinstance(trainer.optimizers[0], muonkit.Muon)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    checkpoint = next((tmp_path / "full").glob("*step=3.ckpt"))

    resumed = Classifier()
    lightning_trainer(tmp_path / "resumed").fit(resumed, batches(), ckpt_path=checkpoint)
    start = Classifier()
    for (name, a), b, c in zip(full.named_parameters(), resumed.parameters(), start.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(full.parameters(), start.parameters()))


# ---- muonkit without them -------------------------------------------------------------------

def test_muonkit_imports_and_routes_without_the_integrations():
    """In a fresh interpreter where transformers, accelerate and lightning cannot be imported."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        BLOCKED = ("transformers", "accelerate", "lightning", "pytorch_lightning")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        import torch, muonkit
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        muonkit.explain(model, example_inputs=(torch.randn(2, 4),), file=None)
        opt = muonkit.MuonFactory()(model, lr=0.01)
        assert isinstance(opt, muonkit.Muon)
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
