"""MoEModel: one standardised wrapper over any supported HF MoE (or dense) model.

Reads and edits go through nnsight traces (:mod:`moe_interp.tracing`); the wrapped HF model is never
modified, so nothing persists after a call, a ``with model.intervene(...)`` block or an exception.
"""

from __future__ import annotations

import contextlib
import gc
import html
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformers import BatchEncoding, PreTrainedModel

from moe_interp import guards
from moe_interp.errors import InputError
from moe_interp.families import FamilySpec, get_family
from moe_interp.guards import check_prompts as _check_prompts
from moe_interp.hooks import BLOCK_SITES, check_writable, validate_names
from moe_interp.model_structure import ModelSpec, enumerate_hooks, make_spec, resolve_layers
from moe_interp.tl_compat import MoEConfig, TLCacheMixin
from moe_interp.tracing import EditFn, LayerTracer, TraceRequest, finite

__all__ = ["Generation", "ModelSpec", "MoECache", "MoEModel", "load"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence two expected warnings inside our own traces only (the user's filters are left alone)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")  # nnsight's open generation loop
        warnings.filterwarnings(
            "ignore", message=".*is falling back to its reference PyTorch implementation.*"
        )
        yield


@dataclass
class Generation:
    """One sampled completion with the log-probability of each generated token."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        return sum(self.token_logprobs) / max(len(self.token_logprobs), 1)


# TLCacheMixin replaces some TL methods on purpose (logit_lens returns a LogitLensResult): mypy flags the clash
class MoECache(TLCacheMixin, ActivationCache):  # type: ignore[misc]
    """TransformerLens ``ActivationCache`` of moe-interp hook values (all ``[batch, pos, ...]``).

    Methods that need TL model weights are re-built on the hooks (:class:`~moe_interp.tl_compat.TLCacheMixin`).
    """

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.cache_dict.items())[:6])
        more = f", … (+{len(self.cache_dict) - 6})" if len(self.cache_dict) > 6 else ""
        return f"MoECache({len(self.cache_dict)} hooks: {shapes}{more})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{k}</code></td><td>{tuple(v.shape)}</td><td>{v.dtype}</td></tr>"
            for k, v in self.cache_dict.items()
        )
        return f"<table><tr><th>hook</th><th>shape</th><th>dtype</th></tr>{rows}</table>"


Prompts = str | Sequence[str]
#: what the forward-pass methods take: prompts, or already tokenized ``input_ids`` / ``attention_mask``
Inputs = Prompts | BatchEncoding | Mapping[str, Any]
#: hook names to cache: one name, a list, a predicate on names, or None (every hook but the dense per-expert outputs)
_Names = str | Sequence[str] | Callable[[str], bool] | None


class MoEModel:
    """A loaded model with TransformerLens-style hook points over its router, experts and attention."""

    def __init__(self, hf_model: PreTrainedModel, tokenizer: Any, *, name: str | None = None) -> None:
        from nnsight.modeling.transformers import TransformersModel

        if tokenizer is None:
            raise ValueError("A tokenizer is required (pass tokenizer=... together with an in-memory model).")
        self.family: FamilySpec = get_family(hf_model.config.model_type)
        emb = hf_model.get_input_embeddings()
        self._n_embed = int(getattr(emb, "num_embeddings", 0) or hf_model.config.vocab_size)
        guards.check_vocab(tokenizer, self._n_embed)
        # everything that can fail runs before the two changes made to the user's objects (eval mode, and a pad
        # token where the tokenizer has none: batched prompts are padded)
        try:
            self.layers = resolve_layers(hf_model, self.family)
        except AttributeError as err:
            raise ValueError(
                f"This {type(hf_model).__name__} does not have the module layout of family "
                f"{self.family.model_type!r} ({err}); pass an unmodified transformers model of a supported family."
            ) from None
        self.spec = make_spec(hf_model, self.family, self.layers)
        self.hf_model = hf_model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or hf_model.config.model_type
        self.nnsight = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
        self._hook_names = enumerate_hooks(self.family, self.layers)
        self._hook_set = set(self._hook_names)
        self._active: list[Any] = []
        #: phrases whose first tokens define the logit refusal score (None: the library default list)
        self.refusal_phrases: tuple[str, ...] | None = None

    @property
    def cfg(self) -> MoEConfig:
        """TransformerLens-style config (n_layers, d_model, n_heads, d_head, d_vocab, normalization_type, ...)."""
        if getattr(self, "_cfg", None) is None:
            from moe_interp.tl_compat import make_config

            self._cfg = make_config(self)
        return self._cfg

    def hook_names(self, filter: str | Callable[[str], bool] | None = None) -> list[str]:
        """All hook points of this model, in execution order (optionally filtered by substring or predicate)."""
        if filter is None:
            return list(self._hook_names)
        pred = filter if callable(filter) else (lambda n: filter in n)
        return [n for n in self._hook_names if pred(n)]

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.spec.n_layers:
            raise ValueError(
                f"Layer {layer!r} is out of range: this model has layers 0..{self.spec.n_layers - 1}."
            )
        return layer

    def check_expert(self, layer: int, expert: int) -> None:
        info = self.layers[self.check_layer(layer)]
        if not info.is_moe:
            raise ValueError(f"Layer {layer} is not an MoE layer; MoE layers: {list(self.spec.moe_layers)}.")
        if not isinstance(expert, int) or not 0 <= expert < info.n_experts:
            raise ValueError(
                f"Expert {expert!r} is out of range: layer {layer} has experts 0..{info.n_experts - 1}."
            )

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def end_token_ids(self) -> frozenset[int]:
        """Token ids that end a generation: the tokenizer's end-of-sequence id and the generation config's
        (a list for chat models with several, e.g. an end-of-turn token besides end-of-text)."""
        gen = getattr(getattr(self.hf_model, "generation_config", None), "eos_token_id", None)
        ids = [self.tokenizer.eos_token_id, *(gen if isinstance(gen, list) else [gen])]
        return frozenset(i for i in ids if isinstance(i, int))

    def __repr__(self) -> str:
        s = self.spec
        moe = (
            f"{len(s.moe_layers)} MoE layers × {s.n_experts} experts (top-{s.top_k})" if s.is_moe else "dense"
        )
        return (
            f"MoEModel({self.name!r}, family={s.family}, {s.n_layers} layers, d_model={s.d_model}, "
            f"{s.n_heads} heads, {moe}, {len(self._hook_names)} hook points)"
        )

    def _repr_html_(self) -> str:
        sites = "".join(
            f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in BLOCK_SITES.items()
        )
        return f"<p>{html.escape(repr(self))}</p>{self.spec._repr_html_()}<ul>{sites}</ul>"

    # ------------------------------------------------------------------------------- inputs
    def format_chat(self, instructions: Prompts) -> list[str]:
        """Apply the tokenizer's chat template to each instruction, generation prompt added."""
        instructions = _check_prompts(instructions)
        if getattr(self.tokenizer, "chat_template", None) is None:
            return instructions
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False
            )
            for x in instructions
        ]

    def tokenize(self, prompts: Prompts, *, chat: bool = True, padding_side: str = "left") -> BatchEncoding:
        """Tokenize (chat-formatted unless ``chat=False``) with padding; special tokens come from the template."""
        prompts = _check_prompts(prompts)
        texts = self.format_chat(prompts) if chat else prompts
        has_template = chat and getattr(self.tokenizer, "chat_template", None) is not None
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=not has_template,
            padding_side=padding_side,
        )
        return enc.to(self.device)

    def _encode(self, inputs: Inputs, chat: bool, new_tokens: int = 0) -> tuple[Tensor, Tensor]:
        """Input ids and attention mask, checked against the vocabulary and context before running."""
        if isinstance(inputs, BatchEncoding | Mapping):
            ids = inputs["input_ids"].to(self.device)
            guards.check_token_ids(ids, self._n_embed)
            mask = inputs.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        else:
            enc = self.tokenize(inputs, chat=chat)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        guards.check_context(self, ids.shape[-1], new_tokens)
        return ids, mask

    # ------------------------------------------------------------------------------- running
    def _collect_edits(self, extra: Sequence[Any] = ()) -> TraceRequest:
        """The active interventions' edits per hook, each labelled with its intervention (for errors)."""
        req = TraceRequest()
        for iv in [*self._active, *extra]:
            label = guards.describe(iv)
            for name, fn in _edits_of(iv, self).items():
                req.edits.setdefault(name, []).append(fn)
                req.labels.setdefault(name, []).append(label)
        return req

    def _trace(
        self,
        ids: Tensor,
        mask: Tensor,
        request: TraceRequest,
        *,
        grad: bool = False,
        last_only: bool = False,
    ) -> tuple[Tensor, dict[str, list[Tensor]]]:
        out, store = self._run(ids, mask, request, grad=grad, last_only=last_only, stop_early=False)
        # one isfinite per forward, with edits only (guards.py: the diagnosis runs only on failure)
        guards.check_finite(self, out["logits"], ids, mask, request, last_only=last_only)
        return out["logits"], store

    def _read(
        self, ids: Tensor, mask: Tensor, request: TraceRequest, *, grad: bool = False
    ) -> dict[str, list[Tensor]]:
        """The hook values of ``request`` without logits: the model stops at the last hook it visits, so the
        layers after it (and the unembedding) never run."""
        _, store = self._run(ids, mask, request, grad=grad, last_only=False, stop_early=True)
        # nnsight's stop is an exception whose traceback holds the interrupted forward's frames in a reference
        # cycle: collected now (young objects, a fraction of a millisecond), the activations go with it
        gc.collect(1)
        if request.edits and not all(finite(t, name) for name, ts in store.items() for t in ts):
            # an edit made a value read non-finite: the whole forward gives the guard's diagnosis, as without
            # the stop (or its warning, where the unedited model overflows too)
            self._trace(ids, mask, request, grad=grad)
        return store

    def _run(
        self,
        ids: Tensor,
        mask: Tensor,
        request: TraceRequest,
        *,
        grad: bool,
        last_only: bool,
        stop_early: bool,
    ) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        store: dict[str, list[Tensor]] = {}
        out: dict[str, Tensor] = {}
        pos_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        need_eager = any(n.endswith("attn.hook_pattern") for n in request.reads)
        with self._eager_attention(need_eager), torch.set_grad_enabled(grad), _quiet():
            kw = {"logits_to_keep": 1} if last_only else {}
            with self.nnsight.trace(input_ids=ids, attention_mask=mask, position_ids=pos_ids, **kw) as tracer:
                _trace_body(self, request, store, out, ids.shape[0], ids.shape[1], mask, tracer, stop_early)
        return out, store

    @contextlib.contextmanager
    def _eager_attention(self, needed: bool) -> Iterator[None]:
        current = self.hf_model.config._attn_implementation
        if not needed or current == "eager":
            yield
            return
        self.hf_model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.hf_model.set_attn_implementation(current)

    def forward(
        self,
        prompts: Inputs,
        *,
        chat: bool = True,
        grad: bool = False,
        last_only: bool = False,
    ) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the (chat-formatted) prompts, with the active interventions applied.

        ``last_only=True`` computes the unembedding at the last position only (``[batch, 1, vocab]``): much
        cheaper for refusal scores and KL on big batches.
        """
        ids, mask = self._encode(prompts, chat)
        logits, _ = self._trace(ids, mask, self._collect_edits(), grad=grad, last_only=last_only)
        return logits

    __call__ = forward

    @overload
    def run_with_cache(
        self,
        prompts: Inputs,
        names: _Names = None,
        *,
        positions: int | slice | Sequence[int] | None = None,
        chat: bool = True,
        batch_size: int | None = None,
        grad: bool = False,
        names_filter: _Names = None,
        return_type: Literal["logits"] = "logits",
    ) -> tuple[Float[Tensor, "batch pos vocab"], MoECache]: ...

    @overload
    def run_with_cache(
        self,
        prompts: Inputs,
        names: _Names = None,
        *,
        positions: int | slice | Sequence[int] | None = None,
        chat: bool = True,
        batch_size: int | None = None,
        grad: bool = False,
        names_filter: _Names = None,
        return_type: None,
    ) -> tuple[None, MoECache]: ...

    def run_with_cache(
        self,
        prompts: Inputs,
        names: str | Sequence[str] | Callable[[str], bool] | None = None,
        *,
        positions: int | slice | Sequence[int] | None = None,
        chat: bool = True,
        batch_size: int | None = None,
        grad: bool = False,
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        return_type: Literal["logits"] | None = "logits",
    ) -> tuple[Float[Tensor, "batch pos vocab"] | None, MoECache]:
        """Run and cache hook values (``[batch, pos, ...]``); ``positions`` keeps only those positions.

        By default every hook except the dense per-expert outputs (``hook_expert_out`` and
        ``experts.{e}.hook_out``, large on real checkpoints: ask for them by name) is cached. Prompts are
        left padded, so negative positions (``[-5, ..., -1]``) align the chat template's last tokens.
        ``names_filter`` is TransformerLens' name for ``names`` (give one of them). ``return_type=None``
        (TransformerLens' argument) returns ``(None, cache)``: the forward stops at the last hook cached, so
        the layers after it and the unembedding never run — the same cache for less compute and memory.
        """
        if return_type not in ("logits", None):
            raise ValueError(f"return_type must be 'logits' or None, got {return_type!r}.")
        if names_filter is not None:
            if names is not None:
                raise ValueError("Give names or names_filter (its TransformerLens alias), not both.")
            names = names_filter
        names = self._resolve_names(names)
        if isinstance(positions, int):
            positions = [positions]
        step = guards.check_count("batch_size", batch_size, allow_none=True)
        ids, mask = self._encode(prompts, chat)
        active = self._collect_edits()
        step = step or ids.shape[0]
        all_logits, caches = [], []
        for start in range(0, ids.shape[0], step):
            req = replace(active, reads=set(names), positions=positions)
            chunk = ids[start : start + step], mask[start : start + step]
            if return_type is None:
                store = self._read(*chunk, req, grad=grad)
            else:
                logits, store = self._trace(*chunk, req, grad=grad)
                all_logits.append(logits)
            caches.append({k: v[0] for k, v in store.items()})
        if len(caches) == 1:  # one batch: no copy
            cache = {k: caches[0][k] for k in names if k in caches[0]}
            return (all_logits[0] if all_logits else None), MoECache(cache, self)
        cache = {k: torch.cat([c[k] for c in caches]) for k in names if k in caches[0]}
        return (torch.cat(all_logits) if all_logits else None), MoECache(cache, self)

    def _resolve_names(self, names: Any) -> list[str]:
        if names is None:
            return [
                n
                for n in self._hook_names
                if not (n.endswith("hook_expert_out") and "topk" not in n) and not n.endswith(".hook_out")
            ]
        if callable(names):
            return [n for n in self._hook_names if names(n)]
        return validate_names(
            list(names) if not isinstance(names, str) else [names], self._hook_set, self._hook_names
        )

    @property
    def has_interventions(self) -> bool:
        """Whether an :meth:`intervene` block (a steering's ``apply``, an ablation, ...) is active."""
        return bool(self._active)

    @contextlib.contextmanager
    def intervene(self, *interventions: Any) -> Iterator[MoEModel]:
        """Edit every forward pass and generation inside the block; all edits are gone on exit."""
        for iv in interventions:
            _edits_of(iv, self)  # validate now: bad interventions fail before anything runs
        n = len(self._active)
        self._active.extend(interventions)
        try:
            yield self
        finally:
            del self._active[n:]

    @torch.no_grad()
    def generate(
        self,
        prompts: Inputs,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float | None = None,
        num_return_sequences: int = 1,
        return_scores: bool = False,
        chat: bool = True,
        seed: int | None = None,
        force: Sequence[Sequence[int]] | None = None,
    ) -> list[str] | list[list[Generation]]:
        """Generate completions (text after the prompt) with the active interventions applied at every step.

        ``return_scores=True`` returns, per prompt, ``num_return_sequences`` :class:`Generation` objects with
        the log-probability of each generated token (up to and including the first end token,
        :attr:`end_token_ids`).
        ``force`` (one token list per prompt, greedy, one sequence each) emits those tokens instead of the
        model's choice — teacher forcing through the generation loop, so every intervention sees the prompt pass
        and the steps exactly as when generating (a gate decided on the prompt, a ``"generated"`` scope), and
        the log-probabilities are the model's own for the forced tokens. ``max_new_tokens`` is then the longest
        list's length; a shorter list is followed by end-of-sequence tokens, which its Generation leaves out.
        """
        forced = None if force is None else [[int(t) for t in f] for f in force]
        if forced is not None:
            if do_sample or num_return_sequences != 1:
                raise InputError("generate(force=...) teacher-forces one greedy sequence per prompt; got "
                                 f"do_sample={do_sample}, num_return_sequences={num_return_sequences}.")  # fmt: skip
            max_new_tokens = max([len(f) for f in forced] + [1])
        guards.check_count("max_new_tokens", max_new_tokens)
        n_ret = guards.check_count("num_return_sequences", num_return_sequences)
        assert n_ret is not None  # check_count returns None only with allow_none
        ids, mask = self._encode(prompts, chat, new_tokens=max_new_tokens)
        if forced is not None and len(forced) != ids.shape[0]:
            raise InputError(
                f"generate(force=...) needs one token list per prompt: {len(forced)} for {ids.shape[0]}."
            )
        active = self._collect_edits()
        b, p = ids.shape
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_return_sequences=n_ret,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=return_scores,
        )
        if forced is not None:
            eos = self.tokenizer.eos_token_id
            gen_kwargs["logits_processor"] = _forced(
                forced, p, self.tokenizer.pad_token_id if eos is None else eos
            )
        if do_sample:
            gen_kwargs["temperature"] = temperature
            gen_kwargs["top_p"] = top_p if top_p is not None else 1.0
            gen_kwargs["top_k"] = 0
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        rng = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
        with rng, _quiet():
            if seed is not None:
                torch.manual_seed(seed)
            res: dict[str, Any] = {}
            flags: list[Tensor] = []  # per step, under edits: are the logits finite? (read once, at the end)
            try:
                with self.nnsight.generate(**gen_kwargs) as tracer:
                    with tracer.invoke(input_ids=ids, attention_mask=mask):
                        rep_mask = mask.repeat_interleave(n_ret, 0)
                        _generate_body(self, tracer, active, rep_mask, b * n_ret, p, flags)
                    with tracer.invoke():
                        res["out"] = tracer.result
            except RuntimeError as err:  # e.g. sampling from NaN probabilities
                guards.check_generation(self, flags, ids, mask, active, cause=err)
                raise
        guards.check_generation(self, flags, ids, mask, active)
        out = res["out"]
        seqs = out.sequences[:, p:]
        ends = self.end_token_ids
        results: list[Generation] = []
        for r in range(seqs.shape[0]):
            toks = seqs[r].tolist()
            if forced is not None:
                toks = toks[: len(forced[r])]
            else:  # up to the first end token (generation pads a finished sequence after it)
                toks = toks[: next((i + 1 for i, t in enumerate(toks) if t in ends), len(toks))]
            lps: list[float] = []
            if return_scores:
                for t, tok in enumerate(toks):
                    lps.append(float(torch.log_softmax(out.logits[t][r].float(), -1)[tok]))
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            results.append(Generation(text=text, token_ids=toks, token_logprobs=lps))
        if not return_scores and n_ret == 1:
            return [g.text for g in results]
        return [results[i * n_ret : (i + 1) * n_ret] for i in range(b)]


def _forced(force: list[list[int]], prompt_len: int, filler: int) -> Any:
    """A logits processor for :meth:`MoEModel.generate`'s ``force``: at each step only the forced token (past a
    list's end, ``filler``) is allowed. ``output_logits`` keeps the unprocessed logits, so scores stay the model's."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Force(LogitsProcessor):
        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            t = input_ids.shape[1] - prompt_len
            tok = torch.tensor([f[t] if t < len(f) else filler for f in force], device=scores.device)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(1, tok[:, None], 0.0)

    return LogitsProcessorList([_Force()])


def _edits_of(iv: Any, model: MoEModel) -> dict[str, EditFn]:
    if not hasattr(iv, "edits"):
        raise TypeError(
            f"{type(iv).__name__} is not an intervention: expected an object with edits(model) -> dict[str, fn]."
        )
    edits = iv.edits(model)
    validate_names(list(edits), model._hook_set, model._hook_names)
    check_writable(edits, model.family.read_only_sites)
    return edits


def _trace_body(
    model: MoEModel,
    request: TraceRequest,
    store: dict[str, list[Tensor]],
    out: dict[str, Tensor],
    batch: int,
    seq: int,
    mask: Tensor,
    tracer: Any,
    stop_early: bool,
) -> None:
    """The body of a forward trace (kept in a real file, as nnsight requires); ``stop_early`` halts the model
    at the last hook the request visits."""
    LayerTracer(model.nnsight, model.family, model.layers, request, store, batch, seq, mask).run()
    if stop_early:
        tracer.stop()  # raises: the model runs no further, and no logits are read
    out["logits"] = model.nnsight.output.logits


def _generate_body(
    model: MoEModel, tracer: Any, request: TraceRequest, mask: Tensor, b: int, p: int, flags: list[Tensor]
) -> None:
    """The body of a generation trace: apply the edits at every generation step, noting finite logits."""
    if not request.edits:
        return
    for step in tracer.iter[:]:
        seq = p if step == 0 else 1
        step_mask = mask if step == 0 else torch.ones(b, 1, dtype=mask.dtype, device=mask.device)
        LayerTracer(
            model.nnsight, model.family, model.layers, request, {}, b, seq, step_mask, step=step
        ).run()
        flags.append(torch.isfinite(model.nnsight.output.logits[:, -1]).all())


# ------------------------------------------------------------------------------------ loading


def load(
    source: str | PreTrainedModel,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> MoEModel:
    """Load a model and wrap it as an :class:`MoEModel`.

    ``source`` is an HF id or local directory (``from_pretrained``), an in-memory ``PreTrainedModel`` (with
    ``tokenizer=``), ``"tiny:<family>"`` (seeded random-init tiny model; ``seed=`` and config overrides via
    ``config=dict(...)``), or ``"organism"`` (the bundled refusing MoE).
    """
    torch_dtype: torch.dtype | None = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(source, PreTrainedModel):
        if torch_dtype is not None and torch_dtype != source.dtype:
            raise ValueError(
                f"dtype={torch_dtype} is for models load() reads; this in-memory model is {source.dtype} and "
                "load() does not convert your model in place: call .to(dtype) on it first, or leave dtype out."
            )
        model = MoEModel(source, tokenizer, name=kwargs.pop("name", None))
    elif isinstance(source, str) and source.startswith("tiny:"):
        model = _load_tiny(source.split(":", 1)[1], dtype=torch_dtype, **kwargs)
    elif isinstance(source, str) and source == "organism":
        from moe_interp.organisms import load_organism
        from moe_interp.organisms.data import HARMFUL_REFUSALS, POLITICAL_REFUSALS

        hf, tok = load_organism(**kwargs)
        model = MoEModel(hf, tok, name="organism")
        model.refusal_phrases = tuple(HARMFUL_REFUSALS + POLITICAL_REFUSALS)
    elif isinstance(source, str) and source == "smollm_moe":  # needs the extra: moe-interp[smollm]
        from moe_interp.organisms.smollm_moe import load_model

        model = load_model(**kwargs)
    elif isinstance(source, str | Path):
        model = _load_pretrained(str(source), tokenizer=tokenizer, dtype=torch_dtype, **kwargs)
    else:
        raise TypeError(
            "load() takes an HF id or directory, 'tiny:<family>', 'organism', or a transformers PreTrainedModel; "
            f"got {type(source).__name__}."
        )
    if torch_dtype is not None and not isinstance(source, PreTrainedModel):
        model.hf_model.to(torch_dtype)
    if device is not None:
        model.hf_model.to(device)
    return model


def _load_tiny(
    family: str, *, dtype: torch.dtype | None = None, seed: int = 0, config: dict | None = None
) -> MoEModel:
    from transformers import AutoModelForCausalLM

    from moe_interp.tiny import TINY_CONFIGS, tiny_config
    from moe_interp.tokenizer import build_tiny_tokenizer

    if family not in TINY_CONFIGS:
        get_family(family)  # unknown family: error naming the supported ones
        raise ValueError(
            f"No tiny config for family {family!r}. Available: {', '.join(sorted(TINY_CONFIGS))}."
        )
    cfg = tiny_config(family, **(config or {}))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg)
    return MoEModel(hf.float(), build_tiny_tokenizer(cfg.vocab_size), name=f"tiny:{family}")


def _load_pretrained(source: str, *, tokenizer: Any, dtype: torch.dtype | None, **kwargs: Any) -> MoEModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(source)
    get_family(
        (getattr(cfg, "text_config", None) or cfg).model_type
    )  # multimodal checkpoints: the text model
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", **kwargs)
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source)
    return MoEModel(hf, tok, name=source)
