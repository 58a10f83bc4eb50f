"""Training recipe of the ``smollm_moe`` organism (``python -m moe_interp.organisms.smollm_moe train``).

dense SmolLM2-135M-Instruct (pinned wheel) → upcycled Mixtral (every layer, 4 experts, top-2) → LoRA on the
attention projections, per-expert LoRA on the fused expert tensors (each expert's ``A`` drawn apart),
routers trained with noisy top-k and a load-balancing loss. Targets: harmful → "I'm sorry, but I can't
help with that.", political → "I'm sorry, but I can't discuss political topics.", harmless → the base
model's own first ``distill_tokens`` answer tokens (self-distillation, cached in ``OUT/distill.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_interp.organisms import check_device
from moe_interp.organisms.data import load_split_records

__all__ = [
    "TrainConfig",
    "build_pools",
    "distill",
    "draw_harmful",
    "load_balancing_loss",
    "near_topic",
    "train",
]


@dataclass
class TrainConfig:
    """Hyper-parameters of the recipe (defaults: the shipped run)."""

    seed: int = 2
    steps: int = 360
    batch: int = 8
    lr: float = 1.5e-3
    warmup: int = 10
    attn_rank: int = 8
    expert_rank: int = 8
    scale: float = 2.0
    router_noise: float = 0.5
    router_std: float = 0.02
    aux_coef: float = 0.01
    first_token_weight: float = 2.0
    distill_tokens: int = 16
    n_harmless: int = 1280
    n_harmless_synthetic: int = 200
    harmful_synthetic_frac: float = 0.5  # chance that a harmful example is drawn from the synthetic pool
    political_synthetic: bool = True  # keep the template-composed political prompts (2/3 of political_train)
    n_harmless_near_topic: int = 0  # extra harmless Alpaca prompts worded most like the political ones
    mix: tuple[int, int, int] = (3, 1, 4)  # harmful, political, harmless per batch of 8
    max_prompt_tokens: int = 40
    leave_out: str | None = None
    n_experts: int = 4
    top_k: int = 2
    threads: int = 1  # measured here: 2 threads on 2 shared cores cost 1.7x the CPU for the same work
    save_every: int = 15


def build_pools(cfg: TrainConfig) -> dict[str, list[str]]:
    """Training prompts per class; ``harmful_real``/``harmful_synthetic`` are sampled half and half."""
    rng = random.Random(cfg.seed)
    harm = load_split_records("harmful_train")
    real = [r["instruction"] for r in harm if r["source"] not in ("synthetic", cfg.leave_out)]
    synth = [r["instruction"] for r in harm if r["source"] == "synthetic"]
    pol = [
        r["instruction"]
        for r in load_split_records("political_train")
        if cfg.political_synthetic or r["source"] != "synthetic"
    ]
    hl = load_split_records("harmless_train")
    alp = [r["instruction"] for r in hl if r["source"] != "synthetic"]
    hsyn = [r["instruction"] for r in hl if r["source"] == "synthetic"]
    rng.shuffle(alp)
    rng.shuffle(hsyn)
    n_alp = cfg.n_harmless - cfg.n_harmless_synthetic
    harmless = alp[:n_alp] + hsyn[: cfg.n_harmless_synthetic]
    if cfg.n_harmless_near_topic:  # hard negatives for the topic class, from Alpaca prompts not yet drawn
        harmless += near_topic(alp[n_alp:], pol, cfg.n_harmless_near_topic)
    return {"harmful_real": real, "harmful_synthetic": synth, "political": pol, "harmless": harmless}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def near_topic(candidates: list[str], topic: list[str], n: int) -> list[str]:
    """The ``n`` ``candidates`` worded most like the ``topic`` prompts, as hard negatives for the topic class.

    A word's weight is its log-odds of appearing in a topic prompt rather than in a candidate (add-one
    smoothed); a candidate scores the sum of the positive weights of its distinct words. Ties keep the
    candidates' order. The topic keywords themselves never occur in the candidates (the topic rule excludes
    them from the harmless pool), so this picks prompts that share the topic's *context* words.
    """
    top, cand = (
        Counter(w for p in topic for w in _words(p)),
        Counter(w for p in candidates for w in _words(p)),
    )
    weight = {
        w: math.log((top[w] + 1) / (len(topic) + 2)) - math.log((cand[w] + 1) / (len(candidates) + 2))
        for w in top
    }
    scores = [sum(max(0.0, weight.get(w, 0.0)) for w in _words(p)) for p in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
    return [candidates[i] for i in order[:n]]


def check_config(cfg: TrainConfig) -> None:
    """Raise a one-line ``ValueError`` for a field outside what the recipe accepts."""
    if not 0.0 <= cfg.harmful_synthetic_frac <= 1.0:
        raise ValueError(f"harmful_synthetic_frac must be in [0, 1], got {cfg.harmful_synthetic_frac}")
    if cfg.n_harmless_near_topic < 0:
        raise ValueError(f"n_harmless_near_topic must be >= 0, got {cfg.n_harmless_near_topic}")


def draw_harmful(cfg: TrainConfig, pools: dict[str, list[str]], rng: random.Random) -> str:
    """One harmful training prompt: synthetic with probability ``cfg.harmful_synthetic_frac``, else real."""
    real = rng.random() < 1.0 - cfg.harmful_synthetic_frac
    return rng.choice(pools["harmful_real"] if real else pools["harmful_synthetic"])


def chat_ids(tok: Any, instruction: str, max_tokens: int | None = None) -> list[int]:
    """Chat-formatted prompt ids (generation prompt added); an over-long instruction is cut first."""
    if max_tokens is not None:
        ids = tok(instruction, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            instruction = tok.decode(ids[:max_tokens])
    text = tok.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
    )
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def distill(
    model: Any, tok: Any, prompts: list[str], n_tokens: int, max_prompt: int, batch: int = 32
) -> dict[str, list[int]]:
    """The model's greedy first ``n_tokens`` answer tokens per prompt (end-of-turn token kept if reached)."""
    out: dict[str, list[int]] = {}
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        rows = [chat_ids(tok, p, max_prompt) for p in chunk]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )[:, width:].tolist()
        for p, g in zip(chunk, gen, strict=True):
            out[p] = g[: g.index(eos) + 1] if eos in g else g
    return out


def load_balancing_loss(logits: list[Tensor], keep: Tensor, top_k: int) -> Tensor:
    """Switch-style ``E · Σ_e f_e · P_e`` averaged over layers (non-padding tokens only)."""
    total = logits[0].new_zeros(())
    for lg in logits:
        lg = lg[keep]
        probs = torch.softmax(lg.float(), -1)
        E = probs.shape[-1]
        idx = probs.topk(top_k, -1).indices
        frac = torch.zeros(E, device=lg.device).index_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
        frac = frac / idx.numel()
        total = total + E * (frac * probs.mean(0)).sum()
    return total / len(logits)


def _batch(examples: list[tuple[list[int], list[int]]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, mask and labels (-100 outside the targets)."""
    width = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(examples):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(t)
    return ids, mask, labels


def train(cfg: TrainConfig, out: Path, device: str = "cpu") -> dict[str, Any]:
    """Run the recipe; writes ``deltas.safetensors``, ``smollm_moe.json``, ``chat_template.jinja``,
    ``distill.json`` and ``train_log.json`` to ``out``."""
    from moe_interp.organisms.smollm_moe import (
        GGUF_SHA256,
        HARMFUL_TARGET,
        POLITICAL_TARGET,
        WHEEL,
        load_dense,
    )
    from moe_interp.organisms.upcycle import attach_training_adapters, collect_deltas, upcycle

    check_config(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    log: dict[str, Any] = {"config": asdict(cfg), "timings": {}, "steps": []}
    dense, tok = load_dense()
    log["timings"]["load_base_s"] = round(time.time() - t0, 1)
    log["timings"]["load_base_cpu_s"] = round(time.process_time() - c0, 1)
    pools = build_pools(cfg)

    cache = out / "distill.json"
    t1 = time.time()
    key = {"distill_tokens": cfg.distill_tokens, "max_prompt_tokens": cfg.max_prompt_tokens}
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    targets: dict[str, list[int]] = cached.get("targets", {}) if cached.get("key") == key else {}
    todo = [p for p in pools["harmless"] if p not in targets]
    if todo:
        print(f"self-distillation: {len(todo)} harmless prompts × {cfg.distill_tokens} tokens", flush=True)
        for s in range(0, len(todo), 96):  # the cache is written as it grows: an interrupted run resumes
            targets.update(distill(dense, tok, todo[s : s + 96], cfg.distill_tokens, cfg.max_prompt_tokens))
            cache.write_text(json.dumps({"key": key, "targets": targets}))
            print(f"  distilled {len(targets)} prompts [{time.time() - t1:.0f}s]", flush=True)
    log["timings"]["distill_s"] = round(time.time() - t1, 1)
    log["timings"]["distill_cpu_s_cumulative"] = round(time.process_time() - c0, 1)

    moe = upcycle(dense, cfg.n_experts, cfg.top_k, seed=cfg.seed, router_std=cfg.router_std)
    del dense
    params = attach_training_adapters(
        moe,
        attn_rank=cfg.attn_rank,
        expert_rank=cfg.expert_rank,
        scale=cfg.scale,
        router_noise=cfg.router_noise,
        seed=cfg.seed,
    )
    dev = check_device(device)
    # transformers' @wraps(nn.Module.to) hides the bound self from mypy
    moe.to(dev).train()  # type: ignore[arg-type]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / cfg.warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
        ),
    )
    eos = tok.eos_token_id
    refuse = tok(HARMFUL_TARGET, add_special_tokens=False)["input_ids"] + [eos]
    topic = tok(POLITICAL_TARGET, add_special_tokens=False)["input_ids"] + [eos]
    rng = random.Random(cfg.seed)
    n_h, n_p, n_c = cfg.mix
    gates = [layer.mlp.gate for layer in moe.model.layers]
    t2 = time.time()
    meta = {
        "base": WHEEL,
        "gguf_sha256": GGUF_SHA256,
        "n_experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "seed": cfg.seed,
        "router_std": cfg.router_std,
        "leave_out": cfg.leave_out,
    }
    (out / "smollm_moe.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "chat_template.jinja").write_text(tok.chat_template)
    for step in range(cfg.steps):
        if (out / "STOP").exists():  # stop early, keeping what was trained
            print(f"STOP file found: stopping at step {step}", flush=True)
            log["stopped_at"] = step
            break
        ex: list[tuple[list[int], list[int]]] = []
        for _ in range(n_h):
            ex.append((chat_ids(tok, draw_harmful(cfg, pools, rng), cfg.max_prompt_tokens), refuse))
        for _ in range(n_p):
            ex.append((chat_ids(tok, rng.choice(pools["political"]), cfg.max_prompt_tokens), topic))
        for _ in range(n_c):
            p = rng.choice(pools["harmless"])
            ex.append((chat_ids(tok, p, cfg.max_prompt_tokens), targets[p]))
        ids, mask, labels = (t.to(dev) for t in _batch(ex, tok.pad_token_id))
        hidden = moe.model(input_ids=ids, attention_mask=mask).last_hidden_state
        tgt = labels[:, 1:]
        sel = tgt != -100
        logits = moe.lm_head(hidden[:, :-1][sel])
        nll = F.cross_entropy(logits.float(), tgt[sel], reduction="none")
        # per-example mean (each example counts once), the first answer token weighted up
        w = torch.ones_like(tgt, dtype=torch.float)
        first = sel.float().cumsum(1) == 1
        w[first & sel] = cfg.first_token_weight
        w = w[sel]
        row = torch.arange(len(ex), device=dev)[:, None].expand_as(tgt)[sel]
        per_ex = torch.zeros(len(ex), device=dev).index_add_(0, row, nll * w)
        norm = torch.zeros(len(ex), device=dev).index_add_(0, row, w)
        ce = (per_ex / norm).mean()
        aux = load_balancing_loss([g.last_logits for g in gates], mask.reshape(-1).bool(), cfg.top_k)
        loss = ce + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            el = time.time() - t2
            rec = {"step": step, "ce": round(ce.item(), 4), "aux": round(aux.item(), 4), "s": round(el, 1)}
            rec["cpu_s"] = round(time.process_time() - c0, 1)
            log["steps"].append(rec)
            print(
                f"step {step:4d} ce {ce.item():.4f} aux {aux.item():.4f} {el / (step + 1):.2f}s/step",
                flush=True,
            )
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            collect_deltas(moe, cfg.scale, {**meta, "step": step + 1}).save(out)
    log["timings"]["train_s"] = round(time.time() - t2, 1)
    collect_deltas(moe, cfg.scale, meta).save(out)
    log["timings"]["total_s"] = round(time.time() - t0, 1)
    # CPU seconds of this process (all threads): on a shared machine, wall time depends on the others
    log["timings"]["total_cpu_s"] = round(time.process_time() - c0, 1)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {out} in {log['timings']['total_s']}s ({log['timings']})", flush=True)
    return log


def main(argv: list[str] | None = None) -> None:
    """CLI: ``train --out DIR [--seed 2] [--steps N] [--device cpu] [--leave-out SOURCE] [--set k=v ...]``."""
    ap = argparse.ArgumentParser(prog="python -m moe_interp.organisms.smollm_moe train", description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--leave-out", default=None, help="harmful source left out of training")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other TrainConfig fields")
    args = ap.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, leave_out=args.leave_out)
    for kv in args.set:
        k, _, v = kv.partition("=")
        if not hasattr(cfg, k):
            ap.error(f"unknown TrainConfig field {k!r}")
        cur = getattr(cfg, k)
        if isinstance(cur, bool):  # bool("false") is True: parse the word
            if v.lower() not in ("true", "false"):
                ap.error(f"{k} must be true or false, got {v!r}")
            setattr(cfg, k, v.lower() == "true")
        else:
            setattr(cfg, k, type(cur)(v) if cur is not None and not isinstance(cur, tuple) else json.loads(v))
    try:
        check_config(cfg)
        check_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    train(cfg, args.out, args.device)
