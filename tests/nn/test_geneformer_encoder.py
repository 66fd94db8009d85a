"""Geneformer-style BERT as a cell encoder: checkpoint files, vocabulary, tokenisation,
faithfulness to ``transformers.BertModel`` and the adaptation hooks (LoRA, adapters)."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from conftest import EncoderHost
from scfm_adapt.data._geneformer import (
    find_geneformer_files,
    load_geneformer,
    load_mapping,
    map_genes_to_vocab,
    safe_load_pickle,
    write_random_geneformer,
)
from scfm_adapt.errors import CheckpointError, GeneMismatchError
from scfm_adapt.nn._geneformer import GeneformerEncoder

GENES = [f"ENSG{i:011d}" for i in range(40)]


@pytest.fixture(scope="module")
def ckpt_v1(tmp_path_factory):
    path = tmp_path_factory.mktemp("gf_v1")
    medians = {g: 0.5 + (i % 7) / 3 for i, g in enumerate(GENES)}
    write_random_geneformer(path, GENES, max_len=16, medians=medians, seed=1)
    return load_geneformer(path)


@pytest.fixture(scope="module")
def ckpt_v2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gf_v2")
    write_random_geneformer(path, GENES, max_len=16, v2=True, seed=2)
    return load_geneformer(path)


def make_encoder(ckpt, genes=GENES, max_len=None, **kw) -> GeneformerEncoder:
    ids, _ = map_genes_to_vocab(genes, ckpt.vocab, min_fraction=0.0)
    enc = GeneformerEncoder(
        ckpt.config,
        ids,
        n_tokens=4,
        token_dim=8,
        pad_id=ckpt.special["pad"],
        cls_id=ckpt.special["cls"],
        eos_id=ckpt.special["eos"],
        max_len=max_len,
        **kw,
    )
    enc.load_backbone_state(ckpt.state_dict)
    return enc.eval()


def random_x(n_cells: int, n_genes: int = len(GENES), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(n_cells, n_genes, generator=g) * 2, generator=g)
    lib = counts.sum(1, keepdim=True).clamp(min=1)
    return torch.log1p(counts / lib * 1e4)


# ---------------------------------------------------------------------------- files
def test_checkpoint_round_trip(ckpt_v1, ckpt_v2):
    assert ckpt_v1.special == {"pad": 0, "mask": 1, "cls": None, "eos": None}
    assert ckpt_v2.special == {"pad": 0, "mask": 1, "cls": 2, "eos": 3}
    assert ckpt_v1.vocab[GENES[0]] == 2 and ckpt_v2.vocab[GENES[0]] == 4
    assert ckpt_v1.max_len == 16 and ckpt_v2.max_len == 14
    assert ckpt_v2.medians is None
    assert all(isinstance(v, float) for v in ckpt_v1.medians.values())
    keys = list(ckpt_v1.state_dict)
    assert "embeddings.word_embeddings.weight" in keys
    assert not any(k.startswith(("bert.", "cls.", "pooler.")) for k in keys)
    assert re.fullmatch(r"[0-9a-f]{64}", ckpt_v1.sha256)


def test_pytorch_bin_weights(tmp_path, ckpt_v1):
    from safetensors.torch import load_file

    write_random_geneformer(tmp_path, GENES, max_len=16, seed=1)
    full = load_file(str(tmp_path / "model.safetensors"))
    torch.save(full, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    ckpt = load_geneformer(tmp_path)
    assert set(ckpt.state_dict) == set(ckpt_v1.state_dict)
    for k, v in ckpt.state_dict.items():
        assert torch.equal(v, ckpt_v1.state_dict[k])


def test_missing_files_are_named(tmp_path):
    write_random_geneformer(tmp_path, GENES[:4], max_len=8)
    (tmp_path / "token_dictionary.pkl").rename(tmp_path / "elsewhere.pkl")
    with pytest.raises(CheckpointError, match=r"no token dictionary.*token_dictionary=") as err:
        find_geneformer_files(tmp_path)
    assert "config.json" in str(err.value)  # lists what was found
    ckpt = load_geneformer(tmp_path, token_dictionary=tmp_path / "elsewhere.pkl")
    assert ckpt.vocab[GENES[0]] == 2
    with pytest.raises(CheckpointError, match="not a folder"):
        find_geneformer_files(tmp_path / "nope")


# ---------------------------------------------------------------------------- pickles
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_load_pickle_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "ENSG1": _Evil(marker)}))
    with pytest.raises(CheckpointError, match=r"token_dictionary\.pkl.*(posix|nt)\.system"):
        safe_load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_safe_load_pickle_numpy_scalars(tmp_path, protocol):
    data = {"ENSG1": np.float64(0.25), "ENSG2": np.float32(2.0), "n": np.int64(3), "s": [1, None]}
    path = tmp_path / "gene_median_dictionary.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    out = safe_load_pickle(path)
    assert out == {"ENSG1": 0.25, "ENSG2": 2.0, "n": 3, "s": [1, None]}
    assert type(out["ENSG1"]) is float and type(out["n"]) is int
    js = tmp_path / "medians.json"
    js.write_text(json.dumps({"ENSG1": 0.25}))
    assert load_mapping(js) == {"ENSG1": 0.25}
    with pytest.raises(CheckpointError, match="unknown dictionary format"):
        load_mapping(tmp_path / "medians.csv")


# ---------------------------------------------------------------------------- vocabulary
def test_map_genes_to_vocab(ckpt_v2):
    vocab = ckpt_v2.vocab
    names = [GENES[0], "SYMB1", GENES[1] + ".7", GENES[0], "<cls>", "unknown"]
    ids, frac = map_genes_to_vocab(names, vocab, id_map={"SYMB1": GENES[5]}, min_fraction=0.4)
    # symbol via id_map, a versioned Ensembl id, a duplicate (-1) and a special (-1)
    assert ids.dtype == np.int64
    assert ids.tolist() == [vocab[GENES[0]], vocab[GENES[5]], vocab[GENES[1]], -1, -1, -1]
    assert frac == pytest.approx(3 / 6)


def test_map_genes_to_vocab_threshold_message(ckpt_v1):
    names = GENES[:3] + [f"GENE{i}" for i in range(22)]
    with pytest.raises(GeneMismatchError) as err:
        map_genes_to_vocab(names, ckpt_v1.vocab)
    msg = str(err.value)
    assert "12.0% of the 25 genes (3)" in msg and "vocabulary of 40 genes" in msg
    assert "GENE0" in msg and "go_gene_ids" in msg and "gene_id_key" in msg


# ---------------------------------------------------------------------------- tokenisation
def test_tokenize_ties_by_gene_index(ckpt_v1):
    enc = make_encoder(ckpt_v1)
    x = torch.zeros(2, len(GENES))
    x[0, [9, 3, 7, 20]] = 1.0  # a four-way tie
    x[0, 30] = 2.0
    x[1, [15, 2]] = 0.5
    ids, mask = enc.tokenize(x)
    tok = enc.gene_token_ids
    assert ids.shape == (2, 5)
    assert ids[0].tolist() == tok[[30, 3, 7, 9, 20]].tolist()
    assert ids[1].tolist() == [*tok[[2, 15]].tolist(), 0, 0, 0]
    assert mask.tolist() == [[True] * 5, [True, True, False, False, False]]
    again, _ = enc.tokenize(x.clone())
    assert torch.equal(ids, again)


def test_tokenize_out_of_vocab_medians_truncation(ckpt_v1):
    genes = [*GENES[:10], "NOT_A_GENE1", "NOT_A_GENE2"]
    enc = make_encoder(ckpt_v1, genes=genes, max_len=4)
    tok = enc.gene_token_ids
    assert tok[10:].tolist() == [-1, -1]
    x = torch.zeros(1, 12)
    x[0, :10] = torch.linspace(0.1, 1.0, 10)  # gene 9 highest
    x[0, 10:] = 5.0  # the highest expression, but outside the vocabulary
    ids, mask = enc.tokenize(x)
    assert ids.shape == (1, 4) and bool(mask.all())  # truncated to max_len
    assert ids[0].tolist() == tok[[9, 8, 7, 6]].tolist()
    # A large median pushes gene 9 down: its score becomes the smallest.
    medians = torch.ones(12)
    medians[9] = 100.0
    enc.set_gene_medians(medians)
    ids, _ = enc.tokenize(x)
    assert ids[0].tolist() == tok[[8, 7, 6, 5]].tolist()
    with pytest.raises(ValueError, match="positive"):
        enc.set_gene_medians(torch.zeros(12))


def test_tokenize_cls_eos(ckpt_v2):
    enc = make_encoder(ckpt_v2, max_len=3)
    x = torch.zeros(3, len(GENES))
    x[0, [4, 5, 6, 7]] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # truncated to 3 genes
    x[1, 11] = 1.0
    ids, mask = enc.tokenize(x)  # x[2]: no gene
    tok = enc.gene_token_ids
    assert ids.shape == (3, 5)
    assert ids[0].tolist() == [2, *tok[[7, 6, 5]].tolist(), 3]
    assert ids[1].tolist() == [2, tok[11].item(), 3, 0, 0]
    assert ids[2].tolist() == [2, 3, 0, 0, 0]
    assert mask.sum(1).tolist() == [5, 3, 2]
    with pytest.raises(ValueError, match="at most 14 genes"):
        make_encoder(ckpt_v2, max_len=15)


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_empty_cell_is_finite(which, ckpt_v1, ckpt_v2):
    enc = make_encoder(ckpt_v1 if which == "v1" else ckpt_v2).train()
    for x in (torch.zeros(2, len(GENES)), torch.cat([torch.zeros(1, len(GENES)), random_x(1)])):
        mean, var = enc(x)
        assert mean.shape == (2, 4, 8) and torch.isfinite(mean).all()
        assert torch.isfinite(var).all() and (var > 0).all()
        (mean.sum() + var.sum()).backward()
        assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
        enc.zero_grad()


# ---------------------------------------------------------------------------- faithfulness
@pytest.mark.parametrize(("which", "attn"), [("v1", "sdpa"), ("v2", "eager")])
def test_matches_transformers_bert(which, attn, ckpt_v1, ckpt_v2):
    from transformers import BertConfig, BertModel

    ckpt = ckpt_v1 if which == "v1" else ckpt_v2
    enc = make_encoder(ckpt)
    config = BertConfig.from_dict(ckpt.config, attn_implementation=attn)
    ref = BertModel(config, add_pooling_layer=False).eval()
    ref.load_state_dict(ckpt.state_dict)
    x = random_x(5)
    x[1, :30] = 0  # a short cell, so the batch is padded
    with torch.no_grad():
        h, ids, mask = enc.token_states(x)
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert bool((~mask).any())  # padding was exercised
    torch.testing.assert_close(h, want, atol=1e-5, rtol=1e-5)


def test_load_backbone_state_is_strict(ckpt_v1):
    enc = make_encoder(ckpt_v1)
    bad = dict(ckpt_v1.state_dict)
    bad["encoder.layer.0.attention.self.qkv.weight"] = bad.pop(
        "encoder.layer.0.attention.self.query.weight"
    )
    with pytest.raises(CheckpointError, match=r"missing 1 keys.*unexpected 1 keys"):
        enc.load_backbone_state(bad)
    wrong = dict(ckpt_v1.state_dict)
    wrong["embeddings.word_embeddings.weight"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        enc.load_backbone_state(wrong)
    extra = dict(ckpt_v1.state_dict)
    extra["pooler.dense.weight"] = torch.zeros(32, 32)  # ignored
    enc.load_backbone_state(extra)


def test_parameter_names_unique_and_prefixed(ckpt_v1):
    enc = make_encoder(ckpt_v1)
    names = [n for n, _ in enc.named_parameters()]
    assert len(names) == len({id(p) for p in enc.parameters()})
    backbone = [n for n in names if n.startswith(GeneformerEncoder.pretrained_prefixes)]
    assert len(backbone) == len(ckpt_v1.state_dict)
    assert not hasattr(enc, "bert")


# ---------------------------------------------------------------------------- adaptation
def test_lora_injection_by_module_name(ckpt_v1):
    from peft import LoraConfig, inject_adapter_in_model

    wrapper = EncoderHost(make_encoder(ckpt_v1))
    x = random_x(4, seed=3)
    with torch.no_grad():
        before = wrapper(x)
    names = "|".join(re.escape(t) for t in GeneformerEncoder.lora_targets)
    pattern = rf"^encoder(?:\.blocks\.\d+)?\.(?:{names})$"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, wrapper, adapter_name="a")
    lora_a = [n for n, _ in wrapper.named_parameters() if "lora_A.a." in n]
    assert len(lora_a) == len(GeneformerEncoder.lora_targets) * len(wrapper.encoder.blocks)
    with torch.no_grad():
        after = wrapper(x)
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    # the backbone still loads (peft's base_layer names are mapped back)
    wrapper.encoder.load_backbone_state(ckpt_v1.state_dict)
    with torch.no_grad():
        for n, p in wrapper.named_parameters():
            if "lora_B.a." in n:
                p.normal_(0, 0.1)
        changed = wrapper(x)
    assert not torch.allclose(changed[0], before[0])


def test_bottleneck_adapters(ckpt_v2):
    enc = make_encoder(ckpt_v2)
    x = random_x(4, seed=4)
    with torch.no_grad():
        before = enc(x)
        for block in enc.blocks:
            block.add_adapter("a", 4)
            block.active_adapter = "a"
        after = enc(x)
        assert all(torch.equal(b, a) for b, a in zip(before, after))
        enc.blocks[0].adapters["a"]["mlp"].up.weight.normal_(0, 0.5)
        changed = enc(x)
        assert not torch.allclose(changed[0], before[0])
        for block in enc.blocks:
            block.active_adapter = None
        assert torch.equal(enc(x)[0], before[0])


def test_gradients_reach_pooling(ckpt_v1):
    enc = make_encoder(ckpt_v1).train()
    for n, p in enc.named_parameters():
        p.requires_grad_(not n.startswith(GeneformerEncoder.pretrained_prefixes))
    mean, var = enc(random_x(3, seed=5))
    (mean.square().sum() + var.sum()).backward()
    for p in (enc.pool.queries, enc.head.weight, enc.pool.q.weight, enc.pool.kv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert enc.embeddings.word_embeddings.weight.grad is None
