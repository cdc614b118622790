"""Train the tiny long-context Llama shipped as star_lightning's default model.

Global (ordinary causal) attention, from scratch, on one GPU in minutes. Why this recipe: a character-level
vocabulary makes copying a retrieved value exact (one token per character); a length curriculum, several
needles and queries per sequence and a 20x loss weight on answer tokens make retrieval train at all in the
time budget (see shared/FIELD_NOTES.md); and training up to the longest evaluated length (4096) is needed
because accuracy collapses beyond the trained length.

Data is generated on the fly and offline: a language-modelling share on Python's own documentation text
(`pydoc_data.topics`) and RULER-style retrieval tasks (needle in a haystack with single/multiple keys, values
and queries; variable tracking) over noise, pydoc and needle haystacks, always context first, query after.

    python scripts/train_tiny_lm.py --out runs/tiny_lm --seed 0 --steps 4000 --max-minutes 8
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))  # every printable ASCII char, tab and newline
VOCAB_SIZE = 128  # 101 used ids, rounded up to a multiple of 64 for the embedding matmul
ANSWER_WEIGHT = 20.0
TYPE_WORDS = {"numbers": ("numbers", "number"), "words": ("words", "word"), "uuids": ("uuids", "uuid")}
ASCII_FIXES = {
    "\u2019": "'",
    "\u2018": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2026": "...",
    "\u2014": "--",
    "\u2013": "-",
}


# ----------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(corpus: list[str]):
    """Train a character-level BPE (no merges) with `tokenizers`; returns a PreTrainedTokenizerFast.

    Zero merges on purpose: multi-character tokens would split the same 7-digit number differently in the
    needle and in the answer, which a 5M-parameter model cannot learn to copy in minutes.
    """
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIALS) + len(ALPHABET),
        special_tokens=SPECIALS,
        initial_alphabet=list(ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=8192,
    )
    vocab = fast.get_vocab()
    assert [vocab[s] for s in SPECIALS] == [PAD_ID, BOS_ID, EOS_ID, UNK_ID], vocab
    assert all(c in vocab for c in ALPHABET) and len(vocab) <= VOCAB_SIZE
    return fast


def char_table(vocab: dict[str, int]) -> np.ndarray:
    """Byte -> token id lookup, so the data workers encode text with one numpy gather."""
    table = np.full(256, UNK_ID, dtype=np.int64)
    for c in ALPHABET:
        table[ord(c)] = vocab[c]
    return table


def pydoc_text() -> str:
    """Python's documentation topics as plain ASCII (the offline English corpus)."""
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
    for bad, good in ASCII_FIXES.items():
        text = text.replace(bad, good)
    return "".join(c if c in ALPHABET else "?" for c in text)


# ----------------------------------------------------------------------------------------------- tasks
@dataclass
class Piece:
    text: str
    answer: bool = False  # answer tokens get ANSWER_WEIGHT in the loss
    eos: bool = False  # append the </s> token after the text


class TaskSampler:
    """RULER-style samples: a context (instructions + haystack with needles) followed by queries/answers."""

    def __init__(self, corpus: str, rng: np.random.Generator, easy: bool = False):
        self.corpus = corpus
        self.rng = rng
        self.easy = easy  # warm-up stage: no distractor needles, one value per key, one chain
        words = sorted(set(re.findall(r"\b[a-z]{3,10}\b", corpus)))
        self.words = words

    # --- values and keys -------------------------------------------------------------------------------
    def word(self) -> str:
        r = self.rng
        if r.random() < 0.15:  # unseen letter strings keep the copy mechanism from memorising the word list
            return "".join(r.choice(list(string.ascii_lowercase), size=int(r.integers(4, 10))))
        return f"{self.words[r.integers(len(self.words))]}-{self.words[r.integers(len(self.words))]}"

    def value(self, kind: str) -> str:
        r = self.rng
        if kind == "numbers":
            return str(int(r.integers(10**6, 10**7)))
        if kind == "words":
            return self.word()
        h = "".join(r.choice(list("0123456789abcdef"), size=32))
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"

    # --- haystacks -------------------------------------------------------------------------------------
    def haystack(self, kind: str, n_chars: int, needle_kind: tuple[str, str], avoid: set[str]) -> tuple[str, str]:
        """Return (haystack text of exactly n_chars, joiner used between units)."""
        r = self.rng
        n_chars = max(n_chars, 0)
        joiner = "\n" if r.random() < 0.5 else " "
        if kind == "essay":
            start = int(r.integers(0, len(self.corpus) - n_chars - 1))
            text = self.corpus[start : start + 2 * n_chars + 64]
            if r.random() < 0.5:  # RULER joins essay words with single spaces
                text = " ".join(text.split())
            return text[:n_chars], " "
        units: list[str] = []
        total = 0
        while total < n_chars:
            if kind == "noise":
                unit = (
                    NOISE
                    if r.random() < 0.7
                    else " ".join(s + "." for s in NOISE[:-1].split(". ")[int(r.integers(0, 3)) :])
                )
            else:  # "needle": distractor needles with other keys, as RULER's niah_multikey_2/3
                key = self.value(needle_kind[0])
                while key in avoid:
                    key = self.value(needle_kind[0])
                unit = f"One of the special magic {needle_kind[1]} for {key} is: {self.value(needle_kind[1])}."
            units.append(unit)
            total += len(unit) + 1
        return joiner.join(units)[:n_chars], joiner

    def insert(self, hay: str, joiner: str, items: list[str]) -> str:
        """Insert items in order at random unit/sentence boundaries of the haystack."""
        r = self.rng
        bounds = [m.end() for m in re.finditer(r"[.!?]\s|\n", hay)] or [0]
        bounds = [0, *bounds, len(hay)]
        pos = np.sort(r.choice(bounds, size=len(items), replace=True))
        out, last = [], 0
        for p, item in zip(pos, items, strict=True):
            p = int(p)
            out.append(hay[last:p])
            sep_l = "" if p == 0 or hay[p - 1] in " \n" else joiner
            sep_r = "" if p < len(hay) and hay[p] in " \n" else joiner
            out.append(f"{sep_l}{item}{sep_r}" if p < len(hay) else f"{sep_l}{item}")
            last = p
        out.append(hay[last:])
        return "".join(out)

    # --- NIAH ------------------------------------------------------------------------------------------
    def niah(self, n_tokens: int) -> list[Piece]:
        """Retry with fewer needles/queries until at least a quarter of the sequence is haystack."""
        for level in range(int(self.easy), 3):
            pieces, hay_chars = self._niah(n_tokens, level)
            if hay_chars >= n_tokens // 4:
                break
        return pieces

    def _niah(self, n_tokens: int, level: int) -> tuple[list[Piece], int]:
        r = self.rng
        hay_kind = r.choice(["noise", "essay", "needle"], p=[0.45, 0.55, 0.0] if self.easy else [0.35, 0.45, 0.2])
        v_kind = r.choice(["numbers", "words", "uuids"], p=[0.5, 0.25, 0.25])
        k_kind = (
            "uuids" if (hay_kind == "needle" and r.random() < 0.5) else ("numbers" if r.random() < 0.05 else "words")
        )
        plural, singular = TYPE_WORDS[v_kind]
        n_queries = max(1, min(4, n_tokens // 1024 + int(r.integers(0, 2)))) if level < 2 else 1
        n_keys = int(r.integers(n_queries, n_queries + 2 + n_tokens // 1024)) if level == 0 else n_queries
        keys: list[str] = []
        while len(keys) < n_keys:
            k = self.value(k_kind)
            if k not in keys:
                keys.append(k)
        values = {
            k: [self.value(v_kind) for _ in range(1 if (r.random() < 0.7 or level) else int(r.integers(2, 5)))]
            for k in keys
        }
        needles = [(k, v) for k in keys for v in values[k]]
        order = r.permutation(len(needles))
        needles = [needles[i] for i in order]
        needle_texts = [f"One of the special magic {plural} for {k} is: {v}." for k, v in needles]
        text_order = {k: [v for kk, v in needles if kk == k] for k in keys}  # values in order of appearance

        # queries: one key (possibly with several values) or several keys at once (niah_multiquery)
        queried = [keys[i] for i in r.permutation(n_keys)[:n_queries]]
        groups: list[list[str]] = []
        i = 0
        while i < len(queried):
            g = 1 if r.random() < 0.6 else int(r.integers(2, 5))
            groups.append(queried[i : i + g])
            i += g
        q_pieces: list[Piece] = []
        for g in groups:
            q = ", ".join(g[:-1]) + (", and " if len(g) > 2 else " and ") + g[-1] if len(g) > 1 else g[0]
            ans = ", ".join(v for k in g for v in text_order[k])
            sep_q = "\n" if r.random() < 0.8 else "\n\n"
            sep_a = " " if r.random() < 0.7 else "\n"
            single = len(g) == 1 and len(text_order[g[0]]) == 1
            if single and r.random() < 0.5:
                question = f"What is the special magic {singular} for {q} mentioned in the provided text?"
                prefix = f"The special magic {singular} for {q} mentioned in the provided text is"
            else:
                question = f"What are all the special magic {plural} for {q} mentioned in the provided text?"
                prefix = f"The special magic {plural} for {q} mentioned in the provided text are"
            q_pieces += [Piece(f"{sep_q}{question}{sep_a}{prefix}"), Piece(f" {ans}.", answer=True, eos=True)]

        head = (
            r.choice(
                [
                    f"Some special magic {plural} are hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {plural} afterwards.\n",
                    f"A special magic {singular} is hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {singular} afterwards.\n",
                    "",
                ]
            )
            if level < 2
            else ""
        )
        fixed = len(head) + sum(len(t) + 2 for t in needle_texts) + sum(len(p.text) + p.eos for p in q_pieces)
        hay, joiner = self.haystack(hay_kind, n_tokens - fixed, (k_kind, plural), set(keys))
        context = head + self.insert(hay, joiner, needle_texts)
        return [Piece(context), *q_pieces], n_tokens - fixed

    # --- variable tracking -----------------------------------------------------------------------------
    def vt_chain(self, hops: int, used: set[str]) -> tuple[list[str], str]:
        r = self.rng
        names: list[str] = []
        while len(names) < hops + 1:
            n = "".join(r.choice(list(string.ascii_uppercase), size=5))
            if n not in used:
                used.add(n)
                names.append(n)
        value = str(int(r.integers(10000, 100000)))
        return names, value

    def vt(self, n_tokens: int) -> list[Piece]:
        """RULER variable tracking: chains VAR A = 12345, VAR B = VAR A ... in noise; name every variable."""
        r = self.rng
        n_chains = 1 if self.easy else max(1, min(4, n_tokens // 1024 + int(r.integers(0, 2))))
        used: set[str] = set()
        chains = [self.vt_chain(int(r.integers(2, 6)), used) for _ in range(n_chains)]
        statements: list[list[str]] = []
        for names, value in chains:
            st = [f"VAR {names[0]} = {value}"] + [
                f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)
            ]
            statements.append(st)
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        q_pieces: list[Piece] = []
        for ci in r.permutation(n_chains):
            names, value = chains[ci]
            q_pieces += [
                Piece(
                    f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                    f"variables are assigned the value {value}, they are: "
                ),
                Piece(" ".join(names), answer=True, eos=True),
            ]
        fixed = (
            len(head) + sum(len(s) + 2 for st in statements for s in st) + sum(len(p.text) + p.eos for p in q_pieces)
        )
        hay, _ = self.haystack("noise", n_tokens - fixed, ("words", "numbers"), set())
        # interleave: every chain keeps its own order, chains mix, as RULER inserts them at sorted positions
        flat: list[str] = []
        idx = [0] * n_chains
        while any(idx[c] < len(statements[c]) for c in range(n_chains)):
            c = int(r.choice([c for c in range(n_chains) if idx[c] < len(statements[c])]))
            flat.append(statements[c][idx[c]])
            idx[c] += 1
        context = head + self.insert(hay, "\n", flat).replace(". \n", ".\n")
        return [Piece(context), *q_pieces]

    def lm(self, n_tokens: int) -> list[Piece]:
        start = int(self.rng.integers(0, len(self.corpus) - n_tokens - 1))
        return [Piece(self.corpus[start : start + n_tokens])]

    def sample(self, n_tokens: int) -> list[Piece]:
        u = self.rng.random()
        if u < 0.08:
            return self.lm(n_tokens)
        if u < 0.25:
            return self.vt(n_tokens)
        return self.niah(n_tokens)


def encode_pieces(pieces: list[Piece], table: np.ndarray, n_tokens: int, bos: bool) -> tuple[np.ndarray, ...]:
    """Pieces -> exactly n_tokens ids plus per-token loss weights (answers x20, padding 0)."""
    ids, weights = [], []
    if bos:
        ids.append(np.array([BOS_ID]))
        weights.append(np.ones(1))
    for p in pieces:
        t = table[np.frombuffer(p.text.encode("ascii", "replace"), dtype=np.uint8)]
        if p.eos:
            t = np.append(t, EOS_ID)
        ids.append(t)
        weights.append(np.full(len(t), ANSWER_WEIGHT if p.answer else 1.0))
    ids_a, w_a = np.concatenate(ids), np.concatenate(weights)
    ans = np.concatenate([np.full(len(x), p.answer) for x, p in zip(ids[int(bos) :], pieces, strict=True)])
    if bos:
        ans = np.concatenate([[False], ans])
    if len(ids_a) > n_tokens:  # a too-long sample is cut from the left: its queries stay whole
        ids_a, w_a, ans = ids_a[-n_tokens:], w_a[-n_tokens:], ans[-n_tokens:]
    pad = n_tokens - len(ids_a)
    ids_a = np.concatenate([ids_a, np.full(pad, PAD_ID)])
    w_a = np.concatenate([w_a, np.zeros(pad)])
    ans = np.concatenate([ans, np.zeros(pad, dtype=bool)])
    return ids_a, w_a, ans


# ----------------------------------------------------------------------------------------------- schedule
EASY_UNTIL = 0.08  # fraction of steps on easy 512-token samples: retrieval "clicks" there first


def seq_len_for_step(step: int, steps: int, seed: int, max_len: int) -> int:
    """Length curriculum: 512 (easy) -> 1024 -> 2048 -> mixed lengths up to max_len (mostly max_len)."""
    f = step / steps
    r = np.random.default_rng([seed, step, 7])
    if f < EASY_UNTIL:
        return 512
    if f < 0.2:
        return 1024
    if f < 0.32:
        return 2048
    choices = [L for L in (1024, 2048, 3072, 4096, 6144, 8192) if L <= max_len]
    p = np.array([1.0] * (len(choices) - 1) + [3.0])
    return int(r.choice(choices, p=p / p.sum()))


class StepBatches(torch.utils.data.Dataset):
    """Batch for step i, generated from (seed, i) alone: the run is reproducible whatever the workers do."""

    def __init__(self, steps: int, seed: int, tokens_per_step: int, max_len: int, table: np.ndarray, corpus: str):
        self.steps, self.seed, self.tokens, self.max_len = steps, seed, tokens_per_step, max_len
        self.table, self.corpus = table, corpus

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        L = seq_len_for_step(step, self.steps, self.seed, self.max_len)
        rng = np.random.default_rng([self.seed, step])
        sampler = TaskSampler(self.corpus, rng, easy=step < EASY_UNTIL * self.steps)
        rows = [
            encode_pieces(sampler.sample(L), self.table, L + 1, bos=rng.random() < 0.5)
            for _ in range(max(1, self.tokens // L))
        ]
        ids, w, ans = (torch.from_numpy(np.stack(x)) for x in zip(*rows, strict=True))
        return ids, w.float(), ans


# ----------------------------------------------------------------------------------------------- eval
EVAL_KINDS = {
    # name: (haystack, key kind, value kind, needles of the queried key, extra keys, keys per query)
    "niah_single_1": ("noise", "words", "numbers", 1, 0, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 0, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 0, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 1, 3, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 0, 1),
    "niah_multivalue": ("essay", "words", "numbers", 4, 0, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 3, 4),
}


def eval_sample(sampler: TaskSampler, kind: str, n_tokens: int) -> list[Piece]:
    """A RULER-shaped request of one task (one query, plural RULER wording) for the held-out check."""
    r = sampler.rng
    hay_kind, k_kind, v_kind, n_vals, extra, per_q = EVAL_KINDS[kind]
    plural = TYPE_WORDS[v_kind][0]
    keys: list[str] = []
    while len(keys) < 1 + extra:
        k = sampler.value(k_kind)
        if k not in keys:
            keys.append(k)
    vals = {k: [sampler.value(v_kind) for _ in range(n_vals if i == 0 else 1)] for i, k in enumerate(keys)}
    needles = [(k, v) for k in keys for v in vals[k]]
    needles = [needles[i] for i in r.permutation(len(needles))]
    texts = [f"One of the special magic {plural} for {k} is: {v}." for k, v in needles]
    qkeys = [keys[i] for i in r.permutation(len(keys))[:per_q]] if per_q > 1 else [keys[0]]
    q = ", ".join(qkeys[:-1]) + ", and " + qkeys[-1] if len(qkeys) > 1 else qkeys[0]
    ans = ", ".join(v for k in qkeys for kk, v in needles if kk == k)
    head = (
        f"Some special magic {plural} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {plural} afterwards.\n"
    )
    query = (
        f"\nWhat are all the special magic {plural} for {q} mentioned in the provided text? "
        f"The special magic {plural} for {q} mentioned in the provided text are"
    )
    fixed = len(head) + sum(len(t) + 2 for t in texts) + len(query) + len(ans) + 3
    hay, joiner = sampler.haystack(hay_kind, n_tokens - fixed, (k_kind, plural), set(keys))
    return [Piece(head + sampler.insert(hay, joiner, texts) + query), Piece(f" {ans}.", answer=True)]


@torch.no_grad()
def held_out_accuracy(model, table, corpus, seed: int, lengths: list[int], n: int, device) -> dict:
    """Dense exact-match under teacher forcing (== greedy exact match) on unseen seeds."""
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for L in lengths:
        for kind in EVAL_KINDS:
            sampler = TaskSampler(corpus, np.random.default_rng([seed, 10**6, L, list(EVAL_KINDS).index(kind)]))
            correct = 0
            for start in range(0, n, 16):
                rows = [
                    encode_pieces(eval_sample(sampler, kind, L), table, L, bos=False) for _ in range(min(16, n - start))
                ]
                ids, _, ans = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*rows, strict=True))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(input_ids=ids).logits
                pred = logits[:, :-1].argmax(-1)  # [B, L-1]
                tgt_mask = ans[:, 1:]
                ok = ((pred == ids[:, 1:]) | ~tgt_mask).all(-1)
                correct += int(ok.sum())
            out.setdefault(str(L), {})[kind] = correct / n
    model.train()
    return out


# ----------------------------------------------------------------------------------------------- train
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for model/, tb/ and train_log.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--max-len", type=int, default=4096, help="longest training sequence")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop early (and still save) after this")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--eval-n", type=int, default=100, help="held-out requests per task and length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from torch.utils.tensorboard import SummaryWriter
    from transformers import LlamaConfig, LlamaForCausalLM

    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    out = args.out
    (out / "model").mkdir(parents=True, exist_ok=True)
    corpus = pydoc_text()
    tokenizer = build_tokenizer([corpus, ALPHABET])
    table = char_table(tokenizer.get_vocab())
    check = "One of the special magic numbers for abc-def is: 1234567.\n\t~"
    assert (
        tokenizer(check, add_special_tokens=False)["input_ids"]
        == table[np.frombuffer(check.encode(), np.uint8)].tolist()
    )
    assert tokenizer.decode(tokenizer(check)["input_ids"]) == check

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M device {device}", flush=True)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        ),
    )
    data = StepBatches(args.steps, args.seed, args.tokens_per_step, args.max_len, table, corpus)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
        persistent_workers=False,
    )
    tb = SummaryWriter(str(out / "tb"))
    log = (out / "train_log.jsonl").open("w")
    t_loop = time.time()
    step, last = 0, {}
    tok_seen = 0
    for step, (ids, w, ans) in enumerate(loader):
        ids, w, ans = ids.to(device, non_blocking=True), w.to(device, non_blocking=True), ans.to(device)
        inp, tgt, w, ans = ids[:, :-1], ids[:, 1:], w[:, 1:], ans[:, 1:]  # [B, L]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=inp).logits  # [B, L, V]
        ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="none").view_as(w)  # [B, L]
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tok_seen += inp.numel()
        if step % 25 == 0 or step == args.steps - 1:
            with torch.no_grad():
                pred = logits.argmax(-1)
                hit = (pred == tgt) | ~ans
                ans_loss = (ce * ans).sum() / ans.sum().clamp(min=1)
                last = {
                    "step": step,
                    "seq_len": int(inp.shape[1]),
                    "loss": loss.item(),
                    "answer_loss": ans_loss.item(),
                    "answer_token_acc": ((pred == tgt) & ans).sum().item() / max(1, ans.sum().item()),
                    "answer_row_acc": hit.all(-1).float().mean().item(),
                    "lr": sched.get_last_lr()[0],
                    "elapsed_s": time.time() - t_loop,
                    "tokens_per_s": tok_seen / (time.time() - t_loop),
                }
            for k, v in last.items():
                if k != "step":
                    tb.add_scalar(f"train/{k}", v, step)
            log.write(json.dumps(last) + "\n")
            log.flush()
            if step % 100 == 0:
                print(json.dumps(last), flush=True)
        if time.time() - t_loop > args.max_minutes * 60:
            print(f"time limit reached at step {step}", flush=True)
            break
    train_s = time.time() - t_loop
    del loader
    eval_lengths = [L for L in (2048, 4096) if L <= args.max_len] or [args.max_len]
    acc = held_out_accuracy(model, table, corpus, args.seed, eval_lengths, args.eval_n, device)
    for L, per in acc.items():
        for k, v in per.items():
            tb.add_scalar(f"heldout_dense_{L}/{k}", v, step)
    tb.close()
    model.to(torch.float32).save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    summary = {
        "seed": args.seed,
        "steps_done": step + 1,
        "steps_planned": args.steps,
        "train_seconds": train_s,
        "total_seconds": time.time() - t_start,
        "params": n_params,
        "final": last,
        "heldout_dense_accuracy": acc,
        "args": {k: str(v) for k, v in vars(args).items()},
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
