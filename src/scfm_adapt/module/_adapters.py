"""Parameter-efficient adaptation of an :class:`~scfm_adapt.module.SCFMModule`.

One pretrained module carries any number of *named adapters*; one is active at a time.
Strategies:

``"linear_probe"``
    Nothing in the backbone trains (a task head, or new category rows, train on top).
``"lora"``
    Low-rank updates of linear layers, injected by :mod:`peft` (default targets: the
    attention and MLP projections of the encoder's transformer and of the DiT).
``"adapter"``
    Bottleneck adapters after the attention and MLP sublayers of every block.
``"partial"``
    The last ``n_blocks`` blocks, the norms and the output layers train.
``"full"``
    Every weight of the selected parts trains.

Every added path starts as an exact no-op (LoRA's ``B`` and the adapters' up projections
are zero), so an adapted module gives bit-identical outputs until it is trained. The
``partial`` and ``full`` strategies train base weights in place; their pretrained values are
kept, so switching adapters restores them exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ._lora import inject_lora, tuner_layers, unwrap_lora

STRATEGIES = ("linear_probe", "lora", "adapter", "partial", "full")
PARTS = ("encoder", "decoder", "dit")
_PARAM_PARTS = {"encoder": ("encoder.",), "decoder": ("decoder.", "px_r"), "dit": ("dit.",)}
STAGE_PARTS = {"vae": ("encoder", "decoder"), "prior": ("dit",)}
ADAPT_PREFIX = "__adaptation__/"  # checkpoint keys of parked adapter weights


@dataclass
class AdapterSpec:
    """What one named adapter is: enough to rebuild its structure on a fresh module."""

    name: str
    strategy: str
    parts: tuple[str, ...]
    options: dict = field(default_factory=dict)
    # base weights the adapter trains in place: partial/full, or a LoRA/bottleneck adapter's
    # ``train_params``; parked and restored when adapters switch
    param_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["parts"] = list(self.parts)
        return d

    def add_kwargs(self) -> dict:
        """Keyword arguments of ``add_adapter`` that rebuild this adapter."""
        o = self.options
        kwargs = {k: o[k] for k in ("rank", "alpha", "dropout", "bottleneck", "n_blocks") if k in o}
        if o.get("target_modules"):
            kwargs["target_modules"] = tuple(o["target_modules"])
        if o.get("train_params"):
            kwargs["train_params"] = tuple(o["train_params"])
        return kwargs

    @classmethod
    def from_json(cls, d: dict) -> AdapterSpec:
        return cls(
            d["name"], d["strategy"], tuple(d["parts"]), d.get("options", {}), d["param_names"]
        )


def _is_added(name: str) -> bool:
    """Parameters that adapters add (never base weights)."""
    return "lora_" in name or ".adapters." in name


def canonical(name: str) -> str:
    """Parameter name without peft's ``.base_layer`` (stable as LoRA adapters come and go)."""
    return name.replace(".base_layer", "")


def _neutral_key(param: str, adapter: str) -> str | None:
    """``param``'s key in an adapter checkpoint, with the adapter's name replaced by ``@``
    (so it loads under any name); ``None`` when ``param`` is not that adapter's."""
    for tag in (f"lora_A.{adapter}.", f"lora_B.{adapter}.", f".adapters.{adapter}."):
        if tag in param:
            return param.replace(tag, tag.replace(f"{adapter}.", "@."))
    return None


def is_extension(name: str) -> bool:
    """Rows of new categories added by query mapping (see ``extend_categories``)."""
    return name.endswith(".extra") or name == "px_r_extra"


class AdaptableMixin:
    """Named adapters for :class:`~scfm_adapt.module.SCFMModule` (mixed into it)."""

    def _init_adaptation(self) -> None:
        self.adapter_specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self._base_values: dict[str, dict[str, torch.Tensor]] = {}
        self._tuned_values: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ create
    def add_adapter(
        self,
        name: str = "default",
        strategy: str = "lora",
        parts: tuple[str, ...] | list[str] = ("encoder", "dit"),
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: tuple[str, ...] | list[str] | None = None,
        bottleneck: int = 16,
        n_blocks: int = 1,
        train_params: Sequence[str] = (),
    ) -> AdapterSpec:
        """Create adapter ``name`` with ``strategy`` on ``parts`` and make it active.

        ``train_params`` (LoRA and bottleneck adapters): full names of base weights that the
        adapter also trains in place, such as a pathway encoder's gene → pathway weights,
        which are not linear layers LoRA could wrap. Like partial unfreezing, their
        pretrained values are kept and restored whenever another adapter (or none) is
        active, and they are saved with the adapter."""
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
        parts = tuple(parts)
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"parts={parts!r}: each must be one of {PARTS}.")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise ValueError(
                f"Adapter name {name!r} must start with a letter and hold only letters, "
                "digits and underscores."
            )
        if name in self.adapter_specs:
            raise ValueError(
                f"An adapter named {name!r} exists already; pick another name or call "
                f"delete_adapter({name!r}) first."
            )
        if strategy == "adapter" and "decoder" in parts:
            raise ValueError(
                "Bottleneck adapters sit inside transformer blocks; the decoder has none. "
                "Use parts=('encoder', 'dit') or strategy='lora' for the decoder."
            )
        if train_params and strategy not in ("lora", "adapter"):
            raise ValueError(
                f"train_params applies to LoRA and bottleneck adapters; a {strategy!r} adapter "
                "chooses the base weights it trains itself."
            )
        known = self._canonical_params()
        unknown = [p for p in train_params if canonical(p) not in known]
        if unknown:
            raise ValueError(f"train_params {unknown} are not parameters of this module.")
        self.set_adapter(None)  # partial/full adapters snapshot pristine base weights
        options: dict = {}
        spec = AdapterSpec(name, strategy, parts, options)
        if train_params:
            options["train_params"] = [canonical(p) for p in train_params]
            spec.param_names = list(options["train_params"])
            self._base_values[name] = self._copy_params(spec.param_names)
        if strategy == "lora":
            options.update(rank=rank, alpha=alpha, dropout=dropout)
            options["target_modules"] = list(target_modules) if target_modules else None
            inject_lora(
                self,
                name,
                parts,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                target_modules=options["target_modules"],
            )
            self._sync_ema_added(spec.name)
        elif strategy == "adapter":
            options.update(bottleneck=bottleneck, dropout=dropout)
            for block in self._blocks(parts):
                block.add_adapter(name, bottleneck, dropout)
            self._sync_ema_added(name)
        elif strategy in ("partial", "full"):
            if strategy == "partial":
                options["n_blocks"] = n_blocks
            spec.param_names = self._base_param_names(spec)
            self._base_values[name] = self._copy_params(spec.param_names)
        self.adapter_specs[name] = spec
        self.set_adapter(name)
        return spec

    def _blocks(self, parts) -> list[nn.Module]:
        blocks = []
        if "encoder" in parts:
            blocks += list(self.encoder.blocks)
        if "dit" in parts:
            blocks += list(self.dit.blocks) + list(self.dit_ema.blocks)
        return blocks

    def _pretrained_external(self, name: str) -> bool:
        """Weights loaded from an external checkpoint: frozen unless an adapter trains them."""
        prefixes = getattr(self.encoder, "pretrained_prefixes", ())
        return bool(prefixes) and name.startswith(tuple(f"encoder.{p}" for p in prefixes))

    @torch.no_grad()
    def _sync_ema_added(self, name: str) -> None:
        """Give the EMA copy of the DiT the same initial adapter weights as the DiT."""
        live = dict(self.dit.named_parameters())
        for n, p in self.dit_ema.named_parameters():
            if _is_added(n) and f".{name}." in n and n in live:
                p.copy_(live[n])

    def _base_param_names(self, spec: AdapterSpec) -> list[str]:
        names = []
        k = spec.options.get("n_blocks", 0)
        if spec.strategy == "partial" and k < 1:
            raise ValueError(f"n_blocks={k}: partial unfreezing needs at least one block.")
        for n, _ in self.named_parameters():
            if _is_added(n) or is_extension(n):
                continue
            part = next((pt for pt in spec.parts if n.startswith(_PARAM_PARTS[pt])), None)
            if part is None:
                continue
            if spec.strategy == "full" or self._in_top(n, part, k):
                names.append(canonical(n))
        return names

    def _in_top(self, n: str, part: str, k: int) -> bool:
        """Partial unfreezing: the last ``k`` blocks, every norm and the output layers."""
        if part == "encoder":
            depth = len(self.encoder.blocks)
            m = re.match(r"encoder\.blocks\.(\d+)\.", n)
            if m:
                return int(m.group(1)) >= depth - k or bool(re.search(r"\.(norm|LayerNorm)", n))
            return n.startswith(("encoder.norm", "encoder.head", "encoder.pool"))
        if part == "dit":
            depth = len(self.dit.blocks)
            m = re.match(r"dit\.blocks\.(\d+)\.", n)
            if m:
                return int(m.group(1)) >= depth - k
            return n.startswith("dit.final")
        return n.startswith(("decoder.norm", "decoder.scale_head", "decoder.dropout_head", "px_r"))

    def _canonical_params(self) -> dict[str, nn.Parameter]:
        return {canonical(n): p for n, p in self.named_parameters()}

    def _copy_params(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = self._canonical_params()
        return {n: params[n].detach().clone() for n in names}

    @torch.no_grad()
    def _write_params(self, values: dict[str, torch.Tensor]) -> None:
        params = self._canonical_params()
        for n, v in values.items():
            params[n].copy_(v)

    # ------------------------------------------------------------------ switch
    def set_adapter(self, name: str | None) -> None:
        """Make adapter ``name`` the active one (``None``: the plain pretrained model)."""
        if name is not None and name not in self.adapter_specs:
            raise KeyError(
                f"No adapter named {name!r}; adapters: {list(self.adapter_specs) or 'none'}."
            )
        current = self.active_adapter
        if current != name and tuner_layers(self) and self.merged:
            self.unmerge_adapter()  # before any base weight is parked or restored
        if current is not None and current in self.adapter_specs and current != name:
            spec = self.adapter_specs[current]
            if spec.param_names:  # park the tuned weights, restore base
                self._tuned_values[current] = self._copy_params(spec.param_names)
                self._write_params(self._base_values[current])
        spec = self.adapter_specs.get(name) if name is not None else None
        if spec is not None and spec.param_names and current != name:
            if name in self._tuned_values:
                self._write_params(self._tuned_values.pop(name))
        for layer in tuner_layers(self):
            if spec is not None and spec.strategy == "lora" and name in layer.lora_A:
                layer.enable_adapters(True)
                layer.set_adapter(name)
            else:
                layer.enable_adapters(False)  # also unmerges a merged adapter
        for block in self._blocks(PARTS):
            on = spec is not None and spec.strategy == "adapter" and name in block.adapters
            block.active_adapter = name if on else None
        self.active_adapter = name
        if hasattr(self, "stage"):
            self.set_stage(self.stage)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the pretrained weights are restored if it was active)."""
        if name not in self.adapter_specs:
            raise KeyError(f"No adapter named {name!r}; adapters: {list(self.adapter_specs)}.")
        if self.active_adapter == name:
            self.set_adapter(None)
        spec = self.adapter_specs.pop(name)
        if spec.strategy == "lora":
            for layer in tuner_layers(self):
                if name in layer.lora_A:
                    layer.delete_adapter(name)
            unwrap_lora(self)
        elif spec.strategy == "adapter":
            for block in self._blocks(PARTS):
                if name in block.adapters:
                    del block.adapters[name]
        self._base_values.pop(name, None)
        self._tuned_values.pop(name, None)

    # ------------------------------------------------------------------ merge
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in tuner_layers(self))

    def merge_adapter(self) -> None:
        """Fold the active LoRA adapter into the base weights (faster inference)."""
        spec = self._active_spec("merge")
        if spec.strategy != "lora":
            raise ValueError(
                f"Adapter {spec.name!r} is a {spec.strategy!r} adapter; only LoRA updates are "
                "linear and can be merged ("
                + (
                    "bottleneck adapters are non-linear)."
                    if spec.strategy == "adapter"
                    else "this strategy trains the base weights in place already)."
                )
            )
        for layer in tuner_layers(self):
            if spec.name in layer.lora_A and not layer.merged:
                layer.merge(adapter_names=[spec.name])

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`: base weights return to their pretrained values."""
        if not self.merged:
            raise ValueError("No adapter is merged.")
        for layer in tuner_layers(self):
            if layer.merged:
                layer.unmerge()

    def _active_spec(self, what: str) -> AdapterSpec:
        if self.active_adapter is None:
            raise ValueError(f"No active adapter to {what}; call set_adapter(name) first.")
        return self.adapter_specs[self.active_adapter]

    # ------------------------------------------------------------------ trainability
    def trainable_mask(self, stage: str) -> dict[str, bool]:
        """Which parameters train in ``stage`` under the active adapter (name → bool)."""
        spec = self.adapter_specs.get(self.active_adapter) if self.active_adapter else None
        prefixes = tuple(p for part in STAGE_PARTS[stage] for p in _PARAM_PARTS[part])
        names = set(spec.param_names) if spec is not None else set()
        out = {}
        for n, _ in self.named_parameters():
            if n.startswith("dit_ema.") or not n.startswith(prefixes):
                out[n] = False
            elif spec is None:
                out[n] = not _is_added(n) and not self._pretrained_external(n)
            elif spec.strategy == "lora":
                out[n] = f"lora_A.{spec.name}." in n or f"lora_B.{spec.name}." in n
                out[n] = out[n] or canonical(n) in names  # train_params
            elif spec.strategy == "adapter":
                out[n] = f".adapters.{spec.name}." in n or canonical(n) in names
            else:
                out[n] = canonical(n) in names
            out[n] = out[n] or (spec is not None and is_extension(n) and n.startswith(prefixes))
        return out

    def parameter_report(self, stage: str | None = None) -> dict[str, int | float]:
        """Trainable and total parameter counts (``dit_ema`` and adapters excluded from the
        backbone's total)."""
        params = dict(self.named_parameters())
        backbone = sum(
            p.numel()
            for n, p in params.items()
            if not (n.startswith("dit_ema.") or _is_added(n) or is_extension(n))
        )
        stages = [stage] if stage else list(STAGE_PARTS)
        trainable = set()
        for st in stages:
            trainable |= {n for n, on in self.trainable_mask(st).items() if on}
        n_train = sum(params[n].numel() for n in trainable)
        added = sum(p.numel() for n, p in params.items() if _is_added(n) and "dit_ema." not in n)
        return {
            "trainable": n_train,
            "backbone": backbone,
            "added": added,
            "fraction": n_train / backbone,
        }

    # ------------------------------------------------------------------ state
    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The weights of adapter ``name`` alone, keyed independently of its name."""
        spec = self.adapter_specs[name]
        vals = {}
        if spec.param_names:  # partial/full, or a LoRA/bottleneck adapter's train_params
            vals = (
                self._copy_params(spec.param_names)
                if self.active_adapter == name
                else self._tuned_values.get(name, self._base_values[name])
            )
        out = {k: v.detach().cpu().contiguous() for k, v in vals.items()}
        if spec.strategy in ("partial", "full"):
            return out
        return out | {
            key: p.detach().cpu().contiguous()
            for n, p in self.named_parameters()
            if (key := _neutral_key(n, name)) is not None
        }

    @torch.no_grad()
    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load weights saved by :meth:`adapter_tensors` into the existing adapter ``name``."""
        spec = self.adapter_specs[name]
        expected = self.adapter_tensors(name)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
        if missing or extra or shapes:
            from ..errors import CheckpointError

            raise CheckpointError(
                f"The saved adapter does not fit this model's {spec.strategy!r} adapter "
                f"{name!r}: {len(missing)} weights missing (e.g. {missing[:2]}), "
                f"{len(extra)} unexpected (e.g. {extra[:2]}), {len(shapes)} with another shape "
                f"(e.g. {shapes[:2]}). Was it saved from a model of another size?"
            )
        if spec.param_names:
            own = {k: tensors[k] for k in spec.param_names}
            if self.active_adapter == name:
                self._write_params(own)
            else:
                self._tuned_values[name] = {k: v.clone() for k, v in own.items()}
        if spec.strategy in ("partial", "full"):
            return
        for n, p in self.named_parameters():
            key = _neutral_key(n, name)
            if key is not None:
                p.copy_(tensors[key])

    def adaptation_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """JSON and tensors that, with the state dict, rebuild every adapter exactly."""
        tensors = {}
        for name, vals in self._base_values.items():
            tensors.update({f"{name}/base/{k}": v for k, v in vals.items()})
        for name, vals in self._tuned_values.items():
            tensors.update({f"{name}/tuned/{k}": v for k, v in vals.items()})
        return self.adaptation_meta(), {
            k: v.detach().cpu().contiguous() for k, v in tensors.items()
        }

    def adaptation_meta(self) -> dict:
        """JSON part of :meth:`adaptation_state`: specs, active adapter, merged or not."""
        return {
            "adapters": [s.to_json() for s in self.adapter_specs.values()],
            "active": self.active_adapter,
            "merged": self.merged,
        }

    def checkpoint_state(self, owner: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """``owner``'s state dict (default: this module; a module holding this one as a
        part works too) with a merged LoRA taken out of the base weights, plus the parked
        adapter weights under ``ADAPT_PREFIX``. Loading merges again (:meth:`restore_adaptation`).
        """
        merged = self.merged
        if merged:
            self.unmerge_adapter()
        try:  # copies: re-merging below edits the base weights in place
            state = {k: v.detach().clone() for k, v in (owner or self).state_dict().items()}
        finally:
            if merged:
                self.merge_adapter()
        _, parked = self.adaptation_state()
        state.update({ADAPT_PREFIX + k: v for k, v in parked.items()})
        return state

    @staticmethod
    def pop_adaptation_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Remove and return the parked adapter weights of a :meth:`checkpoint_state`."""
        keys = [k for k in state if k.startswith(ADAPT_PREFIX)]
        return {k[len(ADAPT_PREFIX) :]: state.pop(k) for k in keys}

    def build_adapters(self, meta: dict) -> None:
        """Recreate the adapters' structure (before ``load_state_dict``)."""
        for d in meta.get("adapters", []):
            spec = AdapterSpec.from_json(d)
            self.add_adapter(spec.name, spec.strategy, spec.parts, **spec.add_kwargs())
        self.set_adapter(None)

    def restore_adaptation(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Second half of loading: parked weights, the active adapter and merging."""
        self._base_values, self._tuned_values = {}, {}
        for key, v in tensors.items():
            name, kind, param = key.split("/", 2)
            store = self._base_values if kind == "base" else self._tuned_values
            store.setdefault(name, {})[param] = v.to(self.latent_scale.device)
        # The state dict holds the active adapter's weights in place (only inactive ones are
        # parked), so activating it from "none" writes nothing.
        self.active_adapter = None
        active = meta.get("active")
        if active is not None:
            self.set_adapter(active)
            if meta.get("merged"):
                self.merge_adapter()
