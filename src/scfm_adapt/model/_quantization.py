"""int8 dynamic quantization of a trained :class:`~scfm_adapt.model.SCFM`, for CPU inference.

:meth:`QuantizationMixin.quantize` returns an inference-only copy of the model whose linear
layers hold int8 weights (PyTorch's built-in dynamic quantization). Methods that would
train, save or restructure that copy are marked :func:`inference_only`: they refuse with a
clear error instead of failing deep inside PyTorch or writing a checkpoint nobody can load.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..module import SCFMModule, unwrap_lora

_DTYPES = {"int8": torch.qint8, "qint8": torch.qint8}


class QuantizationMixin:
    """Mixed into :class:`~scfm_adapt.model.SCFM`; see :meth:`quantize`."""

    # What this mixin needs from the model it is mixed into, beyond BaseModel:
    module: SCFMModule
    #: Whether this model is an int8 copy for inference (see :meth:`quantize`).
    is_quantized_: bool = False
    #: The float model's summary (the int8 layers hold packed weights, not parameters).
    _float_summary_: str = ""

    def __repr__(self) -> str:
        if not self.is_quantized_:
            return super().__repr__()
        return self._float_summary_ + "\n  int8 dynamic quantization (CPU, inference only)"

    def quantize(self, dtype: str = "int8"):
        """A copy of this model with int8 weights in every linear layer, for inference.

        Uses PyTorch's built-in dynamic quantization
        (:func:`torch.ao.quantization.quantize_dynamic`): the weights of every
        ``nn.Linear`` of the encoder, decoder and DiT prior are stored in int8 and the
        activations are quantized on the fly, batch by batch. Embeddings, norms and the
        dispersion stay in float32. This model is left untouched.

        Quantized kernels run on the CPU only: the copy lives on the CPU and refuses to
        move to a GPU. It embeds (:meth:`get_latent_representation`), denoises
        (:meth:`get_normalized_expression`) and generates like the float model, but it is
        for inference only: ``train``, ``save`` and the adapter methods (``adapt``,
        ``set_adapter``, ``merge_adapter``, ...) raise :class:`RuntimeError`. Keep the
        float model (or its checkpoint) and quantize again after changing it.

        An active LoRA adapter is merged into the copy's base weights before quantization;
        the copy keeps only the active adapter (bottleneck adapters are quantized like
        any linear layer, ``partial``/``full`` adapters live in the base weights already).

        Parameters
        ----------
        dtype
            ``"int8"`` (the only dynamic quantization type with fast CPU kernels).

        Returns
        -------
        A new model, with ``is_quantized_ = True``, sharing this model's AnnData.

        Raises
        ------
        RuntimeError
            The model is not trained, or is quantized already.
        ValueError
            Unknown ``dtype``, or an active LoRA adapter that cannot be merged.
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; dynamic quantization supports 'int8'.")
        if self.is_quantized_:
            raise RuntimeError("This model is quantized already; quantize the float model.")
        self._check_if_trained(
            warn=False, message="Train the model before quantizing it: model.train(...)."
        )
        new = copy.copy(self)  # shares the AnnData and its manager, nothing mutable else
        for key, value in vars(self).items():
            if key not in ("_adata", "_adata_manager", "module", "trainer"):
                setattr(new, key, copy.deepcopy(value))
        new.trainer = None  # the float model's Lightning trainer, which trained its module
        module = copy.deepcopy(self.module).cpu()
        spec = module.adapter_specs.get(module.active_adapter) if module.active_adapter else None
        if spec is not None and spec.strategy == "lora":
            try:
                module.merge_adapter()
            except Exception as e:
                raise ValueError(
                    f"The active LoRA adapter {spec.name!r} cannot be merged into the base "
                    f"weights ({e}), and quantized layers cannot carry it unmerged. Call "
                    "set_adapter(None) to quantize the base model, or switch to an adapter "
                    "that merges, then quantize()."
                ) from e
        if any(s.strategy == "lora" for s in module.adapter_specs.values()):
            unwrap_lora(module, only_empty=False)
        module.eval()
        with warnings.catch_warnings():
            # torch.ao.quantization and quantized tensor creation are deprecated in favour
            # of torchao (a separate package); the built-in kernels still work.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.ao\.quantization is deprecated", category=Warning
            )
            warnings.filterwarnings(
                "ignore", message=r".*torch\.quantize_per_tensor.*deprecated", category=Warning
            )
            module = torch.ao.quantization.quantize_dynamic(
                module, {nn.Linear}, dtype=_DTYPES[dtype], inplace=True
            )
        new.module = module
        new.is_quantized_ = True
        new._float_summary_ = self._summary()
        return new

    def to_device(self, device) -> None:
        """Move the model to ``device`` (a quantized model stays on the CPU)."""
        dev = device if isinstance(device, torch.device) else torch.device(device)
        if self.is_quantized_ and dev.type != "cpu":
            raise RuntimeError(
                f"A quantized model runs on the CPU only (PyTorch's dynamic quantized kernels "
                f"are CPU kernels); cannot move it to {dev}. Use the float model on a GPU."
            )
        super().to_device(device)
