"""The pure BERT encoder and its heads against transformers' BertForSequenceClassification / BertForMaskedLM."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import purefine as pf
from purefine.errors import ConfigError, DataError
from purefine.models import bert

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, type_vocab_size=2)


def make_hf_bert(path, head="classify", *, seed=0, **kw):
    """A random tiny transformers BERT with ``head`` saved to ``path`` (LayerNorms, biases random too)."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    torch.manual_seed(seed)
    cls = BertForSequenceClassification if head == "classify" else BertForMaskedLM
    model = cls(BertConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


def padded_batch(vocab, types, seed, b=3, t=10):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=gen)
    token_types = torch.randint(0, types, (b, t), generator=gen)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, 6:] = 0
    attn[2, 3:] = 0
    return tokens, token_types, attn


@st.composite
def bert_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(hidden_size=heads * draw(st.sampled_from([4, 8])), num_attention_heads=heads,
                num_hidden_layers=draw(st.integers(1, 3)), intermediate_size=draw(st.integers(8, 40)),
                vocab_size=draw(st.integers(16, 64)), type_vocab_size=draw(st.integers(1, 3)),
                hidden_act=draw(st.sampled_from(["gelu", "gelu_new", "relu"])), num_labels=draw(st.integers(2, 5)))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=bert_configs(), head=st.sampled_from(["classify", "mlm"]), seed=st.integers(0, 2**16))
def test_hidden_states_and_logits_match_transformers_fp32(tmp_path_factory, kw, head, seed):
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_bert(path, head, seed=seed, **kw)
    cfg, params = pf.checkpoint.load_hf(path)
    assert cfg.head == head and cfg.num_labels == kw["num_labels"]
    tokens, types, attn = padded_batch(kw["vocab_size"], kw["type_vocab_size"], seed)
    with torch.no_grad():
        ref = model(tokens, attention_mask=attn, token_type_ids=types, output_hidden_states=True)
        h, _ = pf.models.hidden_states(cfg, params, tokens, mask=attn.bool(), extra={"token_type_ids": types})
        logits = pf.models.forward(cfg, params, tokens, mask=attn.bool(), extra={"token_type_ids": types})
        unpadded = pf.models.forward(cfg, params, tokens, extra={"token_type_ids": types})
        ref_unpadded = model(tokens, token_type_ids=types).logits
    real = attn.bool()
    assert (h - ref.hidden_states[-1])[real].abs().max() < 1e-4
    assert logits.shape == ref.logits.shape == ((3, kw["num_labels"]) if head == "classify" else (3, 10, kw["vocab_size"]))
    assert ((logits - ref.logits)[real] if head == "mlm" else logits - ref.logits).abs().max() < 1e-4
    assert (unpadded - ref_unpadded).abs().max() < 1e-4


def test_classification_losses_equal_transformers(tmp_path):
    for problem, num_labels, labels in (
        ("single_label_classification", 3, torch.tensor([0, 2, 1])),
        ("regression", 1, torch.tensor([0.5, -1.0, 2.0])),
        ("multi_label_classification", 3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])),
    ):
        model = make_hf_bert(tmp_path / problem, num_labels=num_labels, problem_type=problem)
        cfg, params = pf.checkpoint.load_hf(tmp_path / problem)
        assert cfg.problem == problem
        tokens, types, attn = padded_batch(64, 2, 0)
        batch = {"tokens": tokens, "token_type_ids": types, "mask": attn.bool(), "labels": labels}
        with torch.no_grad():
            ref = model(tokens, attention_mask=attn, token_type_ids=types, labels=labels).loss
            loss, n = pf.models.loss_fn(cfg)(params, batch)
        torch.testing.assert_close(loss / n, ref, atol=1e-5, rtol=1e-5)


def test_masked_lm_loss_equals_transformers(tmp_path):
    model = make_hf_bert(tmp_path, "mlm")
    cfg, params = pf.checkpoint.load_hf(tmp_path)
    tokens, types, attn = padded_batch(64, 2, 1)
    labels = torch.full_like(tokens, -100)
    labels[0, [1, 4]], labels[1, 2], labels[2, 0] = torch.tensor([5, 9]), 17, 63
    batch = {"tokens": tokens, "token_type_ids": types, "mask": attn.bool(), "labels": labels}
    with torch.no_grad():
        ref = model(tokens, attention_mask=attn, token_type_ids=types, labels=labels).loss
        loss, n = pf.models.loss_fn(cfg)(params, batch)
    assert n == 4
    torch.testing.assert_close(loss / n, ref, atol=1e-5, rtol=1e-5)


def test_classification_loss_trains_and_remat_matches():
    cfg = pf.models.preset("bert-debug")
    params = pf.tree.map(lambda x: x.requires_grad_(), pf.models.init(cfg, seed=0))
    tokens, types, attn = padded_batch(cfg.vocab_size, 2, 2, b=4)
    batch = {"tokens": tokens, "mask": attn.bool(), "labels": torch.tensor([0, 1, 1, 0])}
    leaves = [x for _, x in pf.tree.leaves_with_paths(params)]
    grads = []
    for remat in (False, True):
        loss, n = pf.models.loss_fn(cfg, remat=remat)(params, batch)
        grads.append(torch.autograd.grad(loss / n, leaves))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    first = (loss / n).item()
    for _ in range(10):  # plain SGD on the pure loss: the classifier fits four examples
        loss, n = pf.models.loss_fn(cfg)(params, batch)
        step = torch.autograd.grad(loss / n, leaves)
        with torch.no_grad():
            for x, g in zip(leaves, step):
                x -= 0.2 * g
    assert (loss / n).item() < 0.5 * first


def test_with_head_turns_a_masked_lm_into_a_classifier(tmp_path):
    from transformers import BertForSequenceClassification

    make_hf_bert(tmp_path / "mlm", "mlm")
    cfg, params = pf.checkpoint.load_hf(tmp_path / "mlm")
    new_cfg, new = bert.with_head(cfg, params, "classify", num_labels=3, seed=1, label_names=("a", "b", "c"))
    assert "cls" not in new and new["classifier"]["weight"].shape == (3, 32)
    assert torch.equal(new["bert"]["encoder"]["layer"][1]["output"]["dense"]["weight"],
                       params["bert"]["encoder"]["layer"][1]["output"]["dense"]["weight"])
    pf.checkpoint.save_hf(tmp_path / "cls", new_cfg, new)
    again = BertForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    assert again.config.id2label == {0: "a", 1: "b", 2: "c"}
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert (again(tokens).logits - pf.models.forward(new_cfg, new, tokens)).abs().max() < 1e-4


def test_transformers_round_trip_and_bit_exact_save_load(tmp_path):
    for head in ("classify", "mlm"):
        model = make_hf_bert(tmp_path / head, head, num_labels=4)
        cfg, params = pf.checkpoint.load_hf(tmp_path / head)
        pf.checkpoint.save_hf(tmp_path / f"{head}-out", cfg, params)
        again = type(model).from_pretrained(tmp_path / f"{head}-out").eval()
        tokens = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            assert torch.equal(again(tokens).logits, model(tokens).logits)
        cfg2, back = pf.checkpoint.load_hf(tmp_path / f"{head}-out")
        assert cfg2 == cfg
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(pf.tree.leaves_with_paths(back), pf.tree.leaves_with_paths(params)))


def test_legacy_pretraining_checkpoint_loads_as_masked_lm(tmp_path):
    model = make_hf_bert(tmp_path / "src", "mlm")
    legacy = {}
    for name, t in model.state_dict().items():
        if name.startswith("cls.predictions.decoder."):
            continue
        legacy[name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = t.contiguous()
    legacy |= {"bert.pooler.dense.weight": torch.zeros(32, 32), "bert.pooler.dense.bias": torch.zeros(32),
               "cls.seq_relationship.weight": torch.zeros(2, 32), "cls.seq_relationship.bias": torch.zeros(2),
               "bert.embeddings.position_ids": torch.arange(32)[None]}
    (tmp_path / "old").mkdir()
    save_file(legacy, tmp_path / "old" / "model.safetensors")
    config = (tmp_path / "src" / "config.json").read_text().replace("BertForMaskedLM", "BertForPreTraining")
    (tmp_path / "old" / "config.json").write_text(config)
    cfg, params = pf.checkpoint.load_hf(tmp_path / "old")
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert cfg.head == "mlm" and (pf.models.forward(cfg, params, tokens) - model(tokens).logits).abs().max() < 1e-4


def test_presets_and_bad_input():
    assert pf.models.preset("bert-base-uncased").num_params == 109_514_298  # BertForMaskedLM
    cfg = pf.models.preset("bert-debug")
    params = pf.models.init(cfg, seed=0)
    assert torch.equal(params["bert"]["embeddings"]["word_embeddings"]["weight"][0], torch.zeros(64))  # pad row
    with pytest.raises(ConfigError, match="no KV cache"):
        pf.models.new_cache(cfg, 1, 8, dtype=torch.float32)
    with pytest.raises(ConfigError, match="architectures"):
        pf.models.config_from_hf({"model_type": "bert", "architectures": ["BertForQuestionAnswering"]})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        bert.BertConfig(tie_word_embeddings=False)
    batch = {"tokens": torch.zeros(2, 4, dtype=torch.long), "labels": torch.tensor([0, 7])}
    with pytest.raises(DataError, match=r"labels must be in \[0, 2\)"):
        pf.models.loss_fn(cfg)(params, batch)
