"""Named adapters of :class:`~scfm_adapt.model.SCFM`: ``adapt``, switching, merging and
adapter checkpoints (the adapter alone, never the base weights).

The strategies themselves (LoRA through peft, bottleneck adapters, partial unfreezing,
linear probe) live in the module layer: :class:`~scfm_adapt.module.AdaptableMixin`, with
LoRA injected in :mod:`scfm_adapt.module._lora`."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__
from ..errors import AdapterMismatchError, CheckpointError
from ..module import AdapterSpec, SCFMModule
from .base import inference_only, read_checkpoint, write_checkpoint

logger = logging.getLogger(__name__)

ADAPTER_KIND = "scfm_adapter"
_SHAPE_KEYS = (
    "n_tokens",
    "token_dim",
    "encoder_hidden",
    "encoder_depth",
    "decoder_hidden",
    "dit_hidden",
    "dit_depth",
    "gene_likelihood",
    "dispersion",
)


def genes_digest(var_names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, var_names)).encode()).hexdigest()


class AdaptationMixin:
    """Mixed into :class:`~scfm_adapt.model.SCFM`; see :meth:`adapt`."""

    # What this mixin needs from the model it is mixed into, beyond BaseModel:
    module: SCFMModule

    @inference_only
    def adapt(
        self,
        strategy: str = "lora",
        *,
        name: str = "default",
        parts: Sequence[str] = ("encoder", "dit"),
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
        bottleneck: int = 16,
        n_blocks: int = 1,
        verbose: bool = True,
    ) -> dict[str, int | float]:
        """Add a named adapter, make it active, and freeze everything else.

        After ``adapt``, :meth:`train` (and task models built on this one) update only the
        adapter's weights. Every new path starts as an exact no-op: before training, the
        adapted model's outputs are bit-identical to the pretrained model's.

        Parameters
        ----------
        strategy
            ``"lora"`` (through :mod:`peft`), ``"adapter"`` (bottleneck adapters),
            ``"partial"`` (last ``n_blocks`` blocks, norms and output layers),
            ``"full"`` or ``"linear_probe"`` (nothing in the backbone trains).
        name
            Adapter name; several adapters coexist and :meth:`set_adapter` switches.
        parts
            Which parts to adapt: any of ``"encoder"``, ``"dit"`` (the prior, and its EMA
            copy) and ``"decoder"`` (``lora``, ``partial`` and ``full`` only).
        rank, alpha, dropout, target_modules
            LoRA rank, scaling ``alpha / rank``, dropout, and the linear layers to adapt
            (default: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every block;
            ``fc`` and ``scale_head`` of the decoder). Names are relative to a block or
            part, e.g. ``"gene_to_tokens"`` adds the encoder's gene projection (and
            ``"gene_down"`` its first factor, where ``encoder_rank`` factorises it).
        bottleneck
            Width of the bottleneck adapters.
        n_blocks
            Blocks unfrozen from the top by ``"partial"``.

        Returns
        -------
        ``{"trainable", "backbone", "added", "fraction"}``: parameters that train (in any
        stage), of the pretrained backbone (EMA copy excluded), added by all adapters, and
        the trainable share of the backbone.
        """
        self.module.add_adapter(
            name,
            strategy,
            tuple(parts),
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=tuple(target_modules) if target_modules else None,
            bottleneck=bottleneck,
            n_blocks=n_blocks,
        )
        report = self.parameter_report()
        msg = (
            f"Adapter {name!r} ({strategy}) on {', '.join(parts)}: "
            f"{report['trainable']:,} trainable of {report['backbone']:,} backbone parameters "
            f"({report['fraction']:.2%})."
        )
        logger.info(msg)
        if verbose:
            print(msg)
        return report

    def parameter_report(self, stage: str | None = None) -> dict[str, int | float]:
        """Trainable, backbone and adapter parameter counts (see :meth:`adapt`)."""
        return self.module.parameter_report(stage)

    @property
    def adapters(self) -> dict[str, str]:
        """Adapter name → strategy."""
        return {n: s.strategy for n, s in self.module.adapter_specs.items()}

    @property
    def active_adapter(self) -> str | None:
        return self.module.active_adapter

    @inference_only
    def set_adapter(self, name: str | None) -> None:
        """Switch to adapter ``name``; ``None`` gives the plain pretrained model back."""
        self.module.set_adapter(name)
        self.module.eval()

    @inference_only
    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (restoring the pretrained weights if it was active)."""
        self.module.delete_adapter(name)
        self.module.eval()

    @inference_only
    def merge_adapter(self) -> None:
        """Fold the active LoRA adapter into the base weights (undo with
        :meth:`unmerge_adapter`); outputs are unchanged up to rounding."""
        self.module.merge_adapter()

    @inference_only
    def unmerge_adapter(self) -> None:
        """Subtract a merged LoRA adapter from the base weights again."""
        self.module.unmerge_adapter()

    def _fingerprint(self) -> dict:
        """What an adapter must agree on with its base: genes and sizes."""
        rank = getattr(self.module.encoder, "rank", None)
        return {
            "n_genes": len(self.var_names_),
            "genes_sha256": genes_digest(self.var_names_),
            **{k: self.module.hparams_[k] for k in _SHAPE_KEYS},
            # Only for other tokenizers, so adapters saved before tokenizers existed still fit.
            **({"tokenizer": self.module.tokenizer} if self.module.tokenizer != "latent" else {}),
            # The external backbone's weights: an adapter fits those it was trained on.
            **({"backbone_sha256": sha} if (sha := self._backbone_sha256()) else {}),
            # Only for a factorised gene map, so adapters of full-map bases still fit.
            **(
                {"encoder_rank": rank}
                if (rank := getattr(self.module.encoder, "rank", None))
                else {}
            ),
        }

    def _backbone_sha256(self) -> str | None:
        opts = self.module.hparams_.get("tokenizer_options") or {}
        return opts.get("sha256")

    @inference_only
    def save_adapter(
        self, dir_path: str | Path, name: str | None = None, overwrite: bool = False
    ) -> Path:
        """Save one adapter alone (safetensors + JSON), never the base weights.

        ``partial`` and ``full`` adapters store the base weights they train (their tuned
        values), which is the whole point of those strategies; ``linear_probe`` stores
        nothing but its description.
        """
        name = name or self.module.active_adapter
        if name is None or name not in self.module.adapter_specs:
            raise KeyError(f"No adapter {name!r} to save; adapters: {list(self.adapters)}.")
        spec = self.module.adapter_specs[name]
        tensors = self.module.adapter_tensors(name)
        config = {
            "model": ADAPTER_KIND,
            "scfm_adapt_version": __version__,
            "spec": spec.to_json(),
            "base": self._fingerprint(),
        }
        return write_checkpoint(dir_path, tensors, config, overwrite=overwrite)

    @inference_only
    def load_adapter(
        self, dir_path: str | Path, name: str | None = None, activate: bool = True
    ) -> str:
        """Add an adapter saved by :meth:`save_adapter` (under its own or a new ``name``).

        Raises
        ------
        AdapterMismatchError
            The adapter was made for a model with other genes or other sizes.
        """
        tensors, config = read_checkpoint(dir_path)
        if config.get("model") != ADAPTER_KIND:
            raise CheckpointError(
                f"{dir_path} is not an adapter (it holds a {config.get('model')}); "
                "load models with SCFM.load."
            )
        mine, theirs = self._fingerprint(), config["base"]
        if "backbone_sha256" not in theirs:  # saved before adapters recorded it
            mine.pop("backbone_sha256", None)
        diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
        if diff:
            what = "; ".join(
                "the genes differ (same number, other names or order)"
                if k == "genes_sha256"
                else "the external backbone's weights differ (another checkpoint)"
                if k == "backbone_sha256"
                else f"{k}: adapter {a!r} vs model {b!r}"
                for k, (a, b) in diff.items()
            )
            raise AdapterMismatchError(
                f"The adapter in {dir_path} was trained on another base model ({what}). "
                "Load it onto the model it was made for."
            )
        spec = AdapterSpec.from_json(config["spec"])
        name = name or spec.name
        previous = self.module.active_adapter
        self.module.add_adapter(name, spec.strategy, spec.parts, **spec.add_kwargs())
        try:
            self.module.load_adapter_tensors(
                name, {k: v.to(self.device) for k, v in tensors.items()}
            )
        except Exception:
            self.module.delete_adapter(name)
            self.module.set_adapter(previous)
            raise
        if not activate:
            self.module.set_adapter(previous)
        self.module.eval()
        return name
