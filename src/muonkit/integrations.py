"""muonkit in training frameworks that build the optimizer themselves.

Hugging Face transformers (5.x) takes `Trainer(optimizer_cls_and_kwargs=(factory, kwargs))`; when
`factory` is not a torch.optim.Optimizer subclass, the Trainer calls `factory()(model, **kwargs)`.
`MuonFactory` is such a factory. Nothing here imports transformers or lightning.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .optimizer import Muon
from .partition import ROUTING_KEYWORDS, param_groups


class MuonFactory:
    """Builds `muonkit.Muon(muonkit.param_groups(model, **routing), **options)` for a model.

    Keyword arguments of `param_groups` (muon=, adamw=, predicate=, example_inputs=, min_size=,
    exclude_from_decay=, muon_options=, adamw_options=) route the parameters; every other keyword
    goes to `Muon` (lr=, weight_decay=, scale=, ...). They can be given when the factory is made,
    when it is called, or both (the call wins).

    Args:
        **defaults: keyword arguments used by every call.

    Example:
        >>> trainer = transformers.Trainer(
        ...     model=model, args=args, train_dataset=data,
        ...     optimizer_cls_and_kwargs=(muonkit.MuonFactory, {"lr": 3e-3, "weight_decay": 0.1}))
        >>> opt = muonkit.MuonFactory(adamw=["pos_embed"])(model, lr=1e-3)
    """

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults

    def __call__(self, model: nn.Module, **kwargs: Any) -> Muon:
        """A muonkit.Muon over `model`'s parameters, routed by muonkit.param_groups."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"MuonFactory: expected the model (a torch.nn.Module), got {type(model).__name__}")
        options = {**self.defaults, **kwargs}
        routing = {k: options.pop(k) for k in ROUTING_KEYWORDS if k in options}
        return Muon(param_groups(model, **routing), **options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"MuonFactory({args})"
