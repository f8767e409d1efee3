"""muonkit: the Muon optimizer toolkit for PyTorch."""

from .deferred import DeferredRelay, defer_relay
from .integrations import MuonFactory
from .layout import Layout
from .optimizer import Muon
from .orthogonalize import ORTHOGONALIZERS, orthogonalize
from .partition import Decision, explain, param_groups, route
from .qkclip import QKClip, attention_max_logits
from .scaling import SCALES, update_scale

__version__ = "0.1.0"

__all__ = [
    "Decision",
    "DeferredRelay",
    "Layout",
    "Muon",
    "MuonFactory",
    "ORTHOGONALIZERS",
    "QKClip",
    "SCALES",
    "__version__",
    "attention_max_logits",
    "defer_relay",
    "explain",
    "orthogonalize",
    "param_groups",
    "route",
    "update_scale",
]
