"""Where LoRA is injected: :mod:`peft` wraps the chosen linear layers of a module.

``inject_lora`` turns an adapter's target names (relative to a block or part, e.g.
``attn.qkv``) into one anchored regular expression over the module's names and lets
``peft.inject_adapter_in_model`` wrap the matching ``nn.Linear`` layers (the original stays
as ``base_layer``; ``B`` starts at zero, so the wrapped module is unchanged until trained).
Named LoRA adapters are then switched, merged and removed by
:class:`~scfm_adapt.module.AdaptableMixin` through :func:`tuner_layers`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

DEFAULT_TARGETS = {
    "encoder": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "dit": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "decoder": ("fc", "scale_head"),
}
# Module-name prefixes of each part; the DiT's EMA copy is adapted like the DiT.
_PREFIX = {
    "encoder": r"encoder(?:\.blocks\.\d+)?",
    "dit": r"dit(?:_ema)?(?:\.blocks\.\d+)?",
    "decoder": r"decoder",
}


def is_tuner(module: nn.Module) -> bool:
    """Whether ``module`` is a peft wrapper (a LoRA layer around a base layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def tuner_layers(module: nn.Module) -> list[nn.Module]:
    """Every peft wrapper inside ``module``."""
    return [m for m in module.modules() if is_tuner(m)]


def linear_names(module: nn.Module) -> list[str]:
    """Linear layers by canonical name (a peft-wrapped layer counts, its base does not)."""
    return [
        n
        for n, m in module.named_modules()
        if (isinstance(m, nn.Linear) and not n.endswith(".base_layer"))
        or isinstance(getattr(m, "base_layer", None), nn.Linear)
    ]


def default_targets(module: nn.Module, part: str) -> tuple[str, ...]:
    """LoRA targets of ``part``; an encoder names its own (an external BERT's differ)."""
    if part == "encoder":
        return tuple(getattr(module.encoder, "lora_targets", DEFAULT_TARGETS["encoder"]))
    return DEFAULT_TARGETS[part]


def lora_pattern(
    module: nn.Module, parts: Sequence[str], target_modules: Sequence[str] | None = None
) -> str:
    """One regular expression matching the full names of the target layers of ``parts``
    (``target_modules``, names relative to a block or part; default: each part's own)."""
    alts = []
    linear = linear_names(module)
    for part in parts:
        targets = target_modules or default_targets(module, part)
        names = "|".join(re.escape(t) for t in targets)
        pattern = rf"^{_PREFIX[part]}\.(?:{names})$"
        if not any(re.match(pattern, n) for n in linear):
            there = [n for n in linear if n.startswith(part)]
            raise ValueError(
                f"LoRA targets {list(targets)} match no linear layer of the {part}; "
                f"linear layers there: {there[:8]}"
            )
        alts.append(pattern[1:-1])
    return "^(?:" + "|".join(alts) + ")$"


def inject_lora(
    module: nn.Module,
    name: str,
    parts: Sequence[str],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None = None,
) -> None:
    """Wrap the target layers of ``parts`` of ``module`` with LoRA adapter ``name``:
    ``W x + (alpha / rank) B A x`` with ``B`` zero, so nothing changes until trained."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_pattern(module, parts, target_modules),
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, module, adapter_name=name)


def unwrap_lora(module: nn.Module, only_empty: bool = True) -> None:
    """Put back the plain linear layer of peft's wrappers: those holding no adapter any more
    (``only_empty``), so that parameter names (and saved checkpoints) are those of the base,
    or every wrapper (merge an adapter first to keep it, e.g. before quantization)."""
    for name, layer in [(n, m) for n, m in module.named_modules() if is_tuner(m)]:
        if not only_empty or len(layer.lora_A) == 0:
            parent, _, child = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, child, layer.get_base_layer())
