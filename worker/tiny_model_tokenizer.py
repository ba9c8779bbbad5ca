"""The tiny checkpoint's tokenizer: a byte-level BPE trained on a generated corpus.

Qwen3.5's pre-tokenizer regex and NFC, 3000 entries, then Qwen's added tokens in
Qwen's order (``worker/tiny_model_spec.py: ADDED_TOKENS``). Deterministic: the corpus
is generated, not read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from worker.tiny_model_spec import ADDED_TOKENS, BPE_VOCAB_SIZE

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Qwen3.5's pre-tokenizer split (transformers' Qwen3_5Tokenizer, which AutoTokenizer
# uses for qwen3_5_moe and which rebuilds the pipeline from tokenizer.json's vocab/merges).
PRETOKENIZE_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_WORD_TEXT: Final = """
the a an and or but if then else when while for with without into onto from over under
about after before between through during against among around within across toward
server client request response queue stream worker router model token tokenizer engine
message reply prompt answer question image picture video frame pixel patch vision text
function call tool result error status code value key field object array string number
boolean null true false list dict map set tuple type class method module package import
return yield await async def lambda print assert raise except finally try with as pass
weather city country temperature unit celsius fahrenheit forecast rain snow wind sunny
search query document page file path folder directory name title author date time zone
user assistant system developer thinking reasoning content role tools arguments parameters
quick brown fox jumps lazy dog river mountain forest ocean island valley desert garden
small large tiny huge fast slow early late new old first last next previous other same
read write open close start stop begin end create delete update insert select remove
build test deploy run serve load save parse format render encode decode compute measure
simple complex random fixed stable deterministic parallel serial local remote public
memory cache buffer batch sequence length size limit budget timeout retry backoff latency
"""


def training_corpus() -> Iterator[str]:
    """Yield the deterministic tokenizer-training corpus: English, Python, JS, JSON, tool XML."""
    words = _WORD_TEXT.split()
    n = len(words)
    for i in range(600):
        w = [words[(i * k + k * k) % n] for k in (3, 7, 11, 13, 17, 19, 23)]
        yield f"{w[0].capitalize()} {w[1]} {w[2]}s {w[3]}ing, {w[4].upper()} {w[5]}ed {w[6]}."
    for i in range(200):
        a, b, c = words[(i * 5) % n], words[(i * 9 + 1) % n], words[(i * 31 + 2) % n]
        yield (
            f"def {a}_{b}({c}: str, limit: int = {i}) -> dict[str, int]:\n"
            f'    """{a.capitalize()} the {b} of {c}."""\n'
            f'    return {{"{c}": len({c}) + {i % 10}}}\n'
        )
        yield f"class {a.capitalize()}{b.capitalize()}:\n    {c}_{a}: int = {i}\n"
        yield json.dumps({"name": f"{a}_{b}", "arguments": {c: f"{a} {b}", "n": i, "ok": i % 2}})
        yield f"<function={a}_{b}>\n<parameter={c}>\n{b} {a}\n</parameter>\n</function>"
        yield f"const {a}{b.capitalize()} = await fetch(`/{a}/{b}?{c}=${{id}}`);"


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE and append Qwen's added tokens (deterministic)."""
    import tokenizers as tk

    pre = tk.pre_tokenizers
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.normalizer = tk.normalizers.NFC()
    tokenizer.pre_tokenizer = pre.Sequence(
        [
            pre.Split(tk.Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(training_corpus(), trainer)
    if tokenizer.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE vocab {tokenizer.get_vocab_size()} != {BPE_VOCAB_SIZE}")
    for content, special in ADDED_TOKENS:  # one at a time: keeps Qwen's id order
        token = tk.AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    return tokenizer
