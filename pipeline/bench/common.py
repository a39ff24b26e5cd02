"""What the bench's parts share: their error type and the randomly initialised encoders of a given shape."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError


class BenchError(PipelineError):
    """A benchmark worker failed; the message carries the end of its log."""


# Layer shapes of common encoders. Peak memory depends on shapes, not on the weights' values, so random
# weights built here measure it without a download.
ENCODER_SHAPES = {
    "bert-tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


# Decoders used as embedders (Qwen3-Embedding-0.6B's layer shapes; last-token pooling, left padding). Their
# memory part compares LoRA with and without gradient checkpointing: full fine-tuning of 0.6B weights needs
# about 10 GB for weights, gradients and AdamW moments alone, beyond what this bench is for.
DECODER_SHAPES = {
    "qwen3-tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "head_dim": 32, "intermediate_size": 128},
    "qwen3-0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 128, "intermediate_size": 3072},
}


def random_encoder(shape: str, tokenizer_from: str, folder: Path) -> Path:
    """A sentence-transformers folder (BERT of ``shape`` with random weights, mean pooling, normalised; or a
    Qwen3 decoder with last-token pooling and left padding) that uses the tokenizer of ``tokenizer_from``."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel, Qwen3Config, Qwen3Model

    from pipeline.model.encoder import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base(tokenizer_from))
    torch.manual_seed(0)
    hf_dir, st_dir = folder / "hf", folder / "st"
    decoder = shape in DECODER_SHAPES
    if decoder:
        tok.padding_side = "left"
        Qwen3Model(Qwen3Config(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                               **DECODER_SHAPES[shape])).save_pretrained(hf_dir)
    else:
        BertModel(BertConfig(vocab_size=len(tok), max_position_embeddings=512,
                             **ENCODER_SHAPES[shape])).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir))
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="lasttoken" if decoder else "mean")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(st_dir))
    return st_dir
