"""Speed levers must not change what is computed: dropout keeps its distribution, eval is untouched."""

import torch

from pipeline.train.speed import FastDropout, fast_dropout, use_fast_dropout


def test_fast_dropout_keeps_the_dropout_distribution_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = fast_dropout(x, 0.1)
    kept = (y > 0).float().mean().item()
    assert abs(kept - 0.9) < 0.003  # 1e6 draws: sd of the keep rate is 0.0003
    assert set(torch.unique(y).tolist()) == {0.0, torch.tensor(1 / 0.9).item()}
    assert abs(y.mean().item() - 1.0) < 0.005  # inverted dropout preserves the expectation
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient flows through the same mask
    assert fast_dropout(torch.ones(3, 5, dtype=torch.bfloat16), 0.5).dtype == torch.bfloat16
    for p in (0.05, 0.5):
        rate = (fast_dropout(torch.ones(400_000), p) == 0).float().mean().item()
        assert abs(rate - p) < 0.005


def test_fast_dropout_is_seeded_by_torch():
    torch.manual_seed(3)
    a = fast_dropout(torch.ones(64, 64), 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, fast_dropout(torch.ones(64, 64), 0.2))


def test_swapped_model_is_identical_in_eval_and_trains(tiny_model_dir):
    from pipeline.core.config import LoraSettings
    from pipeline.model.encoder import apply_lora, load_encoder

    st = load_encoder(str(tiny_model_dir))
    apply_lora(st, LoraSettings(r=4, alpha=8, dropout=0.05))  # LoRA dropout on: its modules are swapped too
    feats = {"input_ids": torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    st.eval()
    before = st(dict(feats))["sentence_embedding"]
    n = use_fast_dropout(st)
    # tiny BERT: embeddings + 2 layers x (attention output, FFN output, attention probs) + LoRA on q,k,v
    assert n == 1 + 2 * 3 + 2 * 3
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in st.modules())
    assert all(m.p > 0 for m in st.modules() if isinstance(m, FastDropout))
    assert torch.equal(before, st(dict(feats))["sentence_embedding"])
    st.train()
    torch.manual_seed(0)
    out = st(dict(feats))["sentence_embedding"]
    (out * torch.randn_like(out)).sum().backward()  # lora_B starts at zero, so only it gets a gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in st.named_parameters() if "lora_B" in n_)


def _bert(tiny_model_dir, attention_dropout: float = 0.1):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_model_dir), device="cpu")
    inner = st[0].model
    for module in inner.modules():  # the tiny model's own attention dropout is the config default (0.1)
        if hasattr(module, "attention_head_size"):
            module.dropout.p = attention_dropout
    inner.config.attention_probs_dropout_prob = attention_dropout
    return st


def test_long_training_sequences_with_attention_dropout_use_eager_attention_with_the_same_maths(tiny_model_dir):
    from pipeline.core.config import LoraSettings
    from pipeline.model.encoder import apply_lora
    from pipeline.train.speed import EAGER_FROM_TOKENS, eager_attention, for_training, sdpa_for_inference

    st = _bert(tiny_model_dir)
    apply_lora(st, LoraSettings())  # as the train stage does: PEFT wraps the inner model first
    st.eval()
    texts = ["a long passage about statins and the heart " * 6, "short"]
    before = torch.tensor(st.encode(texts))
    assert st[0].model.config._attn_implementation == "sdpa"
    assert not eager_attention(st, EAGER_FROM_TOKENS - 1)  # short texts keep SDPA (and their figures)
    assert for_training(st, torch.device("cpu"), EAGER_FROM_TOKENS)["attention"] == "eager"
    assert st[0].model.config._attn_implementation == "eager"
    after = torch.tensor(st.encode(texts))
    assert torch.allclose(before, after, atol=1e-5)  # eval mode: the same attention, computed another way
    with sdpa_for_inference(st):  # validation encodes with the faster SDPA kernel, then training goes on eagerly
        assert st[0].model.config._attn_implementation == "sdpa"
    assert st[0].model.config._attn_implementation == "eager"


def test_no_attention_dropout_keeps_sdpa(tiny_model_dir):
    from pipeline.train.speed import eager_attention, sdpa_for_inference

    st = _bert(tiny_model_dir, attention_dropout=0.0)
    assert not eager_attention(st, 512) and st[0].model.config._attn_implementation == "sdpa"
    st[0].model.set_attn_implementation("eager")  # a model that is eager of its own stays so for validation
    with sdpa_for_inference(st):
        assert st[0].model.config._attn_implementation == "eager"
