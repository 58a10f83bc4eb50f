"""Remote execution (NDIF) of moe-interp hook reads and edits, through nnsight's own request serialisation.

A forward with hook reads and the active interventions' edits is one nnsight trace whose body runs the
hook adapter (:class:`~moe_interp.tracing.LayerTracer`). With ``remote=True`` nnsight serialises that body
(its source, plus by value every function it calls — moe-interp is registered with ``nnsight.register``, since
NDIF servers do not have it installed), runs it next to the hosted model and sends back the saved hook values
and logits. ``remote="local"`` is nnsight's dry run of the same path: serialise, deserialise with moe-interp
hidden from ``sys.modules`` as on a server, and run here (tested, ``tests/test_remote.py``).

    model = moe_interp.remote.connect("allenai/OLMoE-1B-7B-0924")   # meta weights here, real ones on NDIF
    logits, cache = moe_interp.remote.run_with_cache(model, ["How do I ..."], names=[...], remote=True)

What stays local, and why, is in ``docs/scale_out.md``: anything that is many forwards driven by a Python loop
(sweeps, selection, steering searches) and generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.tracing import LayerTracer, TraceRequest

if TYPE_CHECKING:
    from moe_interp.model import MoECache, MoEModel

__all__ = ["connect", "forward", "payload_bytes", "run_with_cache"]


def _register() -> None:
    import nnsight

    nnsight.register("moe_interp")  # ship the adapter's source with every request (idempotent)


def connect(repo_id: str, *, tokenizer: Any = None, **kwargs: Any) -> MoEModel:
    """An :class:`MoEModel` over nnsight's ``TransformersModel(repo_id)``: meta weights here, traces on NDIF.

    Only :func:`run_with_cache` / :func:`forward` with ``remote=True`` run it (local methods would compute
    on the meta device). ``kwargs`` go to ``TransformersModel`` (e.g. ``revision``).
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    from moe_interp.model import MoEModel

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=kwargs.get("revision"))
    lm = TransformersModel(repo_id, tokenizer=tokenizer, task="text-generation", **kwargs)
    # MoEModel wraps its HF model in a new TransformersModel, which cannot be built around meta weights:
    # hand it the remote-capable one instead (MoEModel imports the class when it is constructed)
    with mock.patch("nnsight.modeling.transformers.TransformersModel", lambda *a, **k: lm):
        return MoEModel(lm._module, tokenizer, name=repo_id)


def _encode(model: MoEModel, prompts: Any, chat: bool) -> tuple[Tensor, Tensor]:
    """Input ids and mask on the CPU (the model's own device for a loaded model; CPU for a meta one)."""
    if isinstance(prompts, dict) or hasattr(prompts, "input_ids"):
        ids = prompts["input_ids"]
        mask = prompts.get("attention_mask")
        return ids, torch.ones_like(ids) if mask is None else mask
    if model.device.type != "meta":
        enc = model.tokenize(prompts, chat=chat)
        return enc["input_ids"], enc["attention_mask"]
    from moe_interp.guards import check_prompts

    texts = model.format_chat(prompts) if chat else check_prompts(prompts)
    templated = chat and getattr(model.tokenizer, "chat_template", None) is not None
    enc = model.tokenizer(
        texts, return_tensors="pt", padding=True, add_special_tokens=not templated, padding_side="left"
    )
    return enc["input_ids"], enc["attention_mask"]


def _trace(
    model: MoEModel, ids: Tensor, mask: Tensor, request: TraceRequest, remote: bool | str, last_only: bool
) -> tuple[dict[str, list[Tensor]], Tensor]:
    """One (remote) trace running the hook adapter; returns the hook values read and the logits."""
    import nnsight

    _register()
    nn, spec, layers = model.nnsight, model.family, model.layers
    b, p = ids.shape
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kw = {"logits_to_keep": 1} if last_only else {}
    # attention weights need eager attention: switched here for the local dry run (a served model keeps its own)
    eager = remote == "local" and any(n.endswith("attn.hook_pattern") for n in request.reads)
    with model._eager_attention(eager), torch.no_grad():  # no autograd graph kept on what comes back
        with nn.trace(input_ids=ids, attention_mask=mask, position_ids=pos, remote=remote, **kw):
            store: dict[str, list[Tensor]] = {}
            LayerTracer(nn, spec, layers, request, store, b, p, mask).run()
            result = nnsight.save((store, nn.output.logits))
    return result


def run_with_cache(
    model: MoEModel,
    prompts: Any,
    names: str | Sequence[str] | Callable[[str], bool] | None = None,
    *,
    remote: bool | str = True,
    positions: int | slice | Sequence[int] | None = None,
    chat: bool = True,
) -> tuple[Float[Tensor, "batch pos vocab"], MoECache]:
    """:meth:`MoEModel.run_with_cache` as one remote request (active interventions applied there).

    ``remote``: ``True`` (the configured NDIF host), a host URL, or ``"local"`` (nnsight's serialise /
    deserialise dry run, executed here). Everything saved is downloaded: keep ``names`` and ``positions`` small.
    ``names=None`` reads every hook but ``attn.hook_pattern`` (it needs eager attention; ask for it by name).
    """
    from moe_interp.model import MoECache

    resolved = model._resolve_names(names)
    # attention patterns need eager attention, which a served model may not run: read by name only
    if names is None:
        resolved = [n for n in resolved if not n.endswith("attn.hook_pattern")]
    if isinstance(positions, int):
        positions = [positions]
    ids, mask = _encode(model, prompts, chat)
    request = replace(model._collect_edits(), reads=set(resolved), positions=positions)
    store, logits = _trace(model, ids, mask, request, remote, last_only=False)
    return logits, MoECache({k: store[k][0] for k in resolved if k in store}, model)


def forward(
    model: MoEModel, prompts: Any, *, remote: bool | str = True, chat: bool = True, last_only: bool = False
) -> Float[Tensor, "batch pos vocab"]:
    """:meth:`MoEModel.forward` (logits under the active interventions) as one remote request."""
    ids, mask = _encode(model, prompts, chat)
    return _trace(model, ids, mask, model._collect_edits(), remote, last_only)[1]


def payload_bytes(model: MoEModel, prompts: Any, names: Sequence[str] = (), *, chat: bool = True) -> int:
    """Size of the request nnsight would send for :func:`run_with_cache` (serialised, not sent)."""
    from nnsight.schema.request import RequestModel

    from moe_interp.model import MoECache  # noqa: F401 - imported as run_with_cache would

    sizes: list[int] = []

    class _Measure:
        def __call__(self, tracer: Any) -> None:
            _register()
            sizes.append(len(RequestModel.serialize(tracer)))

    ids, mask = _encode(model, prompts, chat)
    request = replace(model._collect_edits(), reads=set(model._resolve_names(list(names) or None)))
    nn, spec, layers = model.nnsight, model.family, model.layers
    b, p = ids.shape
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with nn.trace(input_ids=ids, attention_mask=mask, position_ids=pos, backend=_Measure()):
        store: dict[str, list[Tensor]] = {}
        LayerTracer(nn, spec, layers, request, store, b, p, mask).run()
        nnsight_result = (store, nn.output.logits)  # noqa: F841 - part of the serialised body
    return sizes[0]
