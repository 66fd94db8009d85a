"""Cell-type classifier on an (adapted) SCFM encoder, with calibration and OOD statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ._scfm import SCFMModule


class AnnotatorModule(BaseModuleClass):
    """Head on the encoder's last hidden states, ``(n_tokens × hidden)`` flattened.

    Parameters
    ----------
    backbone
        A (usually adapted) :class:`SCFMModule`; only its encoder runs.
    n_classes
        Number of known cell types.
    head
        ``"linear"`` (a linear probe when the backbone is frozen) or ``"mlp"`` (one hidden
        layer of width 256).
    dropout
        Dropout on the features before the head.
    unlabeled_code
        Label code of unlabelled cells (left out of the loss), ``-1`` for none.
    class_weights
        Optional per-class weights of the cross-entropy.

    Buffers ``temperature`` (calibration), ``class_means``, ``precision`` and
    ``ood_threshold`` (Mahalanobis out-of-distribution score) are fitted by the model class
    after training.
    """

    def __init__(
        self,
        backbone: SCFMModule,
        n_classes: int,
        head: str = "linear",
        dropout: float = 0.1,
        unlabeled_code: int = -1,
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        if head not in ("linear", "mlp"):
            raise ValueError(f"head={head!r}; use 'linear' or 'mlp'.")
        self.backbone = backbone
        self.n_classes, self.unlabeled_code = n_classes, unlabeled_code
        dim = backbone.n_tokens * backbone.encoder.hidden
        self.feature_dim = dim
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if head == "mlp":
            layers += [
                nn.Linear(dim, 256),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(256, n_classes),
            ]
        else:
            layers += [nn.Linear(dim, n_classes)]
        self.head = nn.Sequential(*layers)
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer(
            "class_weights", torch.ones(n_classes) if class_weights is None else class_weights
        )
        self.register_buffer("class_means", torch.zeros(n_classes, dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("ood_threshold", torch.tensor(float("inf")))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features of counts ``x``, ``(B, n_tokens * hidden)``."""
        x_norm, _ = self.backbone.normalize(x)
        return self.backbone.encoder.features(x_norm).flatten(1)

    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        return {}

    @auto_move_data
    def inference(self, x: torch.Tensor) -> dict:
        feats = self.features(x)
        return {"features": feats, "logits": self.head(feats).float()}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        y = tensors[REGISTRY_KEYS.LABELS_KEY].long().view(-1)
        logits = inference_outputs["logits"]
        labelled = y != self.unlabeled_code
        ce = torch.zeros_like(logits[:, 0])
        if labelled.any():
            ce[labelled] = F.cross_entropy(
                logits[labelled], y[labelled], weight=self.class_weights, reduction="none"
            )
        n = labelled.sum().clamp(min=1)
        loss = ce.sum() / n
        acc = (logits[labelled].argmax(-1) == y[labelled]).float().mean() if labelled.any() else 0
        # The cross-entropy stands in the ELBO slot so that scvi-tools' metrics, early
        # stopping and history work unchanged.
        return LossOutput(
            loss=loss,
            reconstruction_loss=ce,
            kl_local=torch.zeros_like(ce),
            extra_metrics={"accuracy": torch.as_tensor(acc).detach()},
        )

    @torch.no_grad()
    def ood_score(self, features: torch.Tensor) -> torch.Tensor:
        """Smallest Mahalanobis distance to a class mean (shared covariance), ``(B,)``."""
        d = features.float()[:, None, :] - self.class_means[None]  # (B, K, D)
        m = torch.einsum("bkd,de,bke->bk", d, self.precision, d)
        return m.min(-1).values.clamp(min=0).sqrt()
