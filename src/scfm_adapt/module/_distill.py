"""Knowledge distillation: a small student SCFM learns to reproduce a frozen teacher SCFM.

The student has the teacher's latent shape ``(n_tokens, token_dim)`` (so latents, and the
teacher's DiT prior over them, are interchangeable) but a narrower, shallower encoder and
decoder. Per cell the loss is

``latent_weight * MSE(mu_s, mu_t) + latent_kl_weight * KL(q_t || q_s)
+ decoder_weight * library * KL(p_t || p_s) + nll_weight * NLL_s(x)``

* ``MSE`` and ``KL(q_t || q_s)`` compare the two Gaussian posteriors over tokens (sums over
  tokens and token dimensions);
* ``KL(p_t || p_s)`` compares the two decoders' gene-fraction distributions (the softmax
  ``scale``) given the *same* tokens, the teacher's posterior means; times the cell's library
  size it is the expected gap of the multinomial log-likelihood of the cell's counts, so it is
  on the scale of the count likelihood;
* ``NLL_s`` is the student's own reconstruction term of the ELBO (a posterior sample decoded
  with the student's likelihood), which keeps the student a valid model of the counts.

The teacher is frozen and stays in eval mode; only the student's parameters train.
"""

from __future__ import annotations

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch.distributions import Normal
from torch.distributions import kl_divergence as kl

from ._keys import MODULE_KEYS as K
from ._scfm import SCFMModule

QZ_TEACHER = "qz_teacher"
Z_TEACHER = "z_teacher"
SCALE_TEACHER = "scale_teacher"
SCALE_STUDENT = "scale_student"


def gene_fractions(
    module: SCFMModule, z: torch.Tensor, conditions: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Decoded gene fractions (the softmax ``scale``) of tokens ``z`` ``(B, T, d)`` → ``(B, G)``.

    The decoder's covariates are taken from ``conditions`` exactly as
    :meth:`SCFMModule.decode` does (batch, then each categorical covariate).
    """
    covs = [conditions["batch"]]
    covs += [conditions[f"cat_cov_{i}"] for i in range(len(module.n_cats_per_cov))]
    scale, _ = module.decoder(z, covs)  # (B, G)
    return scale


def _check_compatible(teacher: SCFMModule, student: SCFMModule) -> None:
    """Raise ``ValueError`` when the two modules' data or latent shapes differ."""
    for name in ("n_input", "n_batch", "n_cats_per_cov", "n_tokens", "token_dim"):
        a, b = getattr(teacher, name), getattr(student, name)
        if a != b:
            raise ValueError(
                f"Teacher and student differ in {name} ({a} vs {b}); a student must see the "
                "same genes and covariates and have the teacher's latent shape."
            )


class DistillationModule(BaseModuleClass):
    """A frozen teacher :class:`SCFMModule` and a trainable student, with the distillation loss.

    Parameters
    ----------
    teacher
        Trained module to imitate; it is frozen (``requires_grad`` off) and kept in eval
        mode. Pass a copy if the caller's module must keep its flags.
    student
        Module to train, with the teacher's genes, covariates, ``n_tokens`` and
        ``token_dim``. Its VAE parts train; its DiT stays frozen.
    latent_weight
        Weight of the squared error between the posterior means (summed over tokens).
    latent_kl_weight
        Weight of ``KL(q_teacher || q_student)`` between the Gaussian posteriors (also
        matches their variances); 0 switches it off.
    decoder_weight
        Weight of ``library * KL(p_teacher || p_student)`` between the decoded gene-fraction
        distributions given the teacher's mean tokens.
    nll_weight
        Weight of the student's count negative log-likelihood on the data.

    Notes
    -----
    ``loss`` puts the per-cell total in the ELBO slot (``reconstruction_loss``, with a zero
    ``kl_local``) so that scvi-tools' ``elbo_train`` / ``elbo_validation`` metrics, early
    stopping and history track the distillation loss; each term is in ``extra_metrics``.
    """

    def __init__(
        self,
        teacher: SCFMModule,
        student: SCFMModule,
        latent_weight: float = 1.0,
        latent_kl_weight: float = 1.0,
        decoder_weight: float = 1.0,
        nll_weight: float = 1.0,
    ):
        super().__init__()
        _check_compatible(teacher, student)
        weights = {
            "latent_weight": latent_weight,
            "latent_kl_weight": latent_kl_weight,
            "decoder_weight": decoder_weight,
            "nll_weight": nll_weight,
        }
        negative = {k: w for k, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"Loss weights must be >= 0, got {negative}.")
        if not any(weights.values()):
            raise ValueError("All loss weights are 0: nothing to train.")
        self.latent_weight, self.latent_kl_weight = latent_weight, latent_kl_weight
        self.decoder_weight, self.nll_weight = decoder_weight, nll_weight
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        student.set_stage("vae")  # trains encoder, decoder and dispersion; DiT frozen

    def train(self, mode: bool = True) -> DistillationModule:
        """Set the student's mode; the teacher always stays in eval mode (no dropout)."""
        super().train(mode)
        self.teacher.eval()
        # The student's frozen DiT (and its EMA) stay in eval mode too.
        self.student.dit.eval()
        self.student.dit_ema.eval()
        return self

    # ------------------------------------------------------------------ protocol
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return self.student._get_inference_input(tensors, **kwargs)

    @auto_move_data
    def inference(self, x: torch.Tensor, batch_index: torch.Tensor) -> dict:
        """The student's posterior (and a sample) and the teacher's posterior over tokens."""
        out = self.student.inference(x, batch_index)
        with torch.no_grad():
            out[QZ_TEACHER] = self.teacher.inference(x, batch_index)[K.QZ]
        return out

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        return {
            K.Z: inference_outputs[K.Z],
            K.LIBRARY: inference_outputs[K.LIBRARY],
            Z_TEACHER: inference_outputs[QZ_TEACHER].loc,
            "conditions": self.student.conditions(tensors),
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        z_teacher: torch.Tensor,
        conditions: dict[str, torch.Tensor],
    ) -> dict:
        """The student's count distribution of its own sample ``z``, and both decoders'
        gene fractions of the teacher's mean tokens ``z_teacher`` ``(B, T, d)``."""
        with torch.no_grad():
            scale_t = gene_fractions(self.teacher, z_teacher, conditions)  # (B, G)
        return {
            K.PX: self.student.decode(z, library, conditions),
            SCALE_TEACHER: scale_t,
            SCALE_STUDENT: gene_fractions(self.student, z_teacher, conditions),  # (B, G)
        }

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
    ) -> LossOutput:
        """Weighted sum of the latent, decoder and count terms, per cell (see module doc)."""
        qz_s, qz_t = inference_outputs[K.QZ], inference_outputs[QZ_TEACHER]
        latent_mse = (qz_s.loc - qz_t.loc).pow(2).sum((-1, -2))  # (B,)
        latent_kl = kl(Normal(qz_t.loc, qz_t.scale), qz_s).sum((-1, -2))  # (B,)
        p_t, p_s = generative_outputs[SCALE_TEACHER], generative_outputs[SCALE_STUDENT]
        tiny = torch.finfo(p_s.dtype).tiny
        decoder_kl = (torch.xlogy(p_t, p_t) - p_t * p_s.clamp_min(tiny).log()).sum(-1)  # (B,)
        library = inference_outputs[K.LIBRARY].view(-1)
        # The student's own ELBO reconstruction term (its loss handles e.g. masked genes).
        own = self.student.loss(tensors, inference_outputs, {K.PX: generative_outputs[K.PX]})
        nll = own.reconstruction_loss["reconstruction_loss"]  # (B,)
        total = (
            self.latent_weight * latent_mse
            + self.latent_kl_weight * latent_kl
            + self.decoder_weight * library * decoder_kl
            + self.nll_weight * nll
        )
        return LossOutput(
            loss=total.mean(),
            reconstruction_loss=total,
            kl_local=torch.zeros_like(total),
            extra_metrics={
                "latent_mse": latent_mse.mean().detach(),
                "latent_kl": latent_kl.mean().detach(),
                "decoder_kl": decoder_kl.mean().detach(),
                "student_nll": nll.mean().detach(),
            },
        )

    @torch.no_grad()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Posterior predictive counts of the student (see :meth:`SCFMModule.sample`)."""
        return self.student.sample(tensors, n_samples=n_samples)
