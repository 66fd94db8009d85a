"""scGPT's transformer as a cell encoder: checkpoint files, value binning, tokenisation,
fidelity (to a re-implementation from scGPT's equations on torch's own encoder layer, and
to scGPT's code where its venv exists) and the adaptation hooks (LoRA, adapters)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import EncoderHost
from scfm_adapt.data import load_scgpt, map_genes_to_vocab, write_random_scgpt
from scfm_adapt.errors import CheckpointError
from scfm_adapt.nn._scgpt import ScGPTEncoder, bin_values

GENES = [f"GENE{i}" for i in range(40)]
REFERENCE = Path(__file__).parents[2] / "benchmarks" / "peers" / "scgpt_reference.py"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Random checkpoints: flash-attn names (continuous values), torch names (category
    values), and scaling values."""
    out = {}
    for name, kw in {
        "flash": {"flash_names": True},
        "torch_category": {"flash_names": False, "input_emb_style": "category"},
        "scaling": {"input_emb_style": "scaling"},
        "pre_norm": {"pre_norm": True},
    }.items():
        path = write_random_scgpt(
            tmp_path_factory.mktemp(name), GENES[:34], max_seq_len=24, seed=len(out), **kw
        )
        out[name] = load_scgpt(path)
    return out


def make_encoder(ckpt, genes=GENES, **kw) -> ScGPTEncoder:
    ids, _ = map_genes_to_vocab(genes, ckpt.vocab, min_fraction=0.0)
    enc = ScGPTEncoder(
        ckpt.config, ids, 4, 8, pad_id=ckpt.special["pad"], cls_id=ckpt.special["cls"], **kw
    )
    enc.load_backbone_state(ckpt.state_dict)
    return enc.eval()


def random_x(n_cells: int, n_genes: int = len(GENES), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(n_cells, n_genes, generator=g) * 3, generator=g)
    lib = counts.sum(1, keepdim=True).clamp(min=1)
    return torch.log1p(counts / lib * 1e4)


# ---------------------------------------------------------------------------- files
def test_checkpoint_layout_and_heads_left_out(ckpts):
    ck = ckpts["flash"]
    assert ck.special == {"pad": 34, "cls": 35, "eoc": 36}
    assert ck.vocab["GENE0"] == 0 and ck.config["vocab_size"] == 37
    assert ck.config["n_input_bins"] is None  # continuous values: no bin table
    assert (ck.config["d_model"], ck.config["n_layers"], ck.config["d_hid"]) == (32, 2, 64)
    assert ck.dropped == ["cls_decoder", "decoder", "mvc_decoder"]
    assert not any(k.startswith(("decoder.", "mvc_decoder.")) for k in ck.state_dict)
    assert re.fullmatch(r"[0-9a-f]{64}", ck.sha256)
    # torch's layer names (in_proj_*) arrive under flash-attn's (Wqkv)
    tc = ckpts["torch_category"]
    assert "transformer_encoder.layers.1.self_attn.Wqkv.weight" in tc.state_dict
    assert not any("in_proj" in k for k in tc.state_dict)
    assert tc.config["n_input_bins"] == 53 and tc.config["pad_value"] == 51
    assert ckpts["pre_norm"].config["pre_norm"] and not ck.config["pre_norm"]


def test_pre_norm_holds_for_flash_layers_only(tmp_path):
    # scGPT builds torch's post-norm layer for a model without flash-attn, whatever pre_norm
    path = write_random_scgpt(tmp_path, GENES[:10], flash_names=False, pre_norm=True)
    assert not load_scgpt(path).config["pre_norm"]


def test_missing_files_and_bad_weights_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_scgpt(tmp_path / "nowhere")
    (tmp_path / "args.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no vocab\.json.*no weights.*found: \['args"):
        load_scgpt(tmp_path)
    path = write_random_scgpt(tmp_path / "ok", GENES[:10])
    torch.save(nn.Linear(2, 2), path / "best_model.pt")  # a pickled module, not a state dict
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_scgpt(path)


def test_inconsistent_or_unsupported_checkpoints(tmp_path):
    path = write_random_scgpt(tmp_path / "a", GENES[:10])
    args = json.loads((path / "args.json").read_text())
    (path / "args.json").write_text(json.dumps(args | {"embsize": 512}))
    with pytest.raises(CheckpointError, match="embsize=512 but the weights have 32"):
        load_scgpt(path)
    (path / "args.json").write_text(json.dumps(args | {"input_style": "raw"}))
    with pytest.raises(CheckpointError, match="input_style='raw'"):
        load_scgpt(path)
    (path / "args.json").write_text(json.dumps(args))
    vocab = json.loads((path / "vocab.json").read_text())
    (path / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != "<cls>"}))
    with pytest.raises(CheckpointError, match="no '<cls>' token"):
        load_scgpt(path)
    (path / "vocab.json").write_text(json.dumps(vocab | {"EXTRA": 99}))
    with pytest.raises(CheckpointError, match="outside the model's 13 gene embeddings"):
        load_scgpt(path)
    (path / "vocab.json").write_text(json.dumps(vocab))
    state = torch.load(path / "best_model.pt", weights_only=True)
    torch.save(state | {"dsbn.bns.0.running_mean": torch.zeros(32)}, path / "best_model.pt")
    with pytest.raises(CheckpointError, match=r"domain_spec_batchnorm.*delete the dsbn"):
        load_scgpt(path)
    linear = {"transformer_encoder.fast_transformer_encoder.layers.0.x": torch.zeros(2)}
    torch.save(state | linear, path / "best_model.pt")
    with pytest.raises(CheckpointError, match="linear attention"):
        load_scgpt(path)
    torch.save(state, path / "best_model.pt")
    (path / "args.json").write_text(json.dumps(args | {"input_emb_style": "category"}))
    with pytest.raises(CheckpointError, match="have no value embedding table"):
        load_scgpt(path)


def test_category_values_must_index_the_table(ckpts):
    ck = ckpts["torch_category"]
    with pytest.raises(CheckpointError, match=r"cls_value=60.0 is not a row.*0\.\.52"):
        make_encoder(ck, cls_value=60)
    with pytest.raises(CheckpointError, match=r"pad_value=-2\.0 is not a row"):
        ScGPTEncoder(ck.config | {"pad_value": -2}, [0], pad_id=34, cls_id=35)


def test_load_backbone_state_is_strict(ckpts):
    ck = ckpts["flash"]
    enc = make_encoder(ck)
    state = dict(ck.state_dict)
    state.pop("transformer_encoder.layers.0.linear1.bias")
    with pytest.raises(CheckpointError, match=r"missing 1 keys.*layers\.0\.linear1\.bias"):
        enc.load_backbone_state(state)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        make_encoder(ckpts["scaling"]).load_backbone_state(
            ck.state_dict | {"encoder.enc_norm.weight": torch.ones(5)}
        )


# ---------------------------------------------------------------------------- binning
def numpy_bins(row: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The range of bins scGPT may draw for each value of ``row`` (its ``_digitize`` with
    both sides): from one past the edges below the value to the edges at or below it."""
    lo, hi = np.zeros(len(row), np.int64), np.zeros(len(row), np.int64)
    nz = row > 0
    if nz.any():
        edges = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
        hi[nz] = np.digitize(row[nz], edges)
        lo[nz] = np.minimum(np.digitize(row[nz], edges, right=True) + 1, hi[nz])
    return lo, hi


def test_bins_follow_scgpt_and_ties_take_the_middle():
    rng = np.random.default_rng(0)
    rows = [rng.gamma(0.5, 2, size=n) * (rng.random(n) > 0.3) for n in (3, 29, 57, 400)]
    rows.append(rng.poisson(0.8, size=300).astype(float))  # counts: many equal edges
    for row in rows:
        got = bin_values(torch.as_tensor(row)[None], torch.as_tensor(row > 0)[None], 51)[0]
        lo, hi = numpy_bins(row, 51)
        np.testing.assert_array_equal(got.numpy(), (lo + hi) // 2)
        assert got[row == 0].eq(0).all() and got[row > 0].ge(1).all() and got.le(50).all()
    # without equal edges there is no choice: the bin is scGPT's
    row = rng.gamma(2, 1, size=200)
    lo, hi = numpy_bins(row, 51)
    assert (lo == hi).all()


def test_random_tie_break_draws_across_the_tied_range():
    row = np.r_[np.ones(60), np.arange(2, 22, dtype=float)]  # 60 genes with one read
    x, valid = torch.as_tensor(row)[None], torch.as_tensor(row > 0)[None]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([bin_values(x, valid, 51, "random", g)[0] for _ in range(300)])
    lo, hi = numpy_bins(row, 51)
    assert hi[0] - lo[0] > 10  # a wide tie
    assert (draws[:, 0].min(), draws[:, 0].max()) == (lo[0], hi[0])
    assert abs(draws[:, 0].mean().item() - (lo[0] + hi[0]) / 2) < 1.5
    assert torch.equal(draws[:, -1], torch.full((300,), 50.0))  # the maximum: no tie
    with pytest.raises(ValueError, match="tie_break"):
        bin_values(x, valid, 51, "first")


# ---------------------------------------------------------------------------- tokenisation
def test_tokenize_cls_vocab_order_and_padding(ckpts):
    ck = ckpts["flash"]
    enc = make_encoder(ck)
    x = torch.zeros(3, len(GENES))
    x[0, [5, 1, 36, 20]] = torch.tensor([1.0, 3.0, 2.0, 2.0])  # gene 36 is not in the vocab
    x[1, 2] = 1.0
    ids, values, mask = enc.tokenize(x)
    assert ids.shape == values.shape == mask.shape == (3, 4)
    assert ids[:, 0].eq(ck.special["cls"]).all() and values[:, 0].eq(-2).all()
    assert ids[0, 1:].tolist() == [1, 5, 20]  # expressed vocabulary genes, in data order
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
    assert ids[2, 1:].eq(ck.special["pad"]).all() and values[2, 1:].eq(-2).all()
    # gene 1 is the most expressed: the top bin; a one-gene cell sits on all edges
    assert values[0, 1] == 50 and values[1, 1] == 25
    emb = enc.cell_embedding(x)
    assert torch.isfinite(emb).all() and torch.allclose(emb.norm(dim=1), torch.ones(3))


def test_max_len_keeps_the_most_expressed_genes(ckpts):
    enc = make_encoder(ckpts["flash"], max_len=3)
    x = torch.zeros(1, len(GENES))
    x[0, [0, 4, 8, 12, 16]] = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0])
    ids, values, _ = enc.tokenize(x)
    assert ids[0, 1:].tolist() == [4, 12, 16]
    # bins come from all five genes, as scGPT bins before it samples
    assert values[0, 1:].tolist() == [50.0, 37.0, 25.0]
    with pytest.raises(ValueError, match="reads at most 23 genes"):
        make_encoder(ckpts["flash"], max_len=24)


def test_log1p_input_style_normalises_over_vocabulary_genes(ckpts, tmp_path):
    path = write_random_scgpt(tmp_path, GENES[:34], max_seq_len=24)
    args = json.loads((path / "args.json").read_text())
    (path / "args.json").write_text(json.dumps(args | {"input_style": "log1p"}))
    enc = make_encoder(load_scgpt(path))
    counts = torch.zeros(1, len(GENES))
    counts[0, [0, 1, 39]] = torch.tensor([1.0, 3.0, 6.0])  # gene 39 is outside the vocab
    x = torch.log1p(counts / counts.sum() * 1e4)
    _, values, _ = enc.tokenize(x)
    expected = torch.log1p(torch.tensor([1.0, 3.0]) / 4 * 1e4)
    torch.testing.assert_close(values[0, 1:], expected)


# ---------------------------------------------------------------------------- fidelity
class ReferenceScGPT(nn.Module):
    """scGPT's ``_encode`` from its equations, on torch's own encoder layer (what scGPT
    builds without flash-attn), loaded from the checkpoint's tensors directly; written
    without the package's encoder."""

    def __init__(self, ck):
        super().__init__()
        c, s = ck.config, {k.replace("Wqkv.", "in_proj_"): v for k, v in ck.state_dict.items()}
        self.s, self.c = s, c
        layer = nn.TransformerEncoderLayer(
            c["d_model"], c["n_heads"], c["d_hid"], c["dropout"], batch_first=True
        )
        self.transformer_encoder = nn.TransformerEncoder(
            layer, c["n_layers"], enable_nested_tensor=False
        )
        own = {k: v for k, v in s.items() if k.startswith("transformer_encoder.")}
        self.load_state_dict(own, strict=True)
        self.eval()

    def _pre_norm_layers(self, h, pad):
        """scGPT's pre-norm flash layer, written out: each branch starts from the normalised
        states, and so does the residual (not torch's ``norm_first``)."""
        n_heads = self.c["n_heads"]
        for i in range(self.c["n_layers"]):
            p = f"transformer_encoder.layers.{i}."
            w = {k[len(p) :]: v for k, v in self.s.items() if k.startswith(p)}
            h = self._ln(h, f"{p}norm1")
            q, k, v = (h @ w["self_attn.in_proj_weight"].T + w["self_attn.in_proj_bias"]).chunk(
                3, -1
            )
            b, n, d = h.shape
            q, k, v = (t.view(b, n, n_heads, d // n_heads).transpose(1, 2) for t in (q, k, v))
            scores = q @ k.transpose(-1, -2) / (d // n_heads) ** 0.5
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
            h = h + a @ w["self_attn.out_proj.weight"].T + w["self_attn.out_proj.bias"]
            h = self._ln(h, f"{p}norm2")
            m = F.relu(h @ w["linear1.weight"].T + w["linear1.bias"])
            h = h + m @ w["linear2.weight"].T + w["linear2.bias"]
        return h

    def _ln(self, x, prefix):
        return F.layer_norm(x, x.shape[-1:], self.s[f"{prefix}.weight"], self.s[f"{prefix}.bias"])

    def forward(self, ids, values, pad):
        s, style = self.s, self.c["input_emb_style"]
        genes = self._ln(F.embedding(ids, s["encoder.embedding.weight"]), "encoder.enc_norm")
        if style == "continuous":
            v = values.clamp(max=512).unsqueeze(-1)
            h = F.relu(v @ s["value_encoder.linear1.weight"].T + s["value_encoder.linear1.bias"])
            h = h @ s["value_encoder.linear2.weight"].T + s["value_encoder.linear2.bias"]
            total = genes + self._ln(h, "value_encoder.norm")
        elif style == "category":
            table = s["value_encoder.embedding.weight"]
            total = genes + self._ln(F.embedding(values.long(), table), "value_encoder.enc_norm")
        else:
            total = genes * values.unsqueeze(-1)
        if self.c["pre_norm"]:
            return self._pre_norm_layers(total, pad)
        return self.transformer_encoder(total, src_key_padding_mask=pad)


@pytest.mark.parametrize("which", ["flash", "torch_category", "scaling", "pre_norm"])
def test_matches_a_reimplementation_of_scgpt(which, ckpts):
    ck = ckpts[which]
    enc = make_encoder(ck)
    x = random_x(6, seed=2)
    x[5] = 0.0  # a cell without genes: the <cls> token alone
    ids, values, mask = enc.tokenize(x)
    with torch.no_grad():
        ours = enc.encode(ids, values, mask)
        ref = ReferenceScGPT(ck)(ids, values, ~mask)
    torch.testing.assert_close(ours[mask], ref[mask], rtol=0, atol=1e-5)


@pytest.mark.skipif(
    not os.environ.get("SCFM_SCGPT_PYTHON"),
    reason="SCFM_SCGPT_PYTHON (the python of benchmarks/peers/install.sh scgpt) is not set",
)
@pytest.mark.parametrize("which", ["flash", "torch_category"])
def test_matches_the_scgpt_package(which, ckpts, tmp_path):
    ck = ckpts[which]
    enc = make_encoder(ck)
    x = random_x(6, seed=7)
    ids, values, mask = enc.tokenize(x)
    rng = np.random.default_rng(1)
    counts = np.expm1(random_x(4, seed=8).numpy())
    smooth = rng.gamma(0.5, 2, size=(3, len(GENES))) * (rng.random((3, len(GENES))) > 0.3)
    rows = np.concatenate([counts, smooth])
    # whole cells through scGPT's embed_data pipeline: no tied values, fewer genes than
    # max_seq_len (so that scGPT does not sample). A cell without vocabulary genes is left
    # out: scGPT's binning fails on it (the maximum of an empty row).
    cells = rng.gamma(1.0, 3, size=(5, len(GENES))) * (rng.random((5, len(GENES))) > 0.5)
    inputs, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(
        inputs,
        ids=ids.numpy(),
        values=values.numpy(),
        pad=(~mask).numpy(),
        rows=rows,
        cells=cells,
        gene_ids=enc.gene_token_ids.numpy(),
    )
    cmd = [os.environ["SCFM_SCGPT_PYTHON"], str(REFERENCE), ck.source, str(inputs), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    ref = np.load(out)
    with torch.no_grad():
        emb = enc.cell_embedding(torch.log1p(torch.as_tensor(cells, dtype=torch.float32)))
    np.testing.assert_allclose(emb.numpy(), ref["cell_emb"], rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = enc.encode(ids, values, mask).numpy()
    m = mask.numpy()
    np.testing.assert_allclose(ours[m], ref["hidden"][m], rtol=0, atol=1e-5)
    r = torch.as_tensor(rows)
    bins = bin_values(r, r > 0, ck.config["n_bins"]).numpy()
    draws = ref["bins"]  # (draws, rows, genes): scGPT's random choice among tied bins
    assert ((bins >= draws.min(0)) & (bins <= draws.max(0))).all()
    np.testing.assert_array_equal(bins[4:], draws[0, 4:])  # no equal edges: one answer
    assert (draws.min(0) != draws.max(0))[:4].any()  # the count rows do tie


# ---------------------------------------------------------------------------- adaptation
def test_lora_injection_by_module_name(ckpts):
    from peft import LoraConfig, inject_adapter_in_model

    from scfm_adapt.module._lora import lora_pattern

    ck = ckpts["flash"]
    wrapper = EncoderHost(make_encoder(ck))
    x = random_x(4, seed=3)
    with torch.no_grad():
        before = wrapper(x)
    pattern = lora_pattern(wrapper, ["encoder"])  # what adapt("lora") targets
    config = LoraConfig(r=4, lora_alpha=8, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, wrapper, adapter_name="a")
    lora_a = [n for n, _ in wrapper.named_parameters() if "lora_A.a." in n]
    assert len(lora_a) == 4 * len(wrapper.encoder.blocks)  # Wqkv, out_proj, linear1, linear2
    assert {n.split(".blocks.0.")[-1].split(".lora_A")[0] for n in lora_a if ".blocks.0." in n} == {
        "self_attn.Wqkv",
        "self_attn.out_proj",
        "linear1",
        "linear2",
    }
    with torch.no_grad():
        after = wrapper(x)
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    wrapper.encoder.load_backbone_state(ck.state_dict)  # peft's base_layer names map back
    with torch.no_grad():
        for n, p in wrapper.named_parameters():
            if "lora_B.a." in n:
                p.normal_(0, 0.1)
        changed = wrapper(x)
    assert not torch.allclose(changed[0], before[0])


def test_bottleneck_adapters_and_frozen_gradients(ckpts):
    enc = make_encoder(ckpts["flash"])
    x = random_x(4, seed=4)
    with torch.no_grad():
        before = enc(x)
        for block in enc.blocks:
            block.add_adapter("a", 4)
            block.active_adapter = "a"
        assert all(torch.equal(b, a) for b, a in zip(before, enc(x)))
        enc.blocks[0].adapters["a"]["mlp"].up.weight.normal_(0, 0.5)
        assert not torch.allclose(enc(x)[0], before[0])
        for block in enc.blocks:
            block.active_adapter = None
        assert torch.equal(enc(x)[0], before[0])
    enc.train()
    for n, p in enc.named_parameters():
        p.requires_grad_(not n.startswith(ScGPTEncoder.pretrained_prefixes))
    mean, var = enc(x)
    (mean.square().sum() + var.sum()).backward()
    assert enc.pool.queries.grad.abs().sum() > 0 and enc.head.weight.grad.abs().sum() > 0
    assert enc.gene_encoder.embedding.weight.grad is None


def test_import_stays_light():
    code = "import sys, scfm_adapt; print('scfm_adapt.nn._scgpt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
