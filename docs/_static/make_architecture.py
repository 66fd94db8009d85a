"""Draw ``architecture.png``: the package's layers and the direction of their imports.

``python docs/_static/make_architecture.py`` (matplotlib only; rerun when a layer changes).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).with_name("architecture.png")

#: name -> (x, y, width, height, colour, lines inside the box)
BOXES = {
    "nn": (
        0.2,
        0.4,
        2.6,
        2.2,
        "#dbe9f6",
        [
            "nn  (pure torch)",
            "token encoders: latent,",
            "  pathway, rank, Geneformer",
            "count decoder, DiT blocks,",
            "attention, embedders,",
            "bottleneck adapters",
        ],
    ),
    "diffusion": (
        3.2,
        0.4,
        2.2,
        2.2,
        "#dbe9f6",
        [
            "diffusion",
            "noise schedule,",
            "DDPM / DDIM samplers,",
            "DDIM inversion",
            "(no parameters)",
        ],
    ),
    "module": (
        5.8,
        0.4,
        2.6,
        2.2,
        "#e3f1df",
        [
            "module  (scvi-tools)",
            "SCFMModule, multimodal,",
            "annotator, distillation,",
            "response heads;",
            "named adapters,",
            "LoRA injected (peft)",
        ],
    ),
    "train": (
        8.8,
        0.4,
        2.2,
        2.2,
        "#e3f1df",
        [
            "train  (Lightning)",
            "training plan (EMA),",
            "divergence guard,",
            "epoch checkpoints,",
            "temperature scaling",
        ],
    ),
    "model": (
        3.2,
        3.3,
        7.8,
        2.6,
        "#fbe5d6",
        [
            "model  (the model classes: AnnData and the registry in, results out)",
            "base/: BaseModel = registry (AnnDataManager), input shells, training runs",
            "       with resume, one save/load (safetensors + JSON, atomic, checksummed)",
            "SCFM = BaseModel + generation, multimodal, tokenizers, adapters,",
            "       query mapping, quantization (feature mixins, declared needs)",
            "CellAnnotator, PerturbationModel, distill: on the same BaseModel",
        ],
    ),
    "tl": (
        3.2,
        6.5,
        3.7,
        1.5,
        "#f6dbe9",
        [
            "tl  (writes into AnnData)",
            "embed, annotate, normalize_expression,",
            "predict_perturbation, augment, ...",
        ],
    ),
    "pl": (
        7.3,
        6.5,
        3.7,
        1.5,
        "#f6dbe9",
        [
            "pl  (plots; never mutate)",
            "history, embedding, calibration,",
            "perturbation_delta, ...",
        ],
    ),
    "data": (
        0.2,
        3.3,
        2.6,
        2.6,
        "#eeeeee",
        [
            "data / datasets",
            "input checks, gene",
            "alignment, gene sets,",
            "Geneformer files,",
            "perturbation names;",
            "real data loaders",
        ],
    ),
    "metrics": (
        0.2,
        6.5,
        2.6,
        1.5,
        "#eeeeee",
        [
            "metrics / baselines",
            "every metric once;",
            "the simple models to beat",
        ],
    ),
}
ARROWS = [  # importer -> imported
    ("diffusion", "nn"),
    ("module", "diffusion"),
    ("train", "module"),
    ("model", "train"),
    ("model", "data"),
    ("tl", "model"),
    ("pl", "model"),
    ("metrics", "data"),
    ("model", "metrics"),
]


def _anchor(name: str, towards: str) -> tuple[float, float]:
    x, y, w, h, *_ = BOXES[name]
    tx, ty, tw, th, *_ = BOXES[towards]
    cx, cy, tcx, tcy = x + w / 2, y + h / 2, tx + tw / 2, ty + th / 2
    if abs(tcy - cy) > (h + th) / 2 - 0.01:  # vertical neighbours
        return (min(max(tcx, x + 0.3), x + w - 0.3), y + h if tcy > cy else y)
    return (x + w if tcx > cx else x, cy)


def main() -> None:
    fig, ax = plt.subplots(figsize=(11.5, 8.4))
    for x, y, w, h, colour, lines in BOXES.values():
        ax.add_patch(
            FancyBboxPatch(
                (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                fc=colour, ec="#555555", lw=1.0,
            )
        )  # fmt: skip
        ax.text(x + 0.12, y + h - 0.3, lines[0], fontsize=11, weight="bold", va="center")
        for i, line in enumerate(lines[1:]):
            ax.text(x + 0.12, y + h - 0.68 - 0.33 * i, line, fontsize=9, va="center")
    for src, dst in ARROWS:
        ax.add_patch(
            FancyArrowPatch(
                _anchor(src, dst), _anchor(dst, src), arrowstyle="-|>", mutation_scale=14,
                lw=1.2, color="#333333",
            )
        )  # fmt: skip
    ax.text(
        0.2, 8.25,
        "Imports flow one way (an arrow points from the importer to what it imports); "
        "errors.py and _slots.py are importable from anywhere.",
        fontsize=9, style="italic",
    )  # fmt: skip
    ax.set_xlim(0, 11.2)
    ax.set_ylim(0.2, 8.5)
    ax.axis("off")
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
