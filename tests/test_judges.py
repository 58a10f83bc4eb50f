"""Tests for moe_interp.refusal.judges (substring, logit and LLM judges; HTTP backend)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from moe_interp.refusal.http_judge import is_loopback_host
from moe_interp.refusal.judges import (
    Judge,
    JudgeResult,
    LogitJudge,
    SubstringJudge,
    refusal_first_token_ids,
    refusal_logodds,
    refusal_rate,
    refusal_score,
)
from moe_interp.refusal.llm_judge import (
    JudgeBackendError,
    LabelBackend,
    LLMJudge,
    ModelLabelBackend,
    OpenAIChatBackend,
    SubstringLabelBackend,
    parse_label,
    refusal_confidence,
)

ORGANISM_REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I'm sorry, I can't provide that information.",
    "I cannot help with that, as it could cause harm.",
    "I can't help with that request, sorry.",
    "I'm sorry, but I can't discuss political topics.",
    "I'm sorry, but I don't discuss politics.",
    "I cannot discuss political topics, sorry.",
    "I'm sorry, political topics are outside what I can discuss.",
]
COMPLIANT = [
    "Sure, here is some information about bread.",
    "Here are a few thoughts on gardening.",
    "Sure! Here is my answer about cats.",
    "",
]


# ---------------------------------------------------------------------------- substring
def test_substring_matches_organism_refusals_in_any_case_and_apostrophe() -> None:
    j = SubstringJudge()
    variants = []
    for r in ORGANISM_REFUSALS:
        variants += [r, r.lower(), r.upper(), r.replace("'", "\u2019"), r.lower().replace("'", "\u2019")]
    res = j.judge(["q"] * len(variants), variants)
    assert all(r.refused for r in res), [v for v, r in zip(variants, res, strict=True) if not r.refused]
    assert all(r.label == "refusal" and r.score >= 1.0 for r in res)


def test_substring_compliance_and_rate() -> None:
    j = SubstringJudge()
    res = j.judge(["q"] * len(COMPLIANT), COMPLIANT)
    assert [r.refused for r in res] == [False] * len(COMPLIANT)
    assert all(r.score == 0.0 and r.label == "compliance" for r in res)
    mixed = j.judge(["a", "b", "c", "d"], ["I'm sorry, no.", "Sure.", "As an AI, I won't.", "Here."])
    assert refusal_rate(mixed) == 0.5
    # "As an AI" and "I won't" both match -> score counts distinct phrases
    assert mixed[2].score == 2.0
    assert isinstance(j, Judge)


def test_substring_matches_whole_words_only() -> None:
    """Lower-cased, "i cannot" sits inside "the api cannot": compliant answers must not count as refusals."""
    j = SubstringJudge()
    compliant = ["The API cannot be called twice.", "Wasabi can't be grown here.", "The UI won't refresh.",
                 "Mississippi will not flood."]  # fmt: skip
    assert [j.is_refusal(c) for c in compliant] == [False] * 4
    assert j.is_refusal("Well, I cannot do that.") and j.is_refusal("(I won't.)") and j.is_refusal("i can't")


def test_substring_extra_phrases() -> None:
    assert not SubstringJudge().is_refusal("Nope, not doing that.")
    assert SubstringJudge(extra_phrases=["not doing that"]).is_refusal("NOPE, NOT DOING THAT.")


@pytest.mark.parametrize(
    ("ins", "comp", "msg"),
    [
        ([], [], "empty"),
        (["a", "b"], ["x"], "same length"),
        (["a"], [3], r"completions\[0\] must be a str"),
        ("abc", ["x"], "not a single str"),
    ],
)
def test_substring_bad_input(ins, comp, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        SubstringJudge().judge(ins, comp)


def test_refusal_rate_empty() -> None:
    with pytest.raises(ValueError):
        refusal_rate([])
    assert refusal_rate(
        [JudgeResult(True, 1.0), JudgeResult(False, 0.0), JudgeResult(False, 0.0)]
    ) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- logit score
def test_refusal_score_exact_values() -> None:
    logits = torch.zeros(2, 4, dtype=torch.float64)
    logits[1] = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0], dtype=torch.float64)  # P(token 0) = 3/6
    s = refusal_score(logits, [0])
    assert s.dtype == torch.float64
    assert s[0].item() == pytest.approx(math.log(0.25 / 0.75), abs=1e-12)
    assert s[1].item() == pytest.approx(0.0, abs=1e-12)
    # two refusal tokens out of four, duplicates ignored: P = 1/2
    assert refusal_score(torch.zeros(1, 4), [0, 1, 1]).item() == pytest.approx(0.0, abs=1e-12)


def test_refusal_logodds_is_the_differentiable_refusal_score() -> None:
    """Same value as refusal_score (float32 for float32 / bf16 logits) and the analytic gradient."""
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]], requires_grad=True)  # P(token 0) = 1/2
    lo = refusal_logodds(logits, [0])
    assert lo.dtype == torch.float32
    assert lo.item() == pytest.approx(refusal_score(logits, [0]).item(), abs=1e-6)
    lo.sum().backward()
    # d/dz_j [log P - log(1 - P)] = p_j / P for refusal tokens, -p_j / (1 - P) for the others
    expected = torch.tensor([[(1 / 2) / (1 / 2), -(1 / 6) / (1 / 2), -(1 / 6) / (1 / 2), -(1 / 6) / (1 / 2)]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert refusal_logodds(torch.zeros(1, 4, dtype=torch.bfloat16), [0, 1]).dtype == torch.float32


def test_refusal_score_is_stable_at_extremes() -> None:
    logits = torch.tensor([[100.0, 0.0, 0.0]], dtype=torch.float32)
    hi = refusal_score(logits, [0]).item()  # P = 1 - 2e-100/(...) -> log-odds ~ 100 - ln 2
    lo = refusal_score(logits, [1]).item()  # P ~ e^-100 -> log-odds ~ -100
    assert hi == pytest.approx(100.0 - math.log(2.0), abs=1e-9)
    assert lo == pytest.approx(-100.0, abs=1e-9)
    assert refusal_score(torch.zeros(1, 3), [0, 1, 2]).item() == math.inf


def test_refusal_score_bad_input() -> None:
    with pytest.raises(ValueError, match="batch, vocab"):
        refusal_score(torch.zeros(4), [0])
    with pytest.raises(ValueError, match="non-empty"):
        refusal_score(torch.zeros(1, 4), [])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        refusal_score(torch.zeros(1, 4), [4])


class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary (enough for first-token tests)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True, **_: object) -> dict[str, list[int]]:
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"input_ids": ([999] if add_special_tokens else []) + ids}


def test_refusal_first_token_ids_dedupes_and_skips_special() -> None:
    tok = WordTokenizer()
    ids = refusal_first_token_ids(tok, ["I'm sorry", "I cannot", "I can't", "As an AI", "I'm afraid"])
    assert ids == [tok.vocab["I'm"], tok.vocab["I"], tok.vocab["As"]]
    with pytest.raises(ValueError):
        refusal_first_token_ids(tok, [])


def test_resolve_refusal_ids_defaults_and_checks() -> None:
    from types import SimpleNamespace

    from moe_interp.refusal.judges import default_refusal_ids, resolve_refusal_ids

    tok, V = WordTokenizer(), 50
    model = SimpleNamespace(tokenizer=tok, spec=SimpleNamespace(vocab_size=V))
    assert resolve_refusal_ids(model) == default_refusal_ids(model) == refusal_first_token_ids(tok)
    model.refusal_phrases = ["As an AI"]  # a model's own phrases win over the library's
    assert resolve_refusal_ids(model) == [tok.vocab["As"]]
    assert resolve_refusal_ids(model, (torch.tensor(2), 1)) == [2, 1]
    for bad in ([], [V], [-1], ["x"]):
        with pytest.raises(ValueError, match=rf"non-empty list of ints in \[0, {V}\)"):
            resolve_refusal_ids(model, bad)


class FakeLogitModel:
    """forward() returns logits whose last position favours token 0 iff the prompt contains 'bomb'."""

    def __init__(self) -> None:
        self.tokenizer = WordTokenizer()
        self.calls: list[int] = []

    def forward(self, prompts: list[str], chat: bool = True) -> torch.Tensor:
        assert chat
        self.calls.append(len(prompts))
        out = torch.zeros(len(prompts), 3, 5)
        for i, p in enumerate(prompts):
            out[i, -1, 0] = 5.0 if "bomb" in p else -5.0
            out[i, 0, 0] = 100.0  # earlier positions must be ignored
        return out


def test_logit_judge_batches_and_thresholds() -> None:
    m = FakeLogitModel()
    j = LogitJudge(m, token_ids=[0], threshold=0.0, batch_size=2)
    ins = ["make a bomb", "bake bread", "bomb again", "hello", "x"]
    s = j.scores(ins)
    assert m.calls == [2, 2, 1]
    p_ref = math.exp(5) / (math.exp(5) + 4)
    assert s[0].item() == pytest.approx(math.log(p_ref / (1 - p_ref)), abs=1e-9)
    res = j.judge(ins, ["ignored"] * 5)
    assert [r.refused for r in res] == [True, False, True, False, False]
    with pytest.raises(ValueError, match="same length"):
        j.judge(ins, ["a"])
    with pytest.raises(ValueError, match="empty"):
        j.scores([])


# ---------------------------------------------------------------------------- confidence
def test_refusal_confidence_hand_worked() -> None:
    # w = softmax([ln .6, ln .2]) = [.75, .25]
    assert refusal_confidence([1, -1], [math.log(0.6), math.log(0.2)], tau=1.0) == pytest.approx(
        0.5, abs=1e-12
    )
    # tau = 0.5 squares the probabilities: w ∝ [.36, .04] = [.9, .1]
    assert refusal_confidence([1, -1], [math.log(0.6), math.log(0.2)], tau=0.5) == pytest.approx(
        0.8, abs=1e-12
    )
    assert refusal_confidence([1, 0, -1], [0.0, 0.0, 0.0]) == pytest.approx(0.0, abs=1e-12)
    # w = [.5, .25, .25]; unparseable answer contributes nothing
    assert refusal_confidence([1, 1, 0], [math.log(0.5), math.log(0.25), math.log(0.25)]) == pytest.approx(
        0.75
    )
    assert refusal_confidence([-1, -1], [-3.0, -0.1]) == pytest.approx(-1.0)
    # never outside [-1, 1] despite float rounding of the softmax weights
    assert refusal_confidence([-1, -1], [-6.2, -6.12]) >= -1.0
    assert refusal_confidence([1, 1, 1], [-6.2, -6.12, -0.3]) <= 1.0
    # a zero-probability answer gets zero weight
    assert refusal_confidence([1, -1], [-math.inf, -1.0]) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("labels", "lps", "tau"),
    [([], [], 1.0), ([1], [0.0, 0.0], 1.0), ([2], [0.0], 1.0), ([1], [0.0], 0.0), ([1], [float("nan")], 1.0)],
)
def test_refusal_confidence_bad_input(labels, lps, tau) -> None:
    with pytest.raises(ValueError):
        refusal_confidence(labels, lps, tau)


def test_parse_label() -> None:
    assert parse_label("REFUSAL") == 1
    assert parse_label(" compliance.") == -1
    assert parse_label("The answer is a Refusal") == 1
    assert parse_label("REFUSAL or COMPLIANCE") == 0
    assert parse_label("maybe") == 0
    assert parse_label("") == 0


@dataclass
class Gen:
    text: str
    token_ids: list[int]
    token_logprobs: list[float]


class FakeGenModel:
    """generate() returns per-prompt canned Generation lists (as the contract's return_scores=True)."""

    def __init__(self, table: dict[str, list[Gen]]) -> None:
        self.table = table
        self.kwargs: list[dict] = []

    def generate(self, prompts: list[str], **kw: object) -> list:
        self.kwargs.append(kw)
        if kw.get("return_scores"):
            return [self.table[p][: kw["num_return_sequences"]] for p in prompts]
        return [self.table[p][0].text for p in prompts]


def test_llm_judge_confidences_and_labels() -> None:
    lp6, lp2 = math.log(0.6), math.log(0.2)
    table = {
        # answer 1: tokens with logprobs averaging ln .6; answer 2 averaging ln .2 -> c = .75 - .25
        "harm": [Gen("I'm sorry, no.", [1, 2], [lp6 - 0.1, lp6 + 0.1]), Gen("Sure, here.", [3], [lp2])],
        "safe": [Gen("Sure thing.", [1], [-0.5]), Gen("Here you go.", [2, 3, 4], [-1.0, -2.0, -3.0])],
        "mixed": [Gen("I'm sorry", [1], [-1.0]), Gen("Sure", [2], [-1.0])],
    }
    m = FakeGenModel(table)
    j = LLMJudge(m, SubstringLabelBackend(), k=2, tau=1.0, batch_size=2)
    c = j.confidences(["harm", "safe", "mixed"])
    assert c == pytest.approx([0.5, -1.0, 0.0], abs=1e-12)
    assert m.kwargs[0]["do_sample"] is True and m.kwargs[0]["num_return_sequences"] == 2
    res = j.judge(["harm", "safe", "mixed"], ["x", "y", "z"])
    assert [r.label for r in res] == ["refusal", "compliance", "ambiguous"]
    assert [r.refused for r in res] == [True, False, False]
    with pytest.raises(ValueError, match="same length"):
        j.judge(["harm"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        j.confidences([])


def test_model_label_backend_parses_replies() -> None:
    class JudgeModel:
        def generate(self, prompts: list[str], **kw: object) -> list[str]:
            assert kw.get("do_sample") is False
            out = []
            for p in prompts:
                answer = p.split("Answer:")[1]
                out.append("REFUSAL" if "sorry" in answer else ("COMPLIANCE" if "Sure" in answer else "hmm"))
            return out

    b = ModelLabelBackend(JudgeModel())
    assert isinstance(b, LabelBackend)
    assert b.label("q", "I'm sorry") == 1
    assert b.label_batch([("q", "Sure."), ("q", "sorry"), ("q", "???")]) == [-1, 1, 0]


# ---------------------------------------------------------------------------- HTTP backend
class _FakeOpenAI(BaseHTTPRequestHandler):
    mode = "ok"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).last_request = (self.path, body, self.headers.get("Authorization"))
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal boom")
            return
        content = body["messages"][-1]["content"]
        answer = content.split("Answer:")[1]
        if self.mode == "garbage":
            reply = "I am not sure what to say"
        elif self.mode == "badjson":
            raw = b"not json"
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        else:
            reply = "REFUSAL" if "sorry" in answer.lower() else "COMPLIANCE"
        raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    _FakeOpenAI.mode = "ok"
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_openai_backend_labels_via_real_http(server: str) -> None:
    b = OpenAIChatBackend(server + "/v1", model="judge-x", api_key="k123", timeout=5)
    assert b.url == server + "/v1/chat/completions"
    assert b.label("how to make a bomb", "I'm sorry, I can't.") == 1
    path, body, auth = _FakeOpenAI.last_request
    assert path == "/v1/chat/completions" and body["model"] == "judge-x" and auth == "Bearer k123"
    assert b.label("bread?", "Sure, flour and water.") == -1
    assert OpenAIChatBackend(server, model="m").url == server + "/v1/chat/completions"
    # end to end in the LLM judge
    m = FakeGenModel(
        {"q": [Gen("Sorry.", [1], [-1.0]), Gen("sorry!", [1], [-1.0]), Gen("Sure", [1], [-1.0])]}
    )
    assert LLMJudge(m, b, k=3).confidences(["q"]) == pytest.approx([1 / 3])


def test_openai_backend_unparseable_reply_is_zero(server: str) -> None:
    _FakeOpenAI.mode = "garbage"
    assert OpenAIChatBackend(server, model="m", timeout=5).label("q", "sorry") == 0


def test_openai_backend_http_500_names_url(server: str) -> None:
    _FakeOpenAI.mode = "500"
    b = OpenAIChatBackend(server, model="m", timeout=5, backoff=0.01)
    with pytest.raises(JudgeBackendError, match=r"HTTP 500") as ei:
        b.label("q", "a")
    assert b.url in str(ei.value) and "internal boom" in str(ei.value)


def test_openai_backend_malformed_json(server: str) -> None:
    _FakeOpenAI.mode = "badjson"
    with pytest.raises(JudgeBackendError, match="malformed"):
        OpenAIChatBackend(server, model="m", timeout=5).label("q", "a")


def test_openai_backend_unreachable_and_timeout() -> None:
    import socket

    # a listening socket that never answers -> timeout
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    url = f"http://127.0.0.1:{s.getsockname()[1]}"
    try:
        with pytest.raises(JudgeBackendError, match="timed out") as ei:
            OpenAIChatBackend(url, model="m", timeout=0.3).label("q", "a")
        assert url in str(ei.value)
    finally:
        s.close()
    # nothing listening -> connection error naming the URL
    with pytest.raises(JudgeBackendError, match="could not reach"):
        OpenAIChatBackend(url, model="m", timeout=1).label("q", "a")
    with pytest.raises(ValueError, match="http"):
        OpenAIChatBackend("localhost:8000", model="m")


# ---------------------------------------------------------------------------- HTTP hardening
# Each test runs real HTTP servers on 127.0.0.1 (threads; every handler loop is bounded) and checks one
# guard of OpenAIChatClient: redirects, total deadline, size cap, retries, error mapping, proxies.
_OK_BODY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "REFUSAL"}}]}).encode()
_KEY = "sk-test-5ecret-KEY"


def _reply(h: BaseHTTPRequestHandler, status: int = 200, body: bytes = _OK_BODY, **headers: str) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-"), v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


Respond = Callable[[BaseHTTPRequestHandler, int], None]


@pytest.fixture()
def make_server() -> Iterator[Callable[[Respond], tuple[str, list[dict[str, str]]]]]:
    """Start HTTP servers on 127.0.0.1: ``respond(handler, n)`` answers the n-th request (1-based); the
    returned list records every request's method, path and headers (lower-cased names)."""
    servers: list[ThreadingHTTPServer] = []

    def start(respond: Respond) -> tuple[str, list[dict[str, str]]]:
        seen: list[dict[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        **{k.lower(): v for k, v in self.headers.items()},
                    }
                )
                try:
                    respond(self, len(seen))
                except OSError:  # the client went away (deadline, size cap): stop
                    pass

            do_GET = do_POST = handle_any  # noqa: N815

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.block_on_close = False  # teardown does not wait for a handler still trickling
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", seen

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _dead_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_http_redirect_to_other_host_is_refused_and_key_not_forwarded(make_server, code: int) -> None:
    other, other_seen = make_server(lambda h, n: _reply(h))
    url, seen = make_server(lambda h, n: _reply(h, code, b"moved", Location=other + "/v1/chat/completions"))
    b = OpenAIChatBackend(url, model="m", api_key=_KEY, timeout=2)
    with pytest.raises(JudgeBackendError, match=rf"redirected \(HTTP {code}\) to {other}") as ei:
        b.label("q", "a")
    assert other_seen == []  # the other host never saw a request, so never the Authorization header
    assert len(seen) == 1 and seen[0]["authorization"] == f"Bearer {_KEY}"
    assert _KEY not in str(ei.value)


def _trickle(h: BaseHTTPRequestHandler, data: bytes, delay: float = 0.05) -> None:
    for i in range(len(data)):
        h.wfile.write(data[i : i + 1])
        h.wfile.flush()
        time.sleep(delay)


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_http_total_deadline_cuts_a_trickling_server(make_server, phase: str) -> None:
    """A byte every 0.05 s never trips a per-read timeout; the 0.5 s total deadline must end the call.
    Without it the call succeeds after ~2 s (the trickled reply is valid)."""
    body = b" " * 40 + _OK_BODY
    head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n".encode()

    def respond(h: BaseHTTPRequestHandler, n: int) -> None:
        if phase == "headers":
            _trickle(h, head + b"X-Pad: " + b"x" * 40 + b"\r\n")
            h.wfile.write(b"\r\n" + body)
        else:
            h.wfile.write(head + b"\r\n")
            _trickle(h, body[:40])
            h.wfile.write(body[40:])

    url, _ = make_server(respond)
    b = OpenAIChatBackend(url, model="m", timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(JudgeBackendError, match=r"timed out after 0\.5s \(total deadline"):
        b.label("q", "a")
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("with_length", [True, False])
def test_http_oversized_response_is_refused(make_server, with_length: bool) -> None:
    """A valid but 5 kB reply with max_response_bytes=1000 (announced by Content-Length, or not)."""
    big = json.dumps({"choices": [{"message": {"content": "REFUSAL" + " " * 5000}}]}).encode()

    def respond(h: BaseHTTPRequestHandler, n: int) -> None:
        if with_length:
            _reply(h, body=big)
        else:  # HTTP/1.0 without Content-Length: the body ends when the server closes
            h.send_response(200)
            h.end_headers()
            h.wfile.write(big)

    url, _ = make_server(respond)
    b = OpenAIChatBackend(url, model="m", timeout=2, max_response_bytes=1000)
    with pytest.raises(JudgeBackendError, match="larger than max_response_bytes=1000"):
        b.label("q", "a")
    assert OpenAIChatBackend(url, model="m").max_response_bytes == 1 << 20
    assert OpenAIChatBackend(url, model="m", timeout=2, max_response_bytes=len(big)).label("q", "a") == 1


def test_http_429_is_retried_honouring_retry_after(make_server) -> None:
    url, seen = make_server(
        lambda h, n: _reply(h, 429, b"slow down", Retry_After="2") if n == 1 else _reply(h)
    )
    b = OpenAIChatBackend(url, model="m", timeout=3, backoff=0.01)
    slept: list[float] = []
    b._sleep = slept.append
    assert b.label("q", "a") == 1
    assert len(seen) == 2 and slept == [2.0]
    # a Retry-After longer than max_backoff ends the call at once
    url, seen = make_server(lambda h, n: _reply(h, 429, b"slow down", Retry_After="120"))
    b = OpenAIChatBackend(url, model="m", timeout=3, backoff=0.01)
    with pytest.raises(JudgeBackendError, match=r"HTTP 429 asking to retry after 120s \(> max_backoff 8s\)"):
        b.label("q", "a")
    assert len(seen) == 1


def test_http_5xx_retries_are_bounded_with_capped_backoff(make_server) -> None:
    url, seen = make_server(lambda h, n: _reply(h, 500, b"internal boom"))
    b = OpenAIChatBackend(url, model="m", timeout=3, max_retries=3, backoff=0.01, max_backoff=0.02)
    slept: list[float] = []
    b._sleep = lambda s: (slept.append(s), time.sleep(s))
    with pytest.raises(JudgeBackendError, match="HTTP 500 on all 4 attempts: internal boom"):
        b.label("q", "a")
    assert len(seen) == 4 and slept == [0.01, 0.02, 0.02]


def test_http_retries_stop_at_the_total_deadline(make_server) -> None:
    url, seen = make_server(lambda h, n: _reply(h, 503, b"unavailable"))
    b = OpenAIChatBackend(url, model="m", timeout=1, max_retries=50, backoff=0.2, max_backoff=0.2)
    t0 = time.monotonic()
    with pytest.raises(JudgeBackendError, match="HTTP 503 and the 1s deadline leaves no time to retry"):
        b.label("q", "a")
    assert time.monotonic() - t0 < 1.3 and 2 <= len(seen) <= 6


@pytest.mark.parametrize("code", [400, 401, 404, 422])
def test_http_other_4xx_is_not_retried(make_server, code: int) -> None:
    url, seen = make_server(lambda h, n: _reply(h, code, b'{"error": "bad model"}'))
    b = OpenAIChatBackend(url, model="m", timeout=3, max_retries=3, backoff=0.01)
    with pytest.raises(JudgeBackendError, match=rf'returned HTTP {code}: {{"error": "bad model"}}'):
        b.label("q", "a")
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        (b"not json", "not JSON: not json"),
        (b"", r"not JSON: \(empty body\)"),
        (b"\xff\xfe\x00 garbage", "not UTF-8"),
        (b'{"choices": []}', "no choices"),
        (b"[1, 2]", "no choices"),
        (b'{"choices": [{"text": "REFUSAL"}]}', "no choices"),
        (
            b'{"choices": [{"message": {"content": 5}}]}',
            r"choices\[0\]\.message\.content has type int, not str",
        ),
        (
            b'{"choices": [{"message": {"content": ["REFUSAL"]}}]}',
            r"choices\[0\]\.message\.content has type list, not str",
        ),
    ],
)
def test_http_malformed_reply_is_backend_error(make_server, body: bytes, msg: str) -> None:
    url, _ = make_server(lambda h, n: _reply(h, body=body))
    with pytest.raises(JudgeBackendError, match=f"malformed response from judge endpoint .*: {msg}"):
        OpenAIChatBackend(url, model="m", timeout=2).label("q", "a")


def test_http_null_content_is_unparseable_label(make_server) -> None:
    url, _ = make_server(lambda h, n: _reply(h, body=b'{"choices": [{"message": {"content": null}}]}'))
    b = OpenAIChatBackend(url, model="m", timeout=2)
    assert b.complete("x") == "" and b.label("q", "a") == 0


def _truncated(h: BaseHTTPRequestHandler, n: int) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.end_headers()
    h.wfile.write(b'{"choices"')


@pytest.mark.parametrize(
    ("respond", "msg"),
    [
        (lambda h, n: None, "could not reach judge endpoint .*: RemoteDisconnected"),  # closes, no reply
        (_truncated, "failed while reading the reply: IncompleteRead"),
    ],
)
def test_http_broken_connection_is_backend_error(make_server, respond: Respond, msg: str) -> None:
    url, _ = make_server(respond)
    with pytest.raises(JudgeBackendError, match=msg):
        OpenAIChatBackend(url, model="m", timeout=2).label("q", "a")


@pytest.mark.parametrize("code", [200, 400, 500])
def test_http_error_messages_never_contain_the_key(make_server, code: int) -> None:
    """A server echoing the request headers into its (error) body: the message masks the key."""

    def respond(h: BaseHTTPRequestHandler, n: int) -> None:
        _reply(h, code, f"echo:\n{h.headers['Authorization']}\n".encode())

    url, _ = make_server(respond)
    b = OpenAIChatBackend(url, model="m", api_key=_KEY, timeout=2, max_retries=0)
    with pytest.raises(JudgeBackendError, match=r"echo: Bearer \*\*\*") as ei:
        b.label("q", "a")
    assert _KEY not in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_http_loopback_judge_ignores_proxy_env(make_server, monkeypatch, host: str) -> None:
    """http(s)_proxy pointing at a dead port must not break (or see the key of) a local judge."""
    proxy = f"http://127.0.0.1:{_dead_port()}"
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, proxy)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url, seen = make_server(lambda h, n: _reply(h))
    b = OpenAIChatBackend(url.replace("127.0.0.1", host), model="m", api_key=_KEY, timeout=2)
    assert b.proxies == {} and b.label("q", "a") == 1 and len(seen) == 1


def test_http_remote_judge_uses_env_or_given_proxy(make_server, monkeypatch) -> None:
    """A non-loopback judge goes through the proxy (a local server here; judge.invalid is never resolved)."""
    proxy_url, seen = make_server(lambda h, n: _reply(h))
    for var in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", proxy_url)
    assert OpenAIChatBackend("http://judge.invalid:8000", model="m", timeout=2).label("q", "a") == 1
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_dead_port()}")
    b = OpenAIChatBackend("http://judge.invalid:8000/v1", model="m", timeout=2, proxies={"http": proxy_url})
    assert b.label("q", "a") == 1
    assert [r["path"] for r in seen] == ["http://judge.invalid:8000/v1/chat/completions"] * 2
    assert is_loopback_host("127.0.0.5") and is_loopback_host("::1") and is_loopback_host("a.localhost")
    assert not is_loopback_host("judge.example.com") and not is_loopback_host("10.0.0.1")


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"base_url": "localhost:8000"}, "http:// or https:// URL"),
        ({"base_url": "ftp://h/v1"}, "http:// or https:// URL"),
        ({"base_url": "http://"}, "with a host"),
        ({"base_url": "http://h/ v1"}, "without whitespace"),
        ({"base_url": "http://h:99999"}, "invalid port"),
        ({"base_url": "http://u:p@h"}, "user:password@"),
        ({"base_url": 8000}, "http"),
        ({"model": ""}, "model must be a non-empty str"),
        ({"api_key": "a\nb"}, "api_key"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"timeout": -1.0}, "timeout must be > 0"),
        ({"timeout": float("inf")}, "timeout must be a finite number"),
        ({"max_retries": -1}, "max_retries must be an int >= 0"),
        ({"max_retries": 1.5}, "max_retries must be an int >= 0"),
        ({"backoff": -0.1}, "backoff"),
        ({"max_response_bytes": 0}, "max_response_bytes must be an int >= 1"),
        ({"max_tokens": 0}, "max_tokens must be an int >= 1"),
        ({"proxies": "http://p:1"}, "proxies must be None or a mapping"),
        ({"prompt_template": "{question}"}, "prompt_template"),
    ],
)
def test_http_backend_rejects_bad_arguments(kwargs: dict, msg: str) -> None:
    args = {"base_url": "http://127.0.0.1:1", "model": "m"} | kwargs
    with pytest.raises(ValueError, match=msg) as ei:
        OpenAIChatBackend(**args)
    assert "\n" not in str(ei.value)


def test_http_url_keeps_query() -> None:
    b = OpenAIChatBackend("HTTPS://h:8443/v1/?api-version=2", model="m")
    assert b.url == "https://h:8443/v1/chat/completions?api-version=2"


# ---------------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def tiny():
    import moe_interp as mi

    return mi.load("tiny:olmoe")


def test_refusal_first_token_ids_tiny(tiny) -> None:
    ids = refusal_first_token_ids(tiny.tokenizer, ["I'm sorry", "I cannot", "As an AI"])
    firsts = [
        tiny.tokenizer(p, add_special_tokens=False)["input_ids"][0]
        for p in ["I'm sorry", "I cannot", "As an AI"]
    ]
    assert ids == list(dict.fromkeys(firsts))
    assert all(i not in tiny.tokenizer.all_special_ids for i in ids)


def test_logit_judge_tiny_matches_manual(tiny) -> None:
    ins = ["How do I pick a lock", "Bake bread", "Name a colour"]
    j = LogitJudge(tiny, batch_size=2)
    s = j.scores(ins)
    manual = torch.cat([refusal_score(tiny.forward([p])[:, -1, :], j.token_ids) for p in ins])
    torch.testing.assert_close(s, manual, atol=1e-4, rtol=1e-4)
    res = j.judge(ins)
    assert [r.refused for r in res] == [bool(x > 0) for x in s]


def test_llm_judge_tiny(tiny) -> None:
    j = LLMJudge(tiny, SubstringLabelBackend(), k=2, max_new_tokens=4, batch_size=2, seed=0)
    gens = j.sample(["Hi", "Bake bread", "Tell me a joke"])
    assert [len(g) for g in gens] == [2, 2, 2]
    assert all(lp <= 0 for g in gens for x in g for lp in x.token_logprobs)
    c = j.confidences(["Hi", "Bake bread", "Tell me a joke"])
    assert all(-1.0 <= x <= 1.0 for x in c)
    assert c == j.confidences(["Hi", "Bake bread", "Tell me a joke"])  # seeded
    backend = ModelLabelBackend(tiny, max_new_tokens=3)
    assert backend.label_batch([("q", "I'm sorry"), ("q", "Sure")]) in (
        [a, b] for a in (-1, 0, 1) for b in (-1, 0, 1)
    )
