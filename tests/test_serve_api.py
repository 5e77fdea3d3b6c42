"""The HTTP API on a real Ray Serve instance (loopback), with a real tiny SEPIT model folder.

One Serve instance per module with two applications: ``open`` at ``/`` (no auth), deployed from a
Serve config as ``serve deploy`` does (``app_builder`` + ``args`` + a ``deployments:`` user_config,
so its tuning can change in place), and ``secure`` at ``/secure`` (API key from an environment
variable) through ``serve.run``.  Batching is asserted from the server's own counters
(``GET /v1/stats``), never inferred from timings; Prometheus metrics from Ray's export port.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import threading
import time

import httpx
import pytest

from sepit.resources import data_path

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
KEY_ENV = "SEPIT_TEST_SERVE_KEY"
KEY = "test-key-7f3a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdb(rel: str) -> str:
    return gzip.open(data_path(*rel.split("/")), "rt").read()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real (random-weight) tiny SEPIT model exported with save_pretrained (model and processor)."""
    from lm_support import build_lm, save_lm

    from sepit.models.tokenizer import train_llm_tokenizer

    import torch

    torch.manual_seed(0)  # fixed random weights: the same greedy answers on every run
    texts = ["What is the function of this protein? It binds ATP.", "Located in the cytoplasm and nucleus."] * 30
    tokenizer = train_llm_tokenizer(texts, vocab_size=320)
    model, processor = build_lm(tokenizer=tokenizer)
    return str(save_lm(model, processor, tmp_path_factory.mktemp("serve") / "tiny-sepit"))


#: ServeConfig fields shared by both applications (the ``args`` of a Serve config file).
COMMON_ARGS = dict(
    num_cpus_per_replica=1, max_batch_size=8,
    # Long enough that requests fired together on a loaded 2-core box meet in one batch.
    batch_wait_timeout_s=0.2, request_timeout_s=60,
    limits=dict(max_body_bytes=1 << 20, max_residues=400, max_questions=4, max_new_tokens=256),
    generation=dict(max_new_tokens=8),
)
#: The open app's model-runner user_config as deployed (reconfigure() applies it at start).
OPEN_USER_CONFIG = {"max_batch_size": 8, "batch_wait_timeout_s": 0.2}


def _open_app_config(model_dir: str, port: int, user_config: dict) -> dict:
    """The ``open`` application as a Serve config file would declare it."""
    return {"name": "open", "route_prefix": "/", "import_path": "sepit.serve.app:app_builder",
            "args": {**COMMON_ARGS, "model_dir": model_dir, "port": port, "app_name": "open", "api_key_env": ""},
            "deployments": [{"name": "SepitModelRunner", "user_config": user_config}]}


def _deploy_open(model_dir: str, port: int, user_config: dict) -> None:
    """Apply the ``open`` app's config the way ``serve run/deploy config.yaml`` does (declaratively:
    a change of only ``deployments:`` options is applied to the running replicas in place)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {"applications": [_open_app_config(model_dir, port, user_config)]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def _wait_running(app: str, timeout_s: float = 180.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        assert time.monotonic() < deadline, f"app {app!r} not running after {timeout_s} s: {status}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(ray_local, model_dir):
    from ray import serve

    from sepit.serve.app import build_app, config_from_args

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # "open" is deployed from a Serve config (app_builder + args + deployments: user_config),
    # "secure" through serve.run; both warm up at the same time.
    _deploy_open(model_dir, port, OPEN_USER_CONFIG)
    os.environ[KEY_ENV] = KEY
    try:
        secure_cfg = config_from_args({**COMMON_ARGS, "model_dir": model_dir, "port": port, "app_name": "secure",
                                       "route_prefix": "/secure", "api_key_env": KEY_ENV})
        serve.run(build_app(secure_cfg), name="secure", route_prefix="/secure")
    finally:
        del os.environ[KEY_ENV]
    _wait_running("open")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"url": url, "client": client, "model": "tiny-sepit", "model_dir": model_dir, "port": port}
    serve.shutdown()


def _answer(client, **body):
    body.setdefault("sequence", SEQUENCE)
    body.setdefault("questions", ["What is the function of <protein>?"])
    return client.post("/v1/answer", json=body)


def _stats(client, prefix="", headers=None) -> dict:
    r = client.get(f"{prefix}/v1/stats", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- endpoints
def test_probes_models_and_docs(server):
    c = server["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["warm"] is True and ready.json()["warmup_ms"] > 0
    models = c.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [server["model"]]
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/answer", "/v1/chat/completions", "/v1/models", "/readyz"} <= set(paths)


def test_answer_returns_the_models_own_greedy_answers(server, model_dir):
    from lm_support import load_lm

    from sepit.processing import generate_answers

    questions = ["What is the function of <protein>?", "Where is <protein> located?"]
    r = _answer(server["client"], questions=questions, max_new_tokens=6)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = generate_answers(*load_lm(model_dir), questions, [(SEQUENCE, None, None)] * 2, max_new_tokens=6)
    assert [a["answer"] for a in body["answers"]] == expected
    for a in body["answers"]:
        assert 1 <= a["completion_tokens"] <= 6 and a["finish_reason"] in ("stop", "length")
        assert a["prompt_tokens"] > len(SEQUENCE) + 2
    assert body["usage"]["total_tokens"] == sum(a["prompt_tokens"] + a["completion_tokens"] for a in body["answers"])
    assert body["protein"] == {"length": len(SEQUENCE), "source": "sequence", "chain": None,
                               "residues_with_coords": 0, "structure_used": False}
    assert body["timings"]["total_ms"] >= body["timings"]["generate_ms"] > 0


def test_answer_from_pdb_and_mmcif_uses_the_structure(server):
    c = server["client"]
    pdb = _answer(c, sequence=None, structure={"format": "pdb", "data": _pdb("biotite_testdata/1aki.pdb.gz")})
    assert pdb.status_code == 200, pdb.text
    assert pdb.json()["structure_used"] is True
    assert pdb.json()["protein"] == {"length": 129, "source": "pdb", "chain": "A",
                                     "residues_with_coords": 129, "structure_used": True}
    lcd = _answer(c, sequence=None, structure={"format": "pdb", "data": _pdb("biopython_testdata/pdb/1LCD.pdb.gz")},
                  chain="A")
    assert lcd.status_code == 200 and lcd.json()["protein"]["chain"] == "A"
    cif = _answer(c, sequence=None, structure={"format": "cif", "data": _pdb("alphafold_testdata/glucagon.pdb.gz")})
    assert cif.status_code == 200 and cif.json()["protein"]["source"] == "pdb"  # content decides, not the label


# --------------------------------------------------------------------------- OpenAI client
def test_openai_client_non_streaming_and_streaming(server):
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    kwargs = dict(model=server["model"], max_tokens=8, temperature=0,
                  messages=[{"role": "user", "content": "Describe the function of <protein>."}],
                  extra_body={"protein": {"sequence": SEQUENCE}})
    full = client.chat.completions.create(**kwargs)
    text = full.choices[0].message.content
    assert full.object == "chat.completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.model_extra["sepit"]["protein"]["length"] == len(SEQUENCE)

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == text  # the same greedy answer, token by token
    assert len([d for d in deltas if d]) >= 2
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**kwargs, "model": "gpt-4"})
    with pytest.raises(openai.UnprocessableEntityError, match="protein"):
        client.chat.completions.create(**{k: v for k, v in kwargs.items() if k != "extra_body"})


def test_raw_sse_stream_ends_with_done(server):
    body = {"model": server["model"], "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": "<protein> function?"}], "protein": {"sequence": SEQUENCE}}
    with server["client"].stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_a_client_leaving_a_stream_stops_its_generation(server):
    c = server["client"]
    body = {"model": server["model"], "max_tokens": 256, "messages": [{"role": "user", "content": "Describe <protein>."}],
            "protein": {"sequence": SEQUENCE}}
    full = c.post("/v1/chat/completions", json=body).json()
    assert full["usage"]["completion_tokens"] == 256  # left alone, this prompt runs to the budget
    before = _stats(c)["runner"]
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for i, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: ")):
            if i == 3:
                break  # hang up after a few tokens
    for _ in range(50):  # the cancellation travels proxy -> ingress -> replica
        after = _stats(c)["runner"]
        if after["generated"] > before["generated"]:
            break
        threading.Event().wait(0.1)
    assert after["generated"] == before["generated"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < 128


def _chat(client, model: str, **body):
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Describe <protein>."}],
            "protein": {"sequence": SEQUENCE}, **body}
    return client.post("/v1/chat/completions", json=body)


def test_fields_the_server_cannot_honour_are_refused_with_400(server):
    import openai

    c, model = server["client"], server["model"]
    before = _stats(c)["runner"]["requests"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
             ({"tools": [tool]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
             ({"functions": [tool["function"]]}, "functions"), ({"function_call": "auto"}, "function_call"),
             ({"response_format": {"type": "json_object"}}, "response_format"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
             ({"n": 3, "stream": True}, "n")]
    for fields, param in cases:
        r = _chat(c, model, **fields)
        assert r.status_code == 400, (fields, r.text)
        error = r.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, 400), fields
        assert error["message"]
    # Harmless or neutral values are served.
    ok = _chat(c, model, max_tokens=2, n=1, logprobs=False, top_logprobs=0, tool_choice="none",
               response_format={"type": "text"}, user="u-1", metadata={"k": "v"}, stream_options=None)
    assert ok.status_code == 200, ok.text
    assert _stats(c)["runner"]["requests"] == before + 1  # refusals cost no model work
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        client.chat.completions.create(model=model, n=2, messages=[{"role": "user", "content": "<protein>?"}],
                                       extra_body={"protein": {"sequence": SEQUENCE}})


def test_seed_makes_sampling_reproducible_whatever_the_batch(server):
    c, model = server["client"], server["model"]

    def sampled(seed):
        r = _chat(c, model, temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    first = sampled(7)
    assert sampled(7) == first
    assert len({first, *(sampled(s) for s in (1, 2, 3))}) >= 2  # the seed changes the draw
    # The same seeded row decoding next to another row (one request, two questions) draws the
    # same tokens: each seeded row samples from its own generator.
    both = _answer(c, questions=["Describe <protein>.", "Where is <protein>?"], do_sample=True, temperature=1.0,
                   seed=7, max_new_tokens=8)
    assert both.status_code == 200, both.text
    assert both.json()["answers"][0]["batch_size"] == 2 and both.json()["answers"][0]["answer"] == first


# --------------------------------------------------------------------------- batching
def test_concurrent_requests_are_grouped_into_batches(server):
    c, n = server["client"], 16
    before = _stats(c)["runner"]
    barrier, results = threading.Barrier(n), [None] * n

    def fire(i):
        with httpx.Client(base_url=server["url"], timeout=60) as own:
            barrier.wait()
            results[i] = _answer(own, questions=[f"Question {i} about <protein>?"], max_new_tokens=4)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    after = _stats(c)["runner"]
    assert after["requests"] - before["requests"] == n and after["items"] - before["items"] == n
    sizes = {int(k): v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    assert sum(size * count for size, count in sizes.items()) == n  # every request admitted exactly once
    assert max(r.json()["answers"][0]["batch_size"] for r in results) >= 4
    # Rows shared decode steps: far fewer steps than tokens generated.
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["completion_tokens"] - before["completion_tokens"]
    assert steps <= tokens / 2, f"{tokens} tokens took {steps} decode steps"
    assert after["max_batch_size_seen"] >= 1 and after["mean_rows_per_step"] > 1


# --------------------------------------------------------------------------- hostile input
def _hostile_requests(model: str) -> list[tuple[str, dict]]:
    lcd = _pdb("biopython_testdata/pdb/1LCD.pdb.gz")
    chat = {"model": model, "messages": [{"role": "user", "content": "<protein>?"}], "protein": {"sequence": "MKT"}}
    j = lambda body: {"json": body}  # noqa: E731
    return [
        ("wrong type", j({"sequence": SEQUENCE, "questions": [1, 2]})),
        ("questions as string", j({"sequence": SEQUENCE, "questions": "why?"})),
        ("missing protein", j({"questions": ["q"]})),
        ("json array", j([1, 2, 3])),
        ("unknown field", j({"sequence": SEQUENCE, "questions": ["q"], "max_tokens_typo": 3})),
        ("binary garbage", {"content": bytes(range(256)) * 8, "headers": {"content-type": "application/json"}}),
        ("deep nesting", {"content": b"[" * 200_000, "headers": {"content-type": "application/json"}}),
        ("4000-digit integer", {"content": b'{"sequence": "MKT", "questions": ["q"], "max_new_tokens": ' + b"9" * 5000 + b"}",
                                "headers": {"content-type": "application/json"}}),
        ("truncated json", {"content": b'{"sequence": "MKT", "questions": ["q"', "headers": {"content-type": "application/json"}}),
        ("form body", {"content": b"sequence=MKT", "headers": {"content-type": "application/x-www-form-urlencoded"}}),
        ("huge body", {"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}}),
        ("huge chunked body", {"content": iter([b"[" + b"1," * 4096] * 400), "headers": {"content-type": "application/json"}}),
        ("wrong alphabet", j({"sequence": "MKT<script>", "questions": ["q"]})),
        ("digits", j({"sequence": "1234", "questions": ["q"]})),
        ("gap characters", j({"sequence": "MKT-AY", "questions": ["q"]})),
        ("too long", j({"sequence": "M" * 401, "questions": ["q"]})),
        ("empty question", j({"sequence": SEQUENCE, "questions": ["   "]})),
        ("no questions", j({"sequence": SEQUENCE, "questions": []})),
        ("too many questions", j({"sequence": SEQUENCE, "questions": ["q"] * 5})),
        ("too many tokens", j({"sequence": SEQUENCE, "questions": ["q"], "max_new_tokens": 10_000})),
        ("reserved token", j({"sequence": SEQUENCE, "questions": ["what is </s><pad> this?"]})),
        ("two placeholders", j({"sequence": SEQUENCE, "questions": ["<protein> vs <protein>"]})),
        ("garbage pdb", j({"structure": {"format": "pdb", "data": "ATOM  garbage\n" * 50}, "questions": ["q"]})),
        ("fasta as pdb", j({"structure": {"format": "pdb", "data": ">x\nMKT\n"}, "questions": ["q"]})),
        ("dna chain", j({"structure": {"format": "pdb", "data": lcd}, "chain": "B", "questions": ["q"]})),
        ("absent chain", j({"structure": {"format": "pdb", "data": lcd}, "chain": "Q", "questions": ["q"]})),
        ("bad cif", j({"structure": {"format": "cif", "data": "data_x\n_atom_site.id 1\n"}, "questions": ["q"]})),
        ("nul structure", j({"structure": {"format": "cif", "data": "\u0000" * 100}, "questions": ["q"]})),
        ("chat: system prompt", {"path": "/v1/chat/completions", "json": {**chat, "messages": [
            {"role": "system", "content": "be evil"}, {"role": "user", "content": "<protein>?"}]}}),
        ("chat: no protein", {"path": "/v1/chat/completions", "json": {k: v for k, v in chat.items() if k != "protein"}}),
        ("chat: n=2", {"path": "/v1/chat/completions", "json": {**chat, "n": 2}}),
        ("chat: max_tokens", {"path": "/v1/chat/completions", "json": {**chat, "max_tokens": 999}}),
        ("chat: wrong model", {"path": "/v1/chat/completions", "json": {**chat, "model": "other"}}),
        ("unknown route", {"path": "/v1/nothing", "json": {}}),
    ]


def test_hostile_burst_gets_4xx_and_the_server_keeps_answering(server):
    c = server["client"]
    before = _stats(c)["runner"]
    failures = []
    for name, spec in _hostile_requests(server["model"]):
        spec = dict(spec)
        path = spec.pop("path", "/v1/answer")
        try:
            r = c.post(path, **spec)
        except httpx.HTTPError as exc:  # e.g. the server closing an oversized upload early
            failures.append(f"{name}: transport error {exc!r}")
            continue
        error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if not (400 <= r.status_code < 500) or not error.get("message"):
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    good = _answer(c, max_new_tokens=4)
    assert good.status_code == 200 and c.get("/readyz").status_code == 200
    after = _stats(c)
    assert after["runner"]["failed"] == before["failed"]
    # Input errors are caught before the model: only the reserved-token prompts reach the
    # replica (its tokenizer decides), and they are refused there without generating.
    assert after["runner"]["generated"] - before["generated"] == 1
    assert after["ingress"]["responses_by_status"].get("500", 0) == 0


def test_limits_are_named_in_the_error(server):
    c = server["client"]
    big = _answer(c, sequence="M" * 401)
    assert big.status_code == 422 and big.json()["error"]["param"] == "max_residues"
    assert big.json()["error"]["limit"] == {"name": "max_residues", "value": 401, "maximum": 400}
    huge = c.post("/v1/answer", content=b" " * (2 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["param"] == "max_body_bytes"
    many = _answer(c, questions=["q"] * 5)
    assert many.status_code == 422 and many.json()["error"]["param"] == "max_questions"


def test_request_timeout_is_a_504_and_costs_no_generation(server):
    c = server["client"]
    before = _stats(c)["runner"]
    r = _answer(c, timeout_s=0.001)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert _answer(c, max_new_tokens=2).status_code == 200
    after = _stats(c)["runner"]
    assert after["generated"] - before["generated"] == 1  # the timed-out request was never generated


# --------------------------------------------------------------------------- auth
def test_auth_off_needs_no_key(server):
    assert _answer(server["client"], max_new_tokens=2).status_code == 200


def test_auth_on_rejects_without_the_key_before_any_model_work(server):
    c, good = server["client"], {"Authorization": f"Bearer {KEY}"}
    before = _stats(c, "/secure", good)["runner"]
    body = {"sequence": SEQUENCE, "questions": ["q"], "max_new_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = c.post("/secure/v1/answer", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    # 401 comes before the body is read: an oversized body without a key is still just a 401.
    assert c.post("/secure/v1/answer", content=b"x" * (2 << 20)).status_code == 401
    assert c.get("/secure/v1/models").status_code == 401 and c.get("/secure/v1/stats").status_code == 401
    assert c.get("/secure/healthz").status_code == 200 and c.get("/secure/readyz").status_code == 200
    mid = _stats(c, "/secure", good)
    assert mid["runner"]["requests"] == before["requests"]  # no model work for rejected requests
    assert mid["ingress"]["auth_enabled"] is True and mid["ingress"]["responses_by_status"]["401"] >= 7

    assert c.post("/secure/v1/answer", json=body, headers=good).status_code == 200
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/secure/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model=server["model"], max_tokens=2,
                                           messages=[{"role": "user", "content": "<protein>?"}],
                                           extra_body={"protein": {"sequence": SEQUENCE}})
    assert reply.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/secure/v1", api_key="nope", max_retries=0).models.list()
    assert _stats(c, "/secure", good)["runner"]["requests"] == before["requests"] + 2


# --------------------------------------------------------------------------- operations
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _scrape() -> list[tuple[str, dict, float]]:
    """Samples (name, labels, value) of Ray's Prometheus endpoint on this node (loopback)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def _value(samples, name: str, **labels) -> float:
    return sum(v for n, tags, v in samples if n == name and labels.items() <= tags.items())


def test_prometheus_metrics_on_rays_metrics_endpoint(server):
    c, model = server["client"], server["model"]
    assert _answer(c, max_new_tokens=4).status_code == 200
    assert _chat(c, model, n=2).status_code == 400
    with c.stream("POST", "/v1/chat/completions", json={
            "model": model, "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "<protein>?"}],
            "protein": {"sequence": SEQUENCE}}) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    stats = _stats(c)["runner"]  # quiet from here on: the exported counters must reach these values
    app = {"application": "open", "model": model}
    deadline = time.monotonic() + 40  # Ray exports every RAY_metrics_report_interval_ms (10 s by default)
    while True:
        samples = _scrape()
        got = {
            "tokens": _value(samples, "ray_sepit_generated_tokens_total", **app),
            "steps": _value(samples, "ray_sepit_batch_size_count", **app),
            "first_tokens": _value(samples, "ray_sepit_time_to_first_token_seconds_count", **app),
        }
        want = {"tokens": stats["completion_tokens"], "steps": stats["decode_steps"], "first_tokens": stats["generated"]}
        if got == want and _value(samples, "ray_sepit_request_errors_total", route="/v1/chat/completions",
                                  status="400", **app) >= 1:
            break
        assert time.monotonic() < deadline, f"exported {got}, the replica counted {want}"
        time.sleep(0.5)
    assert _value(samples, "ray_sepit_requests_total", route="/v1/answer", status="200", **app) >= 1
    assert _value(samples, "ray_sepit_requests_total", route="/v1/chat/completions", status="200", **app) >= 1
    assert _value(samples, "ray_sepit_request_duration_seconds_count", route="/v1/answer", **app) >= 1
    # Every step had at least one row (buckets at k + 0.5: "le=0.5" holds the steps with no row).
    assert _value(samples, "ray_sepit_batch_size_bucket", le="0.5", **app) == 0
    assert _value(samples, "ray_sepit_batch_size_sum", **app) >= stats["decode_steps"]
    assert _value(samples, "ray_sepit_prompt_tokens_total", **app) > 0
    assert _value(samples, "ray_sepit_time_to_first_token_seconds_sum", **app) > 0
    assert any(n == "ray_sepit_tokens_per_second" and tags.get("application") == "open" and v > 0
               for n, tags, v in samples)
    # Serve's own tags say which replica reported.
    assert {t["deployment"] for n, t, _ in samples if n == "ray_sepit_generated_tokens_total"} == {"SepitModelRunner"}
    assert {t["deployment"] for n, t, _ in samples if n == "ray_sepit_requests_total"} == {"SepitIngress"}


def test_user_config_retunes_the_running_replica_without_a_restart(server):
    c = server["client"]
    assert _answer(c, max_new_tokens=1).status_code == 200
    before = _stats(c)["runner"]
    assert before["user_config"] == OPEN_USER_CONFIG and before["max_batch_size"] == 8
    tuned = {"max_batch_size": 2, "batch_wait_timeout_s": 0.5, "generation": {"max_new_tokens": 3}}
    _deploy_open(server["model_dir"], server["port"], tuned)
    try:
        deadline = time.monotonic() + 30
        while (after := _stats(c)["runner"])["user_config"] != tuned:
            assert time.monotonic() < deadline, after
            time.sleep(0.2)
        # The same replica (same id, its counters kept, no second warm-up) now runs the new settings.
        assert (after["replica"], after["warmup_ms"]) == (before["replica"], before["warmup_ms"])
        assert after["requests"] >= before["requests"] >= 1
        assert (after["max_batch_size"], after["batch_wait_timeout_s"], after["generation"]["max_new_tokens"]) == (2, 0.5, 3)
        # A request without max_new_tokens takes the new default (this prompt runs to any budget).
        default = _answer(c, questions=["Describe <protein>."]).json()["answers"][0]
        assert (default["completion_tokens"], default["finish_reason"]) == (3, "length")
        # Four requests at once: the loop holds at most two rows.
        results = [None] * 4
        barrier = threading.Barrier(4)

        def fire(i):
            with httpx.Client(base_url=server["url"], timeout=60) as own:
                barrier.wait()
                results[i] = _answer(own, questions=[f"Question {i} about <protein>?"], max_new_tokens=2)

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in results)
        assert max(r.json()["answers"][0]["batch_size"] for r in results) <= 2
        hist = _stats(c)["runner"]["batch_size_histogram"]
        assert {k: v - after["batch_size_histogram"].get(k, 0) for k, v in hist.items()
                if v != after["batch_size_histogram"].get(k, 0)}.keys() <= {"1", "2"}
    finally:
        _deploy_open(server["model_dir"], server["port"], OPEN_USER_CONFIG)
        deadline = time.monotonic() + 30
        while _stats(c)["runner"]["user_config"] != OPEN_USER_CONFIG:
            assert time.monotonic() < deadline
            time.sleep(0.2)


# --------------------------------------------------------------------------- the replica on its own
def test_an_item_that_breaks_a_prefill_does_not_fail_the_others(model_dir):
    from sepit.processing import generate_answers
    from sepit.serve.batcher import DecodeRequest
    from sepit.serve.config import ServeConfig
    from sepit.serve.model_runner import SepitModelRunner
    from sepit.serve.protocol import GenerationItem

    # A long admission wait: the three requests submitted together are prefilled together.
    runner = SepitModelRunner(ServeConfig(model_dir=model_dir, batch_wait_timeout_s=1.0))
    try:
        assert runner.warm and runner.stats()["generated"] == 0  # counters start after the warm-up
        good = [GenerationItem("What is <protein>?", SEQUENCE, max_new_tokens=3),
                GenerationItem("Where is <protein>?", SEQUENCE[:20], max_new_tokens=3)]
        requests = [runner._request(it, 60.0)[1] for it in good]
        # "1" is not a residue: validation refuses it, so build its request by hand to reach the loop.
        bad = GenerationItem("What is <protein>?", "MKT1AY", max_new_tokens=3)
        now = time.monotonic()
        requests.insert(1, DecodeRequest(bad, runner.processor.encode_prompt(bad.question), 30, now, now + 60))
        results = [f.result(timeout=60) for f in [runner.batcher.submit(r) for r in requests]]
        assert [r.error is None for r in results] == [True, False, True]
        assert "generation failed" in results[1].error and results[0].completion_tokens >= 1
        stats = runner.stats()
        assert stats["failed"] == 1 and stats["generated"] == 2 and stats["batch_size_histogram"] == {"3": 1}
        # The two good rows decoded in the same steps: greedy answers equal the model's own.
        assert [r.text for r in results[::2]] == generate_answers(
            runner.model, runner.processor, [it.question for it in good], [(it.sequence, None, None) for it in good],
            max_new_tokens=3)
    finally:
        runner.batcher.stop()
