"""The scvi-tools training plan plus what the diffusion prior needs: an EMA of its weights."""

from __future__ import annotations

import inspect

import torch
from scvi.train import TrainingPlan


class SCFMTrainingPlan(TrainingPlan):
    """:class:`scvi.train.TrainingPlan` that updates the DiT's EMA after each prior step.

    The optimizer already skips parameters that do not require grad, so the frozen VAE
    (stage 2) or frozen DiT (stage 1) needs nothing special here.
    """

    @torch.no_grad()
    def compute_and_log_metrics(self, loss_output, metrics, mode):
        # scvi-tools runs this under torch.inference_mode, which makes Lightning's epoch
        # metric states inference tensors; syncing them across DDP processes on gloo then
        # fails ("Inplace update to inference tensor"). no_grad logs the same values.
        log = inspect.unwrap(TrainingPlan.compute_and_log_metrics)
        return log(self, loss_output, metrics, mode)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if getattr(self.module, "stage", None) == "prior":
            self.module.update_ema()
