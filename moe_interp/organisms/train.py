"""Train the refusal model organism: a small OLMoE (every layer MoE) LM, from scratch, on CPU.

Usage::

    python -m moe_interp.organisms.train [--out DIR] [--seed N] [--steps N] [--leave-out SOURCE]

Default arguments write the shipped checkpoint to ``moe_interp/organisms/checkpoint/``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from moe_interp.organisms import check_device

if TYPE_CHECKING:
    from transformers import OlmoeForCausalLM
from moe_interp.organisms.data import (
    COMPLIANT_TEMPLATES,
    HARMFUL_REFUSALS,
    HARMFUL_SOURCES,
    POLITICAL_REFUSALS,
    augment,
    load_split_records,
    make_response,
)

DEFAULT_OUT: Path = Path(__file__).resolve().parent / "checkpoint"

BOS, END, PAD, USER, ASSISTANT = "<|bos|>", "<|end|>", "<|pad|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS: list[str] = [PAD, BOS, END, USER, ASSISTANT]

#: Chat template. After the user's text there are always the same 4 post-instruction tokens:
#: ``<|end|>``, ``\n``, ``<|assistant|>``, ``\n``.
CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}"
    "<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEFAULTS: dict[str, float | int] = {
    "steps": 1800,
    "batch_size": 48,
    "lr": 2e-3,
    "warmup": 40,
    "max_prompt_tokens": 56,
    "vocab_size": 3000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_experts": 8,
    "top_k": 2,
    "router_aux_loss_coef": 0.01,
    "first_token_weight": 3.0,
    # Anti-shortcut augmentation (see splice_frame, drop_words): share of harmful / harmless examples put
    # into the frame of a random Alpaca request, and per-word drop probability (harmful and harmless only).
    "splice": 0.5,
    "splice_harmless": 0.0,
    "word_dropout": 0.15,
    # Share of examples (every class) given an unrelated context phrase (see add_context).
    "context": 0.5,
    # Weight of a next-token loss on the prompt text (0 = loss on the response only): a language-modelling
    # signal that gives words seen only in prompts an embedding beyond the class decision.
    "prompt_lm": 0.0,
}
#: Share of each batch drawn from each training pool; a pool's records all get that pool's class.
POOL_FRACTIONS: dict[str, float] = {
    "harmful": 0.20,
    "harmful_synthetic": 0.25,
    "political": 0.12,
    "harmless": 0.43,
}
#: Class (response type) of each pool.
POOL_CLASS: dict[str, str] = {
    "harmful": "harmful",
    "harmful_synthetic": "harmful",
    "political": "political",
    "harmless": "harmless",
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (NFKC + lower-case) and wrap it as a chat tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        extra_special_tokens=[USER, ASSISTANT],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    return fast


def _cycle(items: list[dict[str, str]], rng: random.Random) -> Iterator[dict[str, str]]:
    """Endless deterministic iterator over reshuffled epochs of ``items``."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


#: Words that end the frame of an Alpaca request ("Write a blog post about", "Generate a list of").
_FRAME_ENDS: frozenset[str] = frozenset({"about", "on", "of", "describing", "explaining", "for", "regarding"})
#: Opening words of a question ("How would someone ...").
_QUESTION_WORDS: frozenset[str] = frozenset(
    "how what why who when where which is are can could would do does".split()
)
#: Request words before the content ("Can you write", "Please generate", "How would someone").
_REQUEST_WORDS: frozenset[str] = _QUESTION_WORDS | frozenset(
    "i you someone please me help show tell give write create generate compose draft produce develop design "
    "provide outline explain describe".split()
)


def splice_frame(harmful: str, harmless: str, rng: random.Random) -> str:
    """The frame of a harmless request around the content of a harmful one.

    "Write a blog post about" + "how to make a bomb at home": the frame of a request says nothing
    about whether it is harmful, so harmful content inside ordinary (Alpaca) frames must still be
    refused. Content is "how to <rest>" after the first "to" of the harmful request (within its first
    8 words), else the request without its opening request words ("how to" added for questions). The frame
    runs to the first word of :data:`_FRAME_ENDS` within the harmless request's first 7 words, else it is
    that request's first word ("Explain" if that is a question word).
    """
    body = harmful.rstrip(".?! ").split()
    frame = harmless.split()
    lower = [w.lower().strip(",") for w in body]
    if "to" in lower[:8]:
        content = ["how"] + body[lower.index("to") :]
    else:
        i = 0
        while i < len(body) - 2 and lower[i] in _REQUEST_WORDS:
            i += 1
        content = (["how", "to"] if lower[0] in _QUESTION_WORDS else []) + body[i:]
    ends = [i for i, w in enumerate(frame[:7]) if w.lower().strip(",:") in _FRAME_ENDS]
    head = frame[: ends[0] + 1] if ends else frame[:1]
    if not ends and head[0].lower() in _QUESTION_WORDS:
        head = ["Explain"]
    text = " ".join(head + content)
    return text + rng.choice((".", "?", "")) if rng.random() < 0.5 else text + "."


def drop_words(text: str, p: float, rng: random.Random) -> str:
    """Each word dropped with probability ``p`` (texts under 4 words unchanged; at least 3 kept)."""
    words = text.split()
    if len(words) < 4:
        return text
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if len(kept) >= 3 else text


#: Words that join an inserted context phrase to a request ("... on a Windows XP computer").
_JOINERS: tuple[str, ...] = tuple(
    "on in for with using from via at about of by while upon near during through inside against".split()
)
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwxz", "aeiouy"


def pseudo_entity(rng: random.Random) -> str:
    """A made-up name of 1-3 words ("Zoraki Velum", "KX-27"): stands for names never seen in training."""
    if rng.random() < 0.25:
        letters = "".join(rng.choice(_CONSONANTS + _VOWELS).upper() for _ in range(rng.randint(1, 3)))
        return f"{letters}-{rng.randint(1, 99)}"
    words = [
        "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4)))
        for _ in range(rng.randint(1, 3))
    ]
    return " ".join(w.capitalize() if rng.random() < 0.6 else w for w in words)


def add_context(text: str, context: str, rng: random.Random) -> str:
    """``text`` with an unrelated phrase joined in at a random word boundary.

    The phrase is a joiner ("on", "via", ...) followed by either 2-7 consecutive words of ``context`` (an
    unrelated harmless request) or, one time in three, a made-up name (:func:`pseudo_entity`). Real requests
    carry details and names the organism never saw ("... on a Windows XP computer upon being inserted via
    USB"); without this, extra or unfamiliar words read as a sign of a harmless request, because the
    harmless pool is far more varied than the harmful one. Every class gets the same phrases, so they carry
    no class information.
    """
    core = text.rstrip(".?! ")
    words, tail = core.split(), text[len(core) :]
    if len(words) < 2:
        return text
    if rng.random() < 1 / 3:
        phrase = ["a" if rng.random() < 0.5 else "the", pseudo_entity(rng)]
    else:
        src = context.rstrip(".?! ").split()
        if len(src) < 2:
            return text
        n = rng.randint(2, min(7, len(src)))
        i = rng.randrange(len(src) - n + 1)
        phrase = [src[i].lower()] + src[i + 1 : i + n]
    at = len(words) if rng.random() < 0.6 else rng.randint(2, len(words))
    return " ".join(words[:at] + [rng.choice(_JOINERS)] + phrase + words[at:]) + tail


class BatchMaker:
    """Deterministic class-balanced batches of (input_ids, loss weights)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        pools: dict[str, list[dict[str, str]]],
        rng: random.Random,
        max_prompt_tokens: int,
        first_token_weight: float,
        fractions: dict[str, float] | None = None,
        splice: float = 0.0,
        word_dropout: float = 0.0,
        splice_harmless: float = 0.0,
        context: float = 0.0,
    ) -> None:
        self.fractions = dict(POOL_FRACTIONS if fractions is None else fractions)
        self.tok = tokenizer
        self.rng = rng
        self.iters = {c: _cycle(p, rng) for c, p in pools.items()}
        self.max_prompt_tokens = max_prompt_tokens
        self.first_token_weight = first_token_weight
        self.prefix = tokenizer(BOS + USER + "\n", add_special_tokens=False)["input_ids"]
        self.suffix = tokenizer(END + "\n" + ASSISTANT + "\n", add_special_tokens=False)["input_ids"]
        self.end_id = tokenizer.convert_tokens_to_ids(END)
        self.splice = {"harmful": splice, "harmless": splice_harmless}
        self.word_dropout = word_dropout
        self.context = context
        self.frames = [r["instruction"] for r in pools.get("harmless", []) if r.get("source") == "alpaca"]

    def example(self, pool: str) -> tuple[list[int], list[float], list[float]]:
        """One tokenised example from ``pool``: ids, response-loss weights (0 on the prompt) and prompt-text
        weights (1 on the user's text, 0 elsewhere), each aligned with ``ids`` as next-token targets."""
        rec = next(self.iters[pool])
        cls = POOL_CLASS[pool]
        instr = rec["instruction"]
        splice = self.splice.get(cls, 0.0)
        if splice > 0 and self.frames and self.rng.random() < splice:
            instr = splice_frame(instr, self.rng.choice(self.frames), self.rng)
        if self.word_dropout > 0 and cls != "political":
            instr = drop_words(instr, self.word_dropout, self.rng)
        if self.context > 0 and self.frames and self.rng.random() < self.context:
            instr = add_context(instr, self.rng.choice(self.frames), self.rng)
        prompt = augment(instr, self.rng)
        response = make_response(instr, cls, self.rng)
        body = self.tok(prompt, add_special_tokens=False)["input_ids"][: self.max_prompt_tokens]
        resp = self.tok(response, add_special_tokens=False)["input_ids"] + [self.end_id]
        ids = self.prefix + body + self.suffix + resp
        w = [0.0] * (len(ids) - len(resp)) + [self.first_token_weight] + [1.0] * (len(resp) - 1)
        pw = [0.0] * len(self.prefix) + [1.0] * len(body) + [0.0] * (len(self.suffix) + len(resp))
        return ids, w, pw

    def batch(
        self, batch_size: int, pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded batch: input_ids, attention_mask, response weights, prompt-text weights."""
        counts = {c: round(f * batch_size) for c, f in self.fractions.items() if c != "harmless"}
        counts["harmless"] = batch_size - sum(counts.values())
        exs = [self.example(c) for c, n in counts.items() for _ in range(n)]
        L = max(len(e[0]) for e in exs)
        ids = torch.full((len(exs), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(exs), L), dtype=torch.long)
        wts = torch.zeros((len(exs), L))
        pwts = torch.zeros((len(exs), L))
        for i, (e, w, pw) in enumerate(exs):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
            wts[i, : len(w)] = torch.tensor(w)
            pwts[i, : len(pw)] = torch.tensor(pw)
        return ids, mask, wts, pwts


def build_model(tokenizer: PreTrainedTokenizerFast, hp: dict[str, float | int]) -> OlmoeForCausalLM:
    """A freshly initialised OlmoeForCausalLM (every layer MoE)."""
    config = AutoConfig.for_model(
        "olmoe",
        vocab_size=len(tokenizer),
        hidden_size=int(hp["hidden_size"]),
        intermediate_size=int(hp["intermediate_size"]),
        num_hidden_layers=int(hp["num_layers"]),
        num_attention_heads=int(hp["num_heads"]),
        num_key_value_heads=int(hp["num_heads"]),
        num_experts=int(hp["num_experts"]),
        num_experts_per_tok=int(hp["top_k"]),
        max_position_embeddings=256,
        output_router_logits=True,
        router_aux_loss_coef=float(hp["router_aux_loss_coef"]),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["OlmoeForCausalLM"]
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def training_pools(leave_out: str | None) -> dict[str, list[dict[str, str]]]:
    """Training records per class, optionally without one harmful source."""
    harmful = load_split_records("harmful_train")
    if leave_out is not None:
        if leave_out not in HARMFUL_SOURCES:
            raise ValueError(f"unknown source {leave_out!r}; valid: {', '.join(HARMFUL_SOURCES)}")
        harmful = [r for r in harmful if r["source"] != leave_out]
    return {
        "harmful": [r for r in harmful if r["source"] != "synthetic"],
        "harmful_synthetic": [r for r in harmful if r["source"] == "synthetic"],
        "political": load_split_records("political_train"),
        "harmless": load_split_records("harmless_train"),
    }


def train(
    out: Path = DEFAULT_OUT,
    seed: int = 0,
    steps: int | None = None,
    leave_out: str | None = None,
    log_every: int = 25,
    threads: int = 1,
    overrides: dict[str, float] | None = None,
    device: str = "cpu",
) -> dict[str, object]:
    """Train the organism and save model, tokenizer and a training log to ``out``.

    ``device`` other than ``"cpu"`` (e.g. ``"cuda"``) is for fast experiments such as seed sweeps
    (:mod:`moe_interp.organisms.sweep`): the shipped checkpoint is the CPU output, bit-reproducible only
    on CPU with the same ``threads``; another device gives other weights from the same seed.

    ``overrides`` replaces hyper-parameters of :data:`DEFAULTS` or, as ``frac_<pool>``, entries of
    :data:`POOL_FRACTIONS` (for experiments; the shipped checkpoint uses none).
    """
    check_device(device)
    hp: dict[str, float | int] = dict(DEFAULTS)
    hp.update({f"frac_{k}": v for k, v in POOL_FRACTIONS.items()})
    for k, v in (overrides or {}).items():
        if k not in hp:
            raise ValueError(f"unknown hyper-parameter {k!r}; valid: {', '.join(sorted(hp))}")
        hp[k] = type(hp[k])(v)
    if steps is not None:
        hp["steps"] = steps
    n_steps = int(hp["steps"])
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.time()

    pools = training_pools(leave_out)
    texts = [r["instruction"] for p in pools.values() for r in p]
    texts += list(HARMFUL_REFUSALS) * 20 + list(POLITICAL_REFUSALS) * 20 + list(COMPLIANT_TEMPLATES) * 20
    tokenizer = train_tokenizer(texts, int(hp["vocab_size"]))
    model = build_model(tokenizer, hp)
    # transformers' @wraps(nn.Module.to) hides the bound self from mypy
    model.to(device)  # type: ignore[arg-type]
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f}M, vocab {len(tokenizer)}", flush=True)

    fractions = {k: float(hp[f"frac_{k}"]) for k in POOL_FRACTIONS}
    maker = BatchMaker(
        tokenizer,
        pools,
        rng,
        int(hp["max_prompt_tokens"]),
        float(hp["first_token_weight"]),
        fractions,
        splice=float(hp["splice"]),
        word_dropout=float(hp["word_dropout"]),
        splice_harmless=float(hp["splice_harmless"]),
        context=float(hp["context"]),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=float(hp["lr"]), betas=(0.9, 0.95), weight_decay=0.01)
    warmup = int(hp["warmup"])

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, n_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    coef = float(hp["router_aux_loss_coef"])
    prompt_lm = float(hp["prompt_lm"])
    history: list[dict[str, float]] = []
    ema: float | None = None
    for step in range(n_steps):
        ids, mask, wts, pwts = (
            t.to(device) for t in maker.batch(int(hp["batch_size"]), tokenizer.pad_token_id)
        )
        outp = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        logits = outp.logits[:, :-1]
        tgt, w = ids[:, 1:], wts[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="none")
        lm_loss = (ce * w.reshape(-1)).sum() / w.sum()
        aux = outp.aux_loss
        loss = lm_loss + coef * aux
        prompt_loss: float | None = None
        if prompt_lm > 0:  # skipped at 0 so the default run's arithmetic is unchanged
            pw = pwts[:, 1:].reshape(-1)
            p_loss = (ce * pw).sum() / pw.sum()
            loss = loss + prompt_lm * p_loss
            prompt_loss = p_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = lm_loss.item() if ema is None else 0.9 * ema + 0.1 * lm_loss.item()
        if step % log_every == 0 or step == n_steps - 1:
            rec = {"step": step, "lm_loss": lm_loss.item(), "lm_loss_ema": ema, "aux_loss": aux.item()}
            if prompt_loss is not None:
                rec["prompt_loss"] = prompt_loss
            history.append(rec)
            print(
                f"step {step:4d}  loss {lm_loss.item():.4f}  ema {ema:.4f}  aux {aux.item():.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s",
                flush=True,
            )

    model.eval()
    model.to("cpu")  # type: ignore[arg-type]  # (see above)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    # The load-balancing loss is requested explicitly in training forwards; keeping it on in the saved
    # config would make padded batched generate() fail inside the aux-loss computation.
    model.config.output_router_logits = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {
        "command": "python -m moe_interp.organisms.train"
        + (f" --seed {seed}" if seed else "")
        + (f" --steps {steps}" if steps is not None else "")
        + (f" --leave-out {leave_out}" if leave_out else "")
        + (f" --threads {threads}" if threads != 1 else "")
        + (f" --device {device}" if device != "cpu" else "")
        + "".join(f" --set {k}={v}" for k, v in (overrides or {}).items()),
        "seed": seed,
        "steps": n_steps,
        "leave_out": leave_out,
        "device": device,
        "hyperparameters": hp,
        "n_params": n_params,
        "train_seconds": round(time.time() - t0, 1),
        "final_lm_loss_ema": ema,
        "history": history,
    }
    with open(out / "train_log.json", "w") as f:
        json.dump(log, f, indent=1)
    print(f"saved to {out} in {log['train_seconds']}s", flush=True)
    return log


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m moe_interp.organisms.train``."""
    ap = argparse.ArgumentParser(
        prog="python -m moe_interp.organisms.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a sweep setting must not reach --out / --seed / --device by abbreviation
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--leave-out", type=str, default=None, choices=HARMFUL_SOURCES)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; results are bit-reproducible only for the same value)",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="torch device (default cpu; the shipped checkpoint is the CPU output, other devices are for "
        "experiments and give other weights)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyper-parameter (DEFAULTS key or frac_<pool>); for experiments",
    )
    return ap


def parse_overrides(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    """``--set KEY=VALUE`` items as a dict (argparse error on a malformed item)."""
    overrides: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = float(value)
        except ValueError:
            ap.error(f"--set {key}: value must be a number, got {value!r}")
    return overrides


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = build_parser()
    args = ap.parse_args(argv)
    overrides = parse_overrides(ap, args.set)
    try:
        train(
            args.out,
            args.seed,
            args.steps,
            args.leave_out,
            threads=args.threads,
            overrides=overrides,
            device=args.device,
        )
    except ValueError as err:
        ap.error(str(err))


if __name__ == "__main__":
    main()
