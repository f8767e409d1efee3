"""Optimizer memory: state bytes per parameter byte, and the peak extra memory of one step.

Run:
    python benchmarks/bench_memory.py [--threads 2] [--skip-torch-muon] [--write-results]

Prints two Markdown tables. State: bytes of optimizer state per byte of parameters for one
GPT-2-small block (six matrices on Muon, eight vectors on AdamW) after a step. Peak: the largest
number of bytes of tensors allocated during one step and alive at once, beyond parameters,
gradients and existing state (counted by a dispatch mode that follows every storage an op
allocates until it is freed; warm-up step first, so lazily created state is not counted), for the
largest shapes of benchmarks/bench_step.py, as bytes and as multiples of the parameter's size.
torch.optim.Muon's bf16 step takes about a minute per 768x3072 matrix on CPUs without AVX-512
BF16; --skip-torch-muon leaves it out.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from common import setup, table, write_results

import muonkit
from muonkit.diagnostics import LiveBytes

LR = 0.02


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_ratio(make, params: list[nn.Parameter]) -> float:
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = [t for s in opt.state.values() for t in s.values()]
    return _tensor_bytes(state) / _tensor_bytes(params)


def peak_extra(make, shape: tuple[int, ...]) -> tuple[int, int]:
    p = nn.Parameter(torch.randn(shape) * 0.02)
    p.grad = torch.randn_like(p)
    opt = make([p])
    opt.step()
    with torch.no_grad(), LiveBytes() as tracker:
        opt.step()
    return tracker.peak, p.numel() * p.element_size()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-torch-muon", action="store_true")
    parser.add_argument("--write-results", action="store_true", help="also write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    out = [f"Machine: {setup(args.threads)}; {time.strftime('%Y-%m-%d %H:%M')}"]
    print(out[0])
    torch.manual_seed(0)
    matrices = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    vectors = [(768,)] * 4 + [(2304,), (768,), (3072,), (768,)]

    def block():
        return [nn.Parameter(torch.randn(s) * 0.02) for s in matrices], [nn.Parameter(torch.zeros(s)) for s in vectors]

    makers = {
        "muonkit Muon (Muon groups)": lambda ps: muonkit.Muon(ps, lr=LR),
        "muonkit Muon (AdamW groups)": lambda ps: muonkit.Muon([{"params": ps, "use_muon": False}], lr=LR),
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=LR),
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=LR),
    }
    rows = []
    for name, make in makers.items():
        mats, vecs = block()
        params = vecs if "AdamW groups" in name else mats
        if name == "torch.optim.Muon" and args.skip_torch_muon:
            continue
        if name == "torch.optim.Muon":
            params = [nn.Parameter(torch.randn(64, 256) * 0.02)]  # state layout only; bf16 NS is slow
        rows.append([name, state_ratio(make, params)])
    out.append("\nOptimizer state, bytes per parameter byte (one GPT-2-small block)\n"
               + table(["optimizer", "state bytes / param bytes"], rows))
    print(out[-1])

    shapes = [(768, 3072), (3072, 768), (1024, 4096), (64, 256, 1024)]
    peak_makers = {
        "muonkit Muon": lambda ps: muonkit.Muon(ps, lr=LR),
        "muonkit Muon, keller_jordan": lambda ps: muonkit.Muon(ps, lr=LR, orthogonalizer="keller_jordan"),
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=LR),
    }
    if not args.skip_torch_muon:
        peak_makers["torch.optim.Muon (bf16)"] = lambda ps: torch.optim.Muon(ps, lr=LR)
    rows = []
    for shape in shapes:
        for name, make in peak_makers.items():
            if name.startswith("torch.optim.Muon") and (len(shape) != 2 or shape[0] * shape[1] > 768 * 3072):
                continue  # 2D only; and a 1024x4096 bf16 step takes minutes here
            peak, size = peak_extra(make, shape)
            rows.append([str(shape), name, f"{peak / 2**20:.1f} MiB", peak / size])
    out.append("\nPeak extra memory of one step (beyond params, grads and state)\n"
               + table(["shape", "optimizer", "peak extra", "x param size"], rows))
    print(out[-1])
    if args.write_results:
        command = "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results("SPEED-MEMORY", f"### Memory (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
