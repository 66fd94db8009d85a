"""The scvi-tools training plan plus what the diffusion prior needs: an EMA of its weights."""

from __future__ import annotations

from scvi.train import TrainingPlan


class SCFMTrainingPlan(TrainingPlan):
    """:class:`scvi.train.TrainingPlan` that updates the DiT's EMA after each prior step.

    The optimizer already skips parameters that do not require grad, so the frozen VAE
    (stage 2) or frozen DiT (stage 1) needs nothing special here.
    """

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if getattr(self.module, "stage", None) == "prior":
            self.module.update_ema()
