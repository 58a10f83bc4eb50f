"""Shared helpers of the real-width benchmarks (``bench_scale.py``, CPU) and ``gpu_olmoe.py`` (one GPU).

Random-init models with a real checkpoint's per-layer geometry, prompts of a fixed token length, and a
:class:`Meter` that records wall time, CPU time, forward calls and peak memory of one stage (CPU: resident set
size sampled every millisecond above the level before the stage; GPU: ``torch.cuda.max_memory_allocated``
above the allocation before it), next to what ``moe-interp plan`` predicts for the same workload.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

#: per-layer geometry of real checkpoints (HF config fields); vocabularies are reduced (see ``build``)
GEOMETRIES: dict[str, dict[str, Any]] = {
    "olmoe": dict(  # allenai/OLMoE-1B-7B-0924
        family="olmoe",
        hidden_size=2048,
        num_experts=64,
        num_experts_per_tok=8,
        intermediate_size=1024,
        num_attention_heads=16,
        num_key_value_heads=16,
        norm_topk_prob=False,
        real_layers=16,
        real_vocab=50304,
    ),
    "qwen3": dict(  # Qwen/Qwen3-30B-A3B
        family="qwen3_moe",
        hidden_size=2048,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        norm_topk_prob=True,
        real_layers=48,
        real_vocab=151936,
    ),
    "tiny": dict(  # smoke runs of the scripts
        family="olmoe",
        hidden_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        norm_topk_prob=False,
        real_layers=2,
        real_vocab=512,
    ),
}


def build(
    geometry: str,
    n_layers: int,
    dtype: torch.dtype,
    device: str,
    vocab: int,
    seed: int = 0,
    init_std: float = 0.02,
) -> Any:
    """A seeded random-init model of ``geometry`` with ``n_layers`` layers and a ``vocab``-token BPE."""
    from transformers import AutoModelForCausalLM

    import moe_interp as mi
    from moe_interp.tiny import tiny_config
    from moe_interp.tokenizer import build_tiny_tokenizer

    geo = {k: v for k, v in GEOMETRIES[geometry].items() if k not in ("family", "real_layers", "real_vocab")}
    cfg = tiny_config(
        GEOMETRIES[geometry]["family"],
        num_hidden_layers=n_layers,
        vocab_size=vocab,
        max_position_embeddings=4096,
        initializer_range=init_std,
        **geo,
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return mi.load(hf, tokenizer=build_tiny_tokenizer(min(vocab, 4096)), name=f"bench:{geometry}")


def fit_prompts(model: Any, texts: list[str], n: int, seq: int) -> list[str]:
    """``n`` prompts whose chat-formatted tokenization is exactly ``seq`` tokens (texts cycled and cut)."""
    tok = model.tokenizer
    overhead = len(model.tokenize(["x"])["input_ids"][0]) - len(tok("x", add_special_tokens=False).input_ids)
    out = []
    for i in range(n):
        words = (texts[i % len(texts)] + " ") * 64
        ids = tok(words, add_special_tokens=False).input_ids[: seq - overhead]
        out.append(tok.decode(ids))
    for _ in range(3):  # decode/encode round trips can merge differently: trim to the exact length
        lens = model.tokenize(out)["attention_mask"].sum(-1).tolist()
        if all(n_ == seq for n_ in lens):
            break
        out = [
            tok.decode(tok(p, add_special_tokens=False).input_ids[: len(tok(p).input_ids) - (n_ - seq)])
            for p, n_ in zip(out, lens, strict=True)
        ]
    return out


def harmful_harmless(n: int) -> tuple[list[str], list[str]]:
    """Text for prompts: the organism's harmful / harmless validation splits, or fixed fallbacks."""
    try:
        from moe_interp.organisms import load_prompts

        return load_prompts("harmful_val")[:n], load_prompts("harmless_val")[:n]
    except Exception:  # noqa: BLE001 - data missing in a bare install: fixed prompts
        return (
            [f"Explain how to do dangerous thing number {i} to hurt people" for i in range(n)],
            [f"Write a short poem about the sea, verse {i}" for i in range(n)],
        )


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Return freed memory before a stage (GC, the adapter's buffer pool, glibc ``malloc_trim``, CUDA cache)."""
    from moe_interp.buffers import BUFFERS

    BUFFERS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@dataclass
class Meter:
    """Wall / CPU time, forward calls of ``hf_model`` and peak memory above the level before the stage."""

    hf_model: Any
    device: str = "cpu"
    wall_s: float = 0.0
    cpu_s: float = 0.0
    forward_calls: int = 0
    peak_extra_bytes: int = 0
    _samples: list[int] = field(default_factory=list)

    def __enter__(self) -> Meter:
        release_memory()
        self._hook = self.hf_model.register_forward_pre_hook(self._count)
        self._stop = threading.Event()
        if self.device == "cpu":
            self._base = _rss()
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._t0, self._c0 = time.perf_counter(), _cpu()
        return self

    def _count(self, *_: Any) -> None:
        self.forward_calls += 1

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device != "cpu":
            torch.cuda.synchronize()
        self.wall_s, self.cpu_s = time.perf_counter() - self._t0, _cpu() - self._c0
        self._stop.set()
        self._hook.remove()
        if self.device == "cpu":
            self._thread.join()
            self.peak_extra_bytes = max(self._peak, _rss()) - self._base
        else:
            self.peak_extra_bytes = torch.cuda.max_memory_allocated() - self._base

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "forward_calls": self.forward_calls,
            "peak_extra_bytes": self.peak_extra_bytes,
        }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.hf_model.parameters())


def plan_rows(model: Any, dtype: str, batch: int, seq: int, n: int, n_pos: int) -> dict[str, Any]:
    """``moe-interp plan``'s rows for this model (geometry from its config) and workload, by stage prefix."""
    from moe_interp.plan import PlanSettings, geometry_from_hf_config, plan

    geo = geometry_from_hf_config(model.hf_model.config)
    settings = PlanSettings(
        dtype=dtype, batch_size=batch, seq_len=seq, n_pos=n_pos, n_train=n, n_val=n, n_test=n
    )
    return {r.stage.split(" (")[0]: r for r in plan(geo, settings)}


def agreement(predicted: float, measured: float) -> float | None:
    """measured / predicted (None when nothing was predicted)."""
    return measured / predicted if predicted else None


def plan_record(
    calls: int, extra: int, activation: int, weights: int, meter: Meter, stage: str = ""
) -> dict[str, Any]:
    """Plan's prediction next to a :class:`Meter`'s measurement: forward calls, memory above the weights
    (what the stage keeps + transient activations) and peak (weights + both)."""
    predicted_extra = extra + activation
    return {
        "plan": {
            "stage": stage,
            "forward_calls": calls,
            "extra_bytes": extra,
            "activation_bytes": activation,
            "peak_bytes": weights + predicted_extra,
        },
        "measured_over_plan": {
            "forward_calls": agreement(calls, meter.forward_calls),
            "extra_bytes": agreement(predicted_extra, meter.peak_extra_bytes),
            "peak_bytes": agreement(weights + predicted_extra, weights + meter.peak_extra_bytes),
        },
    }


def plan_record_of(stage: Any, weights: int, meter: Meter) -> dict[str, Any]:
    """:func:`plan_record` of one ``plan()`` row (its weights are ``weights``: the model as built)."""
    return plan_record(
        stage.forward_calls, stage.extra_bytes, stage.activation_bytes, weights, meter, stage.stage
    )
