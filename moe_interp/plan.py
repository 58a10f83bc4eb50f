"""``moe-interp plan MODEL``: memory and forward passes each pipeline stage needs, from a config alone.

Nothing is loaded: the geometry comes from a transformers config (instantiated on the ``meta`` device to
count parameters exactly) or, for checkpoints that cannot be fetched here, from a recipe's ``expected``
section. Every number follows a closed-form formula (listed per stage in ``formula``); the time column
assumes a sustained throughput (``--tflops``) and counts ``2 × active params`` FLOPs per token forward and
twice that per token backward. These are planning estimates, not measurements.

Symbols: B batch, S sequence length, L layers, Lm MoE layers, d d_model, H heads, dh head dim, E experts,
k top-k, V vocabulary, n positions kept, b bytes per value of the model dtype.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_interp.config import ExpectedGeometry, PipelineConfig, load_config

__all__ = [
    "DTYPE_BYTES",
    "PlanSettings",
    "Stage",
    "find_recipe",
    "geometry_from_hf_config",
    "activation_bytes",
    "plan",
    "resolve_geometry",
    "sweep_extra_bytes",
    "sweep_forward_calls",
]

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

#: per layer and token, values kept by autograd for the backward pass, in units of d_model (rough:
#: norms, q/k/v/o inputs and outputs, residual copies) — attribution patching's dominant memory term.
SAVED_PER_LAYER_D: int = 16

#: patches per forward in activation patching (``run_patches``' ``batch_patches`` default)
PATCH_BATCH: int = 16

#: per token, transient d-wide values alive in one decoder layer's forward (residual, norm output, q/k/v/o,
#: rotary copies, attention output)
ACT_PER_TOKEN_D: int = 10

#: the repository's recipe folder (present in a source checkout)
RECIPES_DIR: Path = Path(__file__).resolve().parent.parent / "circuits"


@dataclass
class PlanSettings:
    """Workload sizes; defaults come from a :class:`PipelineConfig`."""

    dtype: str = "bfloat16"
    batch_size: int = 16
    seq_len: int = 64
    n_pos: int = 5
    n_train: int = 128
    n_val: int = 32
    n_test: int = 100
    n_candidate_layers: int | None = None  # None: all layers
    n_methods: int = 3
    n_coeffs: int = 5
    max_new_tokens: int = 64
    tflops: float = 100.0
    #: ablations of one layer per forward in the expert sweep (None: the sweep's accelerator default, 512 rows)
    batch_experts: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {list(DTYPE_BYTES)}, got {self.dtype!r}.")
        for name in (
            "batch_size",
            "seq_len",
            "n_pos",
            "n_train",
            "n_val",
            "n_test",
            "n_methods",
            "n_coeffs",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        m = self.batch_experts
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"batch_experts must be a positive integer or None, got {m!r}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if not isinstance(self.tflops, int | float) or not self.tflops > 0:
            raise ValueError(f"tflops must be a positive number, got {self.tflops!r}.")

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_layers: int, **overrides: Any) -> PlanSettings:
        """Settings of a pipeline config. Candidate layers: all of ``layers`` but layer 0 — selection scores
        the pruned last fraction too (it only excludes it from the choice), while layer 0's candidates are zero
        vectors (at ``blocks.0.hook_resid_pre`` a post-instruction position holds the same template token's
        embedding in every prompt) and are skipped."""
        n_cand = max(1, len([L for L in cfg.layer_range(n_layers) if L > 0]))
        base: dict[str, Any] = dict(
            dtype=cfg.dtype,
            batch_size=cfg.batch_size,
            n_pos=len(cfg.positions),
            n_train=cfg.n_train,
            n_val=cfg.n_val,
            n_test=cfg.n_test,
            n_candidate_layers=n_cand,
            n_methods=len(cfg.steering_methods),
            max_new_tokens=cfg.max_new_tokens,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class Stage:
    """One row of the plan."""

    stage: str
    forward_calls: int  # batched forward calls (backward calls counted in forward_equiv)
    tokens: int  # token positions processed (padded: calls × B × S)
    extra_bytes: int  # memory on top of the weights: what the stage keeps (caches, logits, gradients)
    peak_bytes: int  # weights + extra + activations
    time_s: float
    formula: str
    activation_bytes: int = 0  # transient activations of the stage's largest forward (activation_bytes())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- geometry
def geometry_from_hf_config(cfg: Any) -> ExpectedGeometry:
    """Geometry of a transformers config: the model is built on the ``meta`` device and counted."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_interp.families import get_family, text_config
    from moe_interp.tracing import _get

    tcfg = text_config(cfg)  # multimodal wrappers (FamilySpec.wrapper_types): the text model's config
    fam = get_family(tcfg.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    layers = list(_get(model, fam.layers))
    n_experts = int(
        getattr(tcfg, "num_local_experts", 0)
        or getattr(tcfg, "num_experts", 0)
        or getattr(tcfg, "n_routed_experts", 0)
        or 0
    )
    top_k = int(getattr(tcfg, "num_experts_per_tok", 0) or 0)
    n_moe, inactive, n_shared = 0, 0, 0
    for layer in layers:
        mlp = getattr(layer, fam.mlp, None)
        if mlp is None or not (hasattr(mlp, fam.router) and hasattr(mlp, fam.experts)) or fam.dense:
            continue
        n_moe += 1
        ex_params = sum(p.numel() for p in getattr(mlp, fam.experts).parameters())
        if n_experts:
            inactive += (n_experts - top_k) * ex_params // n_experts
        if fam.shared and hasattr(mlp, fam.shared):
            n_shared = int(getattr(tcfg, "n_shared_experts", 0) or 1)
    d = int(tcfg.hidden_size)
    n_heads = int(tcfg.num_attention_heads)
    d_head = int(getattr(tcfg, "v_head_dim", 0) or getattr(tcfg, "head_dim", 0) or d // n_heads)
    mla = bool(getattr(tcfg, "kv_lora_rank", 0))
    n_kv = int(getattr(tcfg, "num_key_value_heads", 0) or n_heads)
    if n_heads % n_kv:
        n_kv = n_heads
    d_expert = int(getattr(tcfg, "moe_intermediate_size", 0) or getattr(tcfg, "intermediate_size", 0) or d)
    d_shared = int(getattr(tcfg, "shared_expert_intermediate_size", 0) or 0)
    if not d_shared and n_shared:
        d_shared = d_expert * n_shared
    return ExpectedGeometry(
        n_layers=len(layers),
        d_model=d,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        vocab_size=int(tcfg.vocab_size),
        n_experts=n_experts if n_moe else 0,
        top_k=top_k if n_moe else 0,
        n_moe_layers=n_moe,
        d_expert=d_expert,
        total_params=float(total),
        active_params=float(total - inactive),
        n_shared_experts=n_shared,
        d_shared=d_shared,
        d_dense=int(getattr(tcfg, "intermediate_size", 0) or 0) if n_moe < len(layers) else 0,
        attention="mla" if mla else ("mha" if n_kv == n_heads else "gqa"),
        max_position_embeddings=getattr(tcfg, "max_position_embeddings", None),
    )


def find_recipe(model_id: str, root: Path | None = None) -> Path | None:
    """The recipe whose ``model`` is ``model_id`` (under ``circuits/``), or None."""
    root = RECIPES_DIR if root is None else root
    for path in sorted(root.glob("*/config.json")) if root.is_dir() else []:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("model") == model_id:
                return path
        except (OSError, ValueError):
            continue
    return None


def _is_recipe(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "family" in data and "model" in data and "model_type" not in data


def resolve_geometry(
    source: str, *, from_hub: bool = False
) -> tuple[ExpectedGeometry, PipelineConfig | None, str]:
    """Geometry (and the recipe, if any) for ``source``, plus a note saying where it came from.

    ``source``: ``tiny:<family>``, ``organism``, a recipe (``circuits/<name>/config.json`` or its folder),
    a local HF model directory, or an HF id (a recipe with that id is used unless ``from_hub``).
    """
    from transformers import AutoConfig

    if not isinstance(source, str) or not source:
        raise ValueError(f"MODEL must be a non-empty string, got {source!r}.")
    if source.startswith("tiny:"):
        from moe_interp.tiny import tiny_config

        return geometry_from_hf_config(tiny_config(source.split(":", 1)[1])), None, "tiny config"
    if source == "organism":
        from moe_interp.organisms import checkpoint_dir

        organism_recipe = RECIPES_DIR / "organism" / "config.json"
        cfg = load_config(organism_recipe) if organism_recipe.is_file() else None
        if (checkpoint_dir() / "config.json").is_file():
            geo = geometry_from_hf_config(AutoConfig.from_pretrained(checkpoint_dir()))
            return geo, cfg, "organism checkpoint config"
        if cfg is not None and cfg.expected is not None:
            return cfg.expected, cfg, "organism recipe (checkpoint not built)"
        raise ValueError("The organism checkpoint is missing and no organism recipe was found.")
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file() and _is_recipe(path / "config.json"):
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        if not _is_recipe(path):
            raise ValueError(f"{path} is not a pipeline recipe (needs 'model' and 'family' keys).")
        cfg = load_config(path)
        if cfg.expected is None:
            return resolve_geometry(cfg.model, from_hub=from_hub)[0], cfg, f"{cfg.model} via recipe {path}"
        return cfg.expected, cfg, f"recipe {path} (published geometry)"
    if path.is_dir():
        try:
            hf = AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any failure: explain
            raise ValueError(f"Cannot read a transformers config in {path}: {e}") from None
        return geometry_from_hf_config(hf), None, f"config in {path}"
    recipe = None if from_hub else find_recipe(source)
    if recipe is not None:
        cfg = load_config(recipe)
        if cfg.expected is not None:
            return cfg.expected, cfg, f"recipe {recipe} (published geometry; --from-hub reads the hub config)"
    try:
        hf = AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"Cannot get a config for {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Pass 'tiny:<family>', 'organism', a local HF model directory, or a recipe such as "
            "circuits/<name>/config.json."
        ) from None
    recipe = find_recipe(source)
    return geometry_from_hf_config(hf), load_config(recipe) if recipe else None, "hub config"


# ---------------------------------------------------------------------------------------------- formulas
def sweep_forward_calls(experts_per_layer: list[int], batch_experts: int = 16) -> int:
    """Forward calls of :func:`~moe_interp.patching.expert_ablation_sweep` (prefix reuse): one cached pass,
    then ``⌈n/batch_experts⌉`` per layer of ``n`` swept experts (fewer when no prompt reaches an expert)."""
    return 1 + sum(math.ceil(n / batch_experts) for n in experts_per_layer if n)


def sweep_extra_bytes(geo: ExpectedGeometry, n: int, S: int, b: int, n_layers: int, per_forward: int) -> int:
    """Memory the expert sweep over ``n_layers`` layers keeps: the cached pass (layer outputs, MLP inputs,
    router weights) and the last-position logits of one forward of ``per_forward`` ablations × ``n`` prompts
    (its activations: :func:`activation_bytes` of ``per_forward·n·S`` tokens)."""
    cache = n_layers * n * S * (2 * geo.d_model + geo.n_experts) * b
    return cache + per_forward * n * geo.vocab_size * 4


def activation_bytes(geo: ExpectedGeometry, tokens: int, b: int) -> int:
    """Transient activations of one forward over ``tokens`` token positions, at its largest layer (rough,
    calibrated on the CPU benchmarks): ``ACT_PER_TOKEN_D`` d-wide values per token plus, in an MoE layer,
    each of the k routed copies' gathered and sorted inputs, weighted and unweighted outputs (``4d``), its
    gate/up/activation values (``3·d_expert``) and the router scores."""
    per_token = ACT_PER_TOKEN_D * geo.d_model
    if geo.n_moe_layers:
        per_token += geo.top_k * (4 * geo.d_model + 3 * geo.d_expert) + geo.n_experts
    return int(tokens * per_token * b)


def plan(geo: ExpectedGeometry, s: PlanSettings) -> list[Stage]:
    """Every pipeline stage's forward calls, tokens, memory and time for geometry ``geo``."""
    b = DTYPE_BYTES[s.dtype]
    B, S, n, nv = s.batch_size, s.seq_len, s.n_pos, s.n_val
    L, Lm, d, H, dh = geo.n_layers, geo.n_moe_layers, geo.d_model, geo.n_heads, geo.d_head
    E, k, V = geo.n_experts, geo.top_k, geo.vocab_size
    P, Pa = float(geo.total_params), float(geo.active_params)
    weights = int(round(P * b))
    logits = B * S * V * 4  # float32 logits of one batched forward
    fwd_flops_per_token = 2.0 * Pa
    rate = s.tflops * 1e12
    rows: list[Stage] = []

    def add(
        name: str,
        calls: int,
        tokens: int,
        extra: int,
        formula: str,
        fwd_equiv: float = 1.0,
        act_tokens: int = B * S,
    ) -> None:
        t = fwd_equiv * fwd_flops_per_token * tokens / rate
        act = activation_bytes(geo, act_tokens, b)
        peak = int(weights + extra + act)
        rows.append(Stage(name, int(calls), int(tokens), int(extra), peak, float(t), formula, act))

    def batches(n_prompts: int) -> int:
        return math.ceil(n_prompts / B)

    for dt, nb in DTYPE_BYTES.items():
        if dt == "float16":
            continue
        rows.append(Stage(f"weights ({dt})", 0, 0, 0, int(round(P * nb)), 0.0, f"P × {nb}"))
    # direction collection: run_with_cache of resid_pre at n positions, harmful + harmless train prompts
    c = batches(s.n_train) * 2
    add(
        "resid_pre cache (n positions)",
        c,
        c * B * S,
        B * n * L * d * b + logits,
        "calls = 2·⌈n_train/B⌉; extra = B·n·L·d·b + B·S·V·4",
    )
    add(
        "resid cache, all positions (pre/mid/post)",
        1,
        B * S,
        3 * B * S * L * d * b + logits,
        "extra = 3·B·S·L·d·b + B·S·V·4",
    )
    if Lm:
        add(
            "expert outputs: dense hook_expert_out",
            1,
            B * S,
            B * S * Lm * E * d * b + logits,
            "extra = B·S·Lm·E·d·b + B·S·V·4",
        )
        add(
            "expert outputs: sparse top-k form",
            1,
            B * S,
            B * S * Lm * k * (d * b + 8) + logits,
            "extra = B·S·Lm·k·(d·b + 8) + B·S·V·4  (values + int64 indices)",
        )
        n_abl = Lm * E
        m = s.batch_experts or max(1, 512 // nv)
        add(
            f"expert ablation sweep ({n_abl} ablations)",
            sweep_forward_calls([E] * Lm, m),
            nv * S * (1 + n_abl),
            sweep_extra_bytes(geo, nv, S, b, Lm, min(m, E)),
            "calls = 1 + Lm·⌈E/m⌉ (one cached unedited pass, then m ablations of one layer per forward on all "
            "n_val prompts); extra = Lm·n_val·S·(2d + E)·b (cached layer outputs, MLP inputs, router weights) "
            "+ m·n_val·V·4; activations of m·n_val·S tokens; time: an ablation of layer i restarts after it "
            "(≈ L−1−i layers; MoE layers taken as the last Lm), an upper bound (prompts the expert never reaches "
            "are skipped)",
            fwd_equiv=(1 + n_abl * (Lm - 1) / (2 * L)) / (1 + n_abl),
            act_tokens=min(m, E) * nv * S,
        )
    # resid_pre + hook_z + the dense per-expert outputs (attribution reads hook_expert_out), per token.
    # attribution_patching runs all n_val prompts at once: clean cache, corrupt cache, one forward + backward
    sites = L * d + L * H * dh + Lm * E * d
    saved = nv * S * L * (SAVED_PER_LAYER_D * d + 3 * k * geo.d_expert + H * S) * b
    add(
        "attribution patching (2 fwd + 1 bwd)",
        3,
        2 * nv * S,
        4 * nv * S * sites * b + saved + nv * S * V * 4,
        "calls = 3 (all n_val prompts at once); extra = 4·n_val·S·(L·d + L·H·dh + Lm·E·d)·b (clean and corrupt "
        "caches, the zero deltas and their gradients) + autograd n_val·S·L·(16d + 3k·d_expert + H·S)·b + "
        "n_val·S·V·4; time counts the backward as 2 forwards",
        fwd_equiv=2.0,  # 2 forwards + 1 backward (≈ 2 forwards) over the tokens of 2 forwards
        act_tokens=nv * S,
    )
    # activation patching: the clean and corrupt runs, then PATCH_BATCH patches per forward, each on all n_val
    # prompts (the target prompts repeated once per patch)
    for label, items, width, items_f, width_f in (
        ("layer × position", L * S, L * d, "L·S", "L·d"),
        ("layer × head", L * H, L * H * dh, "L·H", "L·H·dh"),
    ):
        per = min(PATCH_BATCH, items)
        add(
            f"activation patching: {label}",
            math.ceil(items / PATCH_BATCH) + 2,
            (items + 2) * nv * S,
            nv * S * width * b + per * nv * S * V * 4,
            f"calls = ⌈{items_f}/{PATCH_BATCH}⌉ + 2; extra = n_val·S·{width_f}·b (clean cache) + "
            f"min({PATCH_BATCH}, {items_f})·n_val·S·V·4 (logits of one forward); activations of "
            f"min({PATCH_BATCH}, {items_f})·n_val·S tokens",
            act_tokens=per * nv * S,
        )
    n_layers_cand = s.n_candidate_layers or L
    cand = n_layers_cand * n
    c = (3 * cand + 2) * batches(s.n_val)
    add(
        f"direction selection ({cand} candidates)",
        c,
        c * B * S,
        cand * d * 4 + logits,
        "calls = (3·layers·n + 2)·⌈n_val/B⌉ (bypass, induce, KL per candidate); extra = candidates·d·4 + B·S·V·4",
    )
    T = s.max_new_tokens
    prompt_calls = s.n_methods * s.n_coeffs * batches(2 * s.n_test)
    kv = B * (S + T) * L * 2 * geo.n_kv_heads * dh * b
    add(
        f"steering evaluation ({s.n_methods} methods × {s.n_coeffs} coeffs)",
        prompt_calls * (1 + T),
        prompt_calls * B * (S + T),
        kv + B * V * 4,
        "calls = M·C·⌈2·n_test/B⌉·(1 + T); extra = KV cache B·(S+T)·L·2·n_kv·dh·b + B·V·4 (MLA caches less)",
    )
    return rows


# ---------------------------------------------------------------------------------------------- output
def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB" if x >= 1e8 else f"{x / 1e6:.3g} MB"


def _dur(t: float) -> str:
    if t < 1:
        return f"{t * 1e3:.3g} ms"
    if t < 120:
        return f"{t:.3g} s"
    if t < 7200:
        return f"{t / 60:.3g} min"
    return f"{t / 3600:.3g} h"


def format_table(rows: list[Stage]) -> str:
    """Plain-text table of the plan."""
    head = ("stage", "fwd calls", "tokens", "extra mem", "activations", "peak mem", "est. time")
    body = [
        (
            r.stage,
            f"{r.forward_calls:,}",
            f"{r.tokens:,}",
            _gb(r.extra_bytes) if r.extra_bytes else "-",
            _gb(r.activation_bytes) if r.activation_bytes else "-",
            _gb(r.peak_bytes),
            _dur(r.time_s) if r.forward_calls else "-",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(xs: tuple[str, ...]) -> str:
        cells = (
            x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths, strict=True))
        )
        return "  ".join(cells)

    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(x) for x in body)])


def _run(args: argparse.Namespace) -> int:
    geo, cfg, origin = resolve_geometry(args.model, from_hub=args.from_hub)
    if args.config:
        cfg = load_config(args.config)
    if cfg is None:
        family = "olmoe"  # placeholder family: only the workload defaults are used
        cfg = PipelineConfig(model="organism", family=family)
    settings = PlanSettings.from_config(
        cfg,
        geo.n_layers,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        n_coeffs=args.n_coeffs,
        tflops=args.tflops,
    )
    rows = plan(geo, settings)
    if args.json:
        out = {
            "model": args.model,
            "geometry_source": origin,
            "geometry": asdict(geo),
            "settings": asdict(settings),
            "stages": [r.to_dict() for r in rows],
        }
        print(json.dumps(out, indent=2))
        return 0
    g = geo
    print(f"{args.model}  (geometry: {origin})")
    print(
        f"  {g.n_layers} layers ({g.n_moe_layers} MoE), d_model={g.d_model}, {g.n_heads} heads × {g.d_head}, "
        f"E={g.n_experts}, top-{g.top_k}, shared={g.n_shared_experts}, V={g.vocab_size}, "
        f"params {g.total_params / 1e9:.3g}B total / {g.active_params / 1e9:.3g}B active"
    )
    st = settings
    print(
        f"  dtype={st.dtype}, B={st.batch_size}, S={st.seq_len}, n_pos={st.n_pos}, n_train={st.n_train}, "
        f"n_val={st.n_val}, n_test={st.n_test}, throughput {st.tflops:g} TFLOP/s (assumed)\n"
    )
    print(format_table(rows))
    symbols = " ".join((__doc__ or "").split("Symbols:")[1].split())
    print(f"\nPer-stage formulas: --json. Symbols: {symbols}")
    return 0
