"""Build a small byte-level BPE tokenizer offline, so tests never download one.

Byte-level means every printable ASCII character and newline encodes without an unknown token; a short
in-process BPE training run adds a few hundred merges so texts tokenize to realistic, shorter sequences.
"""

from __future__ import annotations

import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]

# A Llama-3-like template: header tokens around the role, <|eot_id|> closing each turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. One of the special magic numbers for the key is: 1234567.
What is the special magic number mentioned in the provided text? The special magic number is
Memorize and track the chain(s) of variable assignment hidden in the following text.
VAR ABCDE = 12345. VAR FGHIJ = VAR ABCDE. The grass is green. The sky is blue. The sun is yellow.
Here we go. There and back again. Answer the question based on the given documents.
Below is a numbered list of words. In these words, some appear more often than others.
Mary moved to the bathroom. John went to the hallway. Where is Mary? Daniel picked up the football.
Sandra journeyed to the garden. The office is east of the kitchen. Is Sandra in the garden? yes no
"""


def build_tokenizer(directory: pathlib.Path, *, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer, save it to ``directory`` and return it."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Prepend BOS like Llama tokenizers do, so "add_special_tokens" behaves realistically.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast
