"""Models built from gptkern.nn: GPT (with Hugging Face GPT-2 import/export), a sequence classifier
and an encoder-decoder for translation."""
from gptkern.models.classification import GPTForSequenceClassification
from gptkern.models.config import PRESETS, GPTConfig
from gptkern.models.gpt import GPT, GPTBody
from gptkern.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

__all__ = ["GPTConfig", "GPT", "GPTBody", "PRESETS", "GPTForSequenceClassification", "Seq2SeqConfig",
           "Seq2SeqTransformer"]
