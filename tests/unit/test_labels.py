"""Offline labels from tokens, and the optional LLM labeller against a local OpenAI-compatible stub server."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from metasae.labels import LabelError, LlmLabeller, build_prompt
from metasae.stats import label_latent, label_meta, token_idf


class _Stub(BaseHTTPRequestHandler):
    requests: list[dict] = []
    reply: tuple[int, str] = (200, "")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        code, text = _Stub.reply
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *_a) -> None:
        pass


@pytest.fixture
def stub():
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    _Stub.requests.clear()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def _completion(text: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


EXAMPLES = [{"tokens": ["Albert", " Einstein", " was"], "position": 1}]


def test_llm_label_round_trip(stub: str) -> None:
    _Stub.reply = (200, _completion('  "Famous physicists"\n'))
    lab = LlmLabeller(stub, model="stub-model", api_key="k123")
    assert lab.label([" Einstein", " Bohr"], [" relativity"], EXAMPLES) == "Famous physicists"
    req = _Stub.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer k123"
    assert req["body"]["model"] == "stub-model"
    prompt = req["body"]["messages"][0]["content"]
    assert "' Einstein'" in prompt and "' relativity'" in prompt and "Albert[[ Einstein]] was" in prompt


def test_llm_label_many_keeps_order(stub: str) -> None:
    _Stub.reply = (200, _completion("same"))
    lab = LlmLabeller(stub, max_workers=3)
    assert lab.label_many([([str(i)], [], []) for i in range(7)]) == ["same"] * 7
    assert len(_Stub.requests) == 7


@pytest.mark.parametrize("reply", [(500, "boom"), (200, "not json"), (200, json.dumps({"choices": []})),
                                   (200, _completion("   "))])
def test_llm_label_errors_are_clear(stub: str, reply) -> None:
    _Stub.reply = reply
    with pytest.raises(LabelError, match="label endpoint"):
        LlmLabeller(stub).label(["a"], ["b"], [])


def test_unreachable_endpoint() -> None:
    with pytest.raises(LabelError, match="unreachable"):
        LlmLabeller("http://127.0.0.1:9/v1", timeout=2).label(["a"], [], [])


def test_offline_labels() -> None:
    assert label_latent([" Einstein", "Einstein", " Bohr", " Planck", " x"], [" relativity"]) == \
        "Einstein / Bohr / Planck [→relativity]"
    assert label_latent([" the"], [" the"]) == "the"
    assert label_latent([], [" x"]) == "(dead)"
    assert label_meta([[" Paris", " France"], [" France", " Lyon"]], [1.0, 0.6]).startswith("france / paris")


def test_prompt_marks_max_token() -> None:
    p = build_prompt(["a"], ["b"], [{"tokens": ["x", "y", "z"], "position": 2}])
    assert "xy[[z]]" in p


def test_meta_label_with_idf_prefers_shared_rare_tokens_over_common_ones():
    # "the" tops every latent; "paris"/"france" only these members
    everyone = [[" the", f" w{i}"] for i in range(50)] + [[" the", " Paris"], [" the", " France"]]
    idf = token_idf(everyone)
    assert idf["the"] == pytest.approx(math.log(52 / 53)) and idf["paris"] == pytest.approx(math.log(52 / 2))
    members = [[" the", " Paris"], [" the", " France"]]
    assert label_meta(members, [1.0, 0.9]).startswith("the")  # without idf the common token wins
    assert label_meta(members, [1.0, 0.9], idf=idf) == "paris / france"
