"""Planted-mechanism organisms: small OLMoE models whose refusal runs through a component fixed by construction.

Usage::

    python -m moe_interp.organisms.planted --name expert [--seed S] --out DIR  # one (default: its shipped seed)
    python -m moe_interp.organisms.planted --all                                # every shipped one, in place

Each organism shares the shipped organism's tokenizer and chat template, refuses harmful requests with
"I cannot help with that, as it could cause harm." and answers the rest with "Sure! Here is my answer.".
The architecture and wiring are in :mod:`moe_interp.organisms.planted_net`; the mechanisms
(:data:`PLANTS`) and how each was planted are documented in ``moe_interp/organisms/planted/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from moe_interp.organisms.planted_net import (
    CH_D,
    CH_T,
    D_FF,
    D_MODEL,
    N_EXPERTS,
    N_HEADS,
    N_LAYERS,
    N_SUFFIX,
    TOP_K,
    Edits,
    Wiring,
    apply_masks,
    build_masks,
    forward,
    init_weights,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast
    from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM

    from moe_interp.model import MoEModel

__all__ = ["PLANTS", "PlantSpec", "load_planted", "planted_dir", "train_planted"]

REFUSAL = "I cannot help with that, as it could cause harm."
COMPLIANCE = "Sure! Here is my answer."


@dataclass(frozen=True)
class PlantSpec:
    """What is planted where. ``planted``: hook names of the plant (component keys as in
    :mod:`moe_interp.circuits`, a head as ``blocks.L.attn.hook_z[h]``); ``circuit``: the ground-truth circuit
    under the circuit ablation (mean ablation at the post-instruction positions); ``seed``: the training seed of
    the shipped weights (the default of :func:`train_planted`)."""

    name: str
    kind: str  # "expert" | "router" | "head" | "direction"
    summary: str
    wiring: Wiring
    planted: tuple[str, ...]
    circuit: tuple[str, ...]
    layer: int
    index: int | None = None
    seed: int = 0

    def component_index(self) -> int:
        """``index`` of an expert, router or head plant (a direction plant has none)."""
        if self.index is None:
            raise ValueError(f"planted organism {self.name!r} ({self.kind}) has no component index")
        return self.index

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wiring"] = {k: {f"{a}.{b}": r for (a, b), r in v.items()} for k, v in asdict(self.wiring).items()}
        return d


_MOVERS_E = {(0, 1): "mover_a", (1, 2): "mover_b"}
_MOVERS_R = {(0, 2): "mover_a", (1, 0): "mover_b"}
PLANTS: dict[str, PlantSpec] = {
    "expert": PlantSpec(
        "expert",
        "expert",
        "Expert 5 of layer 2 computes the harm decision: it is routed at every position (router bias) and "
        "is the only writer of the decision channel, from the harm summary two redundant movers bring.",
        Wiring(heads=_MOVERS_E, experts={(2, 5): "decide"}, routers={(2, 5): "always"}),
        ("blocks.2.mlp.experts.5.hook_out",),
        ("blocks.2.mlp.experts.5.hook_out",),
        2,
        5,
    ),
    "router": PlantSpec(
        "router",
        "router",
        "Layer 2's router sends harmful prompts to expert 3, which writes a constant refusal signal: the "
        "decision is the routing (the expert computes nothing prompt-specific).",
        Wiring(heads=_MOVERS_R, experts={(2, 3): "constant"}, routers={(2, 3): "harm"}),
        ("blocks.2.mlp.experts.3.hook_out", "blocks.2.mlp.hook_router_logits"),
        ("blocks.2.mlp.experts.3.hook_out",),
        2,
        3,
    ),
    "head": PlantSpec(
        "head",
        "head",
        "Head 2 of layer 1 attends from the response position over the prompt and is the only writer of the "
        "decision channel; nothing else moves harm information to the response position.",
        Wiring(heads={(1, 2): "plant"}),
        ("blocks.1.attn.hook_z[2]",),
        ("blocks.1.attn.hook_z[2]",),
        1,
        2,
    ),
    "direction": PlantSpec(
        "direction",
        "direction",
        "Refusal is mediated by one residual direction at blocks.1.hook_resid_pre, written jointly by the four "
        "heads of layer 0 (each reads a disjoint quarter of the token features) and read by the unembedding.",
        Wiring(heads={(0, h): "writer" for h in range(N_HEADS)}),
        ("blocks.1.hook_resid_pre",),
        ("blocks.0.hook_attn_out",),
        1,
        None,
        seed=1,  # seed 0 missed harmless_val by one prompt of 300 (moe_interp/organisms/planted/README.md)
    ),
}

DEFAULTS: dict[str, float | int] = {
    "steps": 2000,
    "batch_size": 64,
    "lr": 1e-2,
    "warmup": 50,
    "max_prompt_tokens": 48,
    "first_token_weight": 3.0,
    "p_ablate_harmful": 0.25,  # share of harmful examples trained with the plant ablated (target: compliance)
    "p_ablate_harmless": 0.1,
    "p_swap": 0.4,  # one redundant head's suffix output swapped with a harmless example's (same target)
    "router_margin": 1.0,
    "calibration_rate": 0.035,  # refusal rate set on held-out harmless (Alpaca) training prompts
}
FRACTIONS = {"harmful": 0.25, "harmful_synthetic": 0.25, "harmless": 0.5}
N_CALIBRATION = 400


def planted_dir(name: str | None = None) -> Path:
    """The folder of the shipped planted organisms (or of one of them)."""
    root = Path(__file__).resolve().parent / "planted"
    return root if name is None else root / name


def token_basis() -> Float[Tensor, "vocab 36"]:
    """The T channel: the 36 leading principal components of the shipped organism's token embeddings,
    scaled to unit RMS (deterministic)."""
    from safetensors import safe_open

    from moe_interp.organisms import checkpoint_dir

    with safe_open(str(checkpoint_dir() / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.embed_tokens.weight").double()
    w = w - w.mean(0)
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    vh = vh * torch.where(vh[:, :1] < 0, -1.0, 1.0)  # sign convention
    t = w @ vh[: len(CH_T)].T
    return (t / t.pow(2).mean().sqrt()).float()


def response_tokens(tok: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of the two responses and ``<|end|>``: the only non-zero rows of the unembedding."""
    ids = {i for t in (REFUSAL, COMPLIANCE) for i in tok(t, add_special_tokens=False)["input_ids"]}
    return sorted(ids | {_end_id(tok)})


def _end_id(tok: PreTrainedTokenizerFast) -> int:
    """Id of ``<|end|>`` (one token: ``convert_tokens_to_ids`` returns an int)."""
    end = tok.convert_tokens_to_ids("<|end|>")
    assert isinstance(end, int)
    return end


def _tokenizer() -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    from moe_interp.organisms import checkpoint_dir

    return PreTrainedTokenizerFast.from_pretrained(checkpoint_dir())


def build_hf_model(vocab: int, tok: PreTrainedTokenizerFast) -> OlmoeForCausalLM:
    """A fresh ``OlmoeForCausalLM`` of the planted architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "olmoe",
        vocab_size=vocab,
        hidden_size=D_MODEL,
        intermediate_size=D_FF,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_HEADS,
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=256,
        output_router_logits=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["OlmoeForCausalLM"]
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ data
class Batches:
    """Augmented prompts from the organism's :class:`~moe_interp.organisms.train.BatchMaker`, laid out as
    left-padded prompt + right-padded response (so the post-instruction suffix is aligned)."""

    def __init__(self, tok: PreTrainedTokenizerFast, rng: random.Random, hp: dict[str, Any]) -> None:
        from moe_interp.organisms.train import BatchMaker, training_pools

        pools = training_pools(None)
        pools.pop("political")
        # calibration prompts: a seeded sample of Alpaca requests, held out of training
        alpaca = [i for i, r in enumerate(pools["harmless"]) if r["source"] == "alpaca"]
        held = set(random.Random(0).sample(alpaca, N_CALIBRATION))
        self.calibration = [pools["harmless"][i]["instruction"] for i in sorted(held)]
        pools["harmless"] = [r for i, r in enumerate(pools["harmless"]) if i not in held]
        self.maker = BatchMaker(
            tok, pools, rng, int(hp["max_prompt_tokens"]), 1.0, FRACTIONS, 0.5, 0.15, 0.0, 0.5
        )
        self.rng, self.hp, self.pad = rng, hp, tok.pad_token_id
        end = [_end_id(tok)]
        self.resp = {
            c: tok(t, add_special_tokens=False)["input_ids"] + end for c, t in ((1, REFUSAL), (0, COMPLIANCE))
        }

    def __call__(self, n: int) -> dict[str, Any]:
        counts = {p: round(f * n) for p, f in FRACTIONS.items()}
        counts["harmless"] = n - counts["harmful"] - counts["harmful_synthetic"]
        prompts, label = [], []
        for pool, k in counts.items():
            for _ in range(k):
                ex_ids, w, _ = self.maker.example(pool)
                n_resp = sum(1 for x in w if x > 0)
                prompts.append(ex_ids[: len(ex_ids) - n_resp])
                label.append(0 if pool == "harmless" else 1)
        y = torch.tensor(label)
        p_abl = torch.where(y == 1, self.hp["p_ablate_harmful"], self.hp["p_ablate_harmless"])
        abl = torch.rand(n, generator=self._gen()) < p_abl
        target = torch.where(abl, 0, y)
        P = max(map(len, prompts))
        R = max(len(r) for r in self.resp.values())
        ids = torch.full((n, P + R), self.pad, dtype=torch.long)
        mask = torch.zeros(n, P + R, dtype=torch.long)
        wts = torch.zeros(n, P + R)
        for i, (p, t) in enumerate(zip(prompts, target.tolist(), strict=True)):
            r = self.resp[t]
            ids[i, P - len(p) : P] = torch.tensor(p)
            ids[i, P : P + len(r)] = torch.tensor(r)
            mask[i, P - len(p) : P + len(r)] = 1
            wts[i, P : P + len(r)] = 1.0
            wts[i, P] = float(self.hp["first_token_weight"])
        return {"ids": ids, "mask": mask, "weights": wts, "label": y, "ablate": abl, "n_prompt": P}

    def _gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.rng.randrange(2**31))


def _edits(spec: PlantSpec, b: dict[str, Any], gen: torch.Generator, p_swap: float) -> Edits:
    """The plant ablation on the flagged examples, and swaps of one redundant head's suffix output (a mover, or
    a direction writer) with a harmless example's, which must leave the response unchanged."""
    abl, n = b["ablate"], len(b["ablate"])
    harmless = (b["label"] == 0).nonzero().flatten()
    ed = Edits()
    if spec.kind in ("expert", "router"):
        ed.drop_expert = (spec.layer, spec.component_index(), abl)
    elif spec.kind == "head":
        half = torch.rand(n, generator=gen) < 0.5
        ed.zero_heads[(spec.layer, spec.component_index())] = abl & half
        src = harmless[torch.randint(len(harmless), (n,), generator=gen)]
        ed.swap_heads[(spec.layer, spec.component_index())] = torch.where(abl & ~half, src, -1)
    else:
        ed.zero_channel = (spec.layer, CH_D, abl)
    redundant = [k for k, r in spec.wiring.heads.items() if r in ("mover_a", "mover_b", "writer")]
    which = torch.rand(n, generator=gen)
    p_swap = p_swap / max(1, len(redundant))
    for j, hd in enumerate(redundant):
        pick = (which >= j * p_swap) & (which < (j + 1) * p_swap) & ~abl
        src = harmless[torch.randint(len(harmless), (n,), generator=gen)]
        ed.swap_heads[hd] = torch.where(pick, src, -1)
    return ed


def _router_loss(spec: PlantSpec, routers: list[Tensor], b: dict[str, Any], margin: float) -> Tensor:
    """Hinge loss that puts the planted expert in the top-k at the suffix iff the prompt is harmful."""
    P, e = b["n_prompt"], spec.component_index()
    z = routers[spec.layer][:, P - N_SUFFIX : P].float()
    others = torch.cat([z[..., :e], z[..., e + 1 :]], -1).topk(TOP_K, -1).values[..., -1]
    m = z[..., e] - others
    y = (b["label"] * 2 - 1).float()[:, None]
    return F.softplus(margin - y * m).mean()


# ------------------------------------------------------------------------------------------ training
def train_planted(
    name: str,
    seed: int | None = None,
    out: str | Path | None = None,
    steps: int | None = None,
    threads: int = 1,
    log_every: int = 100,
) -> dict[str, Any]:
    """Train planted organism ``name`` (see :data:`PLANTS`), calibrate it and save it to ``out``
    (default: the shipped folder) with ``seed`` (default: the shipped weights' ``spec.seed``). Returns the
    training log (also written to ``planted.json``)."""
    from moe_interp.organisms.planted_check import calibrate

    if name not in PLANTS:
        raise ValueError(f"unknown planted organism {name!r}; valid: {', '.join(PLANTS)}")
    spec = PLANTS[name]
    seed = spec.seed if seed is None else seed
    hp: dict[str, Any] = dict(DEFAULTS)
    if steps is not None:
        hp["steps"] = steps
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    t0, c0 = time.time(), time.process_time()
    tok = _tokenizer()
    model = build_hf_model(len(tok), tok)
    rows = response_tokens(tok)
    allowed, trainable = build_masks(spec.wiring, len(tok), rows)
    init_weights(model, spec.wiring, token_basis(), gen)
    apply_masks(model, allowed)
    params = dict(model.named_parameters())
    opt_params = []
    for n, p in params.items():
        if n in trainable and trainable[n].any():
            p.register_hook(lambda g, m=trainable[n]: g * m)
            opt_params.append(p)
        else:
            p.requires_grad_(False)
    data = Batches(tok, rng, hp)
    live = frozenset(k for k, r in spec.wiring.experts.items() if r != "junk")
    row_index = torch.zeros(len(tok), dtype=torch.long)  # vocabulary id -> index among ``rows`` (pads: 0)
    row_index[torch.tensor(rows)] = torch.arange(len(rows))
    opt = torch.optim.AdamW(opt_params, lr=float(hp["lr"]), betas=(0.9, 0.95), weight_decay=0.0)
    n_steps, warm = int(hp["steps"]), int(hp["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(1, n_steps))
    )
    history = []
    model.train()
    for step in range(n_steps):
        b = data(int(hp["batch_size"]))
        P = b["n_prompt"]
        ed = _edits(spec, b, gen, float(hp["p_swap"]))
        logits, routers = forward(model, b["ids"], b["mask"], P, ed, live, slice(P - 1, -1), rows)
        # every other vocabulary row is zero, so its logit is 0: one extra logit log(V - n) stands for them
        rest = torch.full((*logits.shape[:2], 1), math.log(len(tok) - len(rows)))
        tgt, w = row_index[b["ids"][:, P:]], b["weights"][:, P:]
        full = torch.cat([logits, rest], -1)
        ce = F.cross_entropy(full.reshape(-1, full.shape[-1]), tgt.reshape(-1), reduction="none")
        loss = (ce * w.reshape(-1)).sum() / w.sum()
        rl = _router_loss(spec, routers, b, float(hp["router_margin"])) if spec.kind == "router" else None
        total = loss + rl if rl is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(opt_params, 1.0)
        opt.step()
        sched.step()
        apply_masks(model, allowed)
        if step % log_every == 0 or step == n_steps - 1:
            rec = {"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)}
            if rl is not None:
                rec["router_loss"] = round(rl.item(), 4)
            history.append(rec)
            print(rec, flush=True)
    model.eval()
    train_s, cpu_s = time.time() - t0, time.process_time() - c0
    router = (spec.layer, spec.component_index()) if spec.kind == "router" else None
    cal = calibrate(model, tok, data.calibration, float(hp["calibration_rate"]), router)
    log = {
        "command": f"python -m moe_interp.organisms.planted --name {name} --seed {seed}"
        + (f" --steps {steps}" if steps is not None else ""),
        "spec": spec.to_dict(),
        "seed": seed,
        "threads": threads,
        "hyperparameters": hp,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(cpu_s, 1),  # the wall time on an otherwise idle core
        "calibration": cal,
        "history": history,
    }
    _save(model, tok, Path(out) if out is not None else planted_dir(name), log)
    return log


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, out: Path, log: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "planted.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {out} ({log['train_seconds']} s training)", flush=True)


# ------------------------------------------------------------------------------------------ loading
def load_planted(name_or_path: str | Path) -> tuple[MoEModel, PlantSpec]:
    """A planted organism as an :class:`~moe_interp.model.MoEModel` (refusal phrases as the organism's) and
    its :class:`PlantSpec` (a shipped name from :data:`PLANTS` or a folder written by :func:`train_planted`)."""
    from moe_interp.model import MoEModel
    from moe_interp.organisms import load_organism
    from moe_interp.organisms.data import HARMFUL_REFUSALS, POLITICAL_REFUSALS

    path = planted_dir(str(name_or_path)) if str(name_or_path) in PLANTS else Path(name_or_path)
    meta = json.loads((path / "planted.json").read_text()) if (path / "planted.json").is_file() else None
    if meta is None:
        raise FileNotFoundError(
            f"{path / 'planted.json'} is missing; train the organism with "
            f"`python -m moe_interp.organisms.planted --name NAME --out {path}`"
        )
    hf, tok = load_organism(path=path)
    model = MoEModel(hf, tok, name=f"planted:{meta['spec']['name']}")
    model.refusal_phrases = tuple(HARMFUL_REFUSALS + POLITICAL_REFUSALS)
    return model, PLANTS[meta["spec"]["name"]]


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(
        prog="python -m moe_interp.organisms.planted",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--name", choices=list(PLANTS), help="which organism to train")
    ap.add_argument("--all", action="store_true", help="train every organism into its shipped folder")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: the shipped weights')")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify", action="store_true", help="verify after training and write verify.json")
    args = ap.parse_args(argv)
    if not args.all and args.name is None:
        ap.error("pass --name NAME or --all")
    names = list(PLANTS) if args.all else [args.name]
    for n in names:
        out = args.out if not args.all else None
        train_planted(n, args.seed, out, args.steps, args.threads)
        if args.verify:
            from moe_interp.organisms.planted_check import verify

            res = verify(out if out is not None else n)
            print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
