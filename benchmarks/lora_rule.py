"""Muon or AdamW for LoRA adapters: the measurement behind muonkit's LoRA routing rule.

A tiny Llama (transformers, built from a config) is pretrained with AdamW on the Python standard
library's source (bytes), then fine-tuned with PEFT LoRA (r=8 on every projection, base frozen) on
English prose (the text of pydoc_data.topics, a different distribution). The adapters go either to
Muon or to AdamW inside one muonkit.Muon (lr and adamw_lr equal, weight_decay 0); each optimizer is
swept over lrs with 3 seeds (LoRA init and batch order). Prints the held-out loss (nats/byte) of
the fine-tuned model: mean and std over seeds, per optimizer and lr, and the best of each.

    PYTHONPATH=src python benchmarks/lora_rule.py            # ~10 min on 2 shared CPU cores
    PYTHONPATH=src python benchmarks/lora_rule.py --steps 20 --lrs 3e-3 --seeds 0   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import muonkit
from muonkit.tasks.data import stdlib_corpus

CONTEXT, BATCH = 64, 16


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batch(data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=generator)
    return torch.stack([data[s: s + CONTEXT + 1] for s in starts.tolist()])


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    value = statistics.fmean(loss_of(model, batch(data, g)).item() for _ in range(8))
    model.train()
    return value


def pretrained(steps: int) -> dict[str, torch.Tensor]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT)
    model = transformers.LlamaForCausalLM(cfg)
    data = encode(stdlib_corpus(400_000))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = loss_of(model, batch(data, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, evaluate(model, data)


def finetune(base_state, cfg, data, val, adapters: str, lr: float, seed: int, steps: int) -> float:
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(base_state)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    groups = muonkit.param_groups(model, predicate=lambda name, p, m: adapters if "lora_" in name else None)
    opt = muonkit.Muon(groups, lr=lr, adamw_lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = loss_of(model, batch(data, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return evaluate(model, val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import pydoc_data.topics

    start = time.time()
    model, pre_loss = pretrained(args.pretrain_steps)
    prose = encode("\n".join(pydoc_data.topics.topics.values()))
    cut = int(len(prose) * 0.9)
    data, val = prose[:cut], prose[cut:]
    base_val = evaluate(model, val)
    print(f"pretrained {args.pretrain_steps} steps: loss {pre_loss:.3f} on the source; {base_val:.3f} on the prose before LoRA")
    print(f"{'adapters':8s} {'lr':>7s}  {'val loss (mean ± std over seeds ' + str(args.seeds) + ')'}")
    best = {}
    for adapters in ("muon", "adamw"):
        for lr in args.lrs:
            losses = [finetune(model.state_dict(), model.config, data, val, adapters, lr, s, args.steps) for s in args.seeds]
            mean = statistics.fmean(losses)
            std = statistics.stdev(losses) if len(losses) > 1 else 0.0
            print(f"{adapters:8s} {lr:7.0e}  {mean:.4f} ± {std:.4f}   ({', '.join(f'{x:.4f}' for x in losses)})", flush=True)
            if adapters not in best or mean < best[adapters][1]:
                best[adapters] = (lr, mean, std)
    for adapters, (lr, mean, std) in best.items():
        print(f"best {adapters}: lr {lr:g}, {mean:.4f} ± {std:.4f}")
    print(f"torch {torch.__version__}, 1 thread, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
