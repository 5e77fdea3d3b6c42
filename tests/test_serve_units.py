"""Serving building blocks without Ray: config, auth, limits, schemas, protein input, streaming text."""

from __future__ import annotations

import asyncio
import gzip

import httpx
import pytest
from pydantic import ValidationError

from sepit.config import ConfigError
from sepit.resources import data_path
from sepit.serve.app import config_from_args
from sepit.serve.auth import ApiKeyAuth, AuthError, bearer_token, key_digest, resolve_api_key_digest, route_path
from sepit.serve.config import GenerationDefaults, LimitsConfig, ServeConfig
from sepit.serve.errors import InvalidInput, LimitExceeded
from sepit.serve.limits import BodySizeLimit, check_questions, resolve_max_new_tokens
from sepit.serve.openai_compat import question_from_messages
from sepit.serve.protein_input import clean_sequence, resolve_protein
from sepit.serve.schemas import AnswerRequest, ChatCompletionRequest, ChatMessage, ProteinInput
from sepit.serve.streaming import IncrementalText, cut_at_stop


def _text(rel: str) -> str:
    return gzip.open(data_path(*rel.split("/")), "rt").read()


# --------------------------------------------------------------------------- config
def test_config_defaults_bind_loopback_and_validate():
    cfg = ServeConfig(model_dir="/m/stage2")
    assert cfg.host == "127.0.0.1" and cfg.served_model_name == "stage2"
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        ServeConfig(max_batch_size=32, max_ongoing_requests=8)
    with pytest.raises(ConfigError, match="num_gpus_per_replica"):
        ServeConfig(num_gpus_per_replica=0.5)
    with pytest.raises(ConfigError, match="limits.max_residues"):
        LimitsConfig(max_residues=5000)
    with pytest.raises(ConfigError, match="generation.max_new_tokens"):
        ServeConfig(generation=GenerationDefaults(max_new_tokens=512))
    with pytest.raises(ConfigError, match="model_dir is required"):
        ServeConfig().require_model_dir()


def test_app_builder_args_merge_a_yaml_file_and_reject_unknown_keys(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model_dir: /m/x\nlimits:\n  max_questions: 3\nautoscaling:\n  max_replicas: 4\n")
    cfg = config_from_args({"config": str(path), "replicas": 2, "limits": {"max_residues": 500}})
    assert (cfg.model_dir, cfg.replicas, cfg.limits.max_questions, cfg.limits.max_residues) == ("/m/x", 2, 3, 500)
    assert cfg.autoscaling.to_serve()["max_replicas"] == 4
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_args({"model_dir": "/m", "replica": 2})


def test_the_shipped_serve_deploy_file_holds_valid_app_args():
    import yaml

    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "serve_config.yaml").read_text())
    assert doc["http_options"]["host"] == "127.0.0.1"
    (app,) = doc["applications"]
    assert app["import_path"] == "sepit.serve.app:app_builder"
    cfg = config_from_args(app["args"])
    assert cfg.model_dir and cfg.max_batch_size >= 1


def test_user_config_applies_only_runtime_fields_on_top_of_the_args():
    from sepit.serve.model_runner import with_defaults
    from sepit.serve.protocol import GenerationItem

    base = ServeConfig(model_dir="/m", max_batch_size=8, generation=GenerationDefaults(max_new_tokens=32, top_p=0.9))
    tuned = base.with_user_config({"max_batch_size": 4, "generation": {"temperature": 0.7}})
    assert (tuned.max_batch_size, tuned.generation.temperature, tuned.generation.top_p) == (4, 0.7, 0.9)
    assert tuned.generation.max_new_tokens == 32 and base.max_batch_size == 8  # merged; the args are untouched
    assert base.with_user_config(None) is base and base.with_user_config({}) is base
    with pytest.raises(ConfigError, match=r"\['replicas'\] cannot change on a running deployment"):
        base.with_user_config({"replicas": 3})
    with pytest.raises(ConfigError, match="user_config: .*max_ongoing_requests=64 is below max_batch_size=100"):
        base.with_user_config({"max_batch_size": 100})
    with pytest.raises(ConfigError, match="user_config: generation.top_p"):
        base.with_user_config({"generation": {"top_p": 2}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        base.with_user_config([1])
    # Options a request left unset take the replica's current defaults; set ones are kept.
    item = with_defaults(GenerationItem("q", "MKT", temperature=0.3), tuned.generation, 16)
    assert (item.max_new_tokens, item.do_sample, item.temperature, item.top_p) == (16, False, 0.3, 0.9)


def test_openai_fields_that_cannot_be_served_are_refused_by_name():
    from sepit.serve.errors import Unsupported
    from sepit.serve.openai_compat import refuse_unsupported

    base = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    refuse_unsupported(ChatCompletionRequest.model_validate({
        **base, "n": 1, "logprobs": False, "top_logprobs": 0, "tool_choice": "none", "function_call": "none",
        "response_format": {"type": "text"}, "tools": [], "seed": 3}))
    for extra, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 1}, "top_logprobs"),
                         ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": {"type": "function"}}, "tool_choice"),
                         ({"response_format": {"type": "json_object"}}, "response_format"), ({"response_format": {}}, "response_format")]:
        with pytest.raises(Unsupported) as exc:
            refuse_unsupported(ChatCompletionRequest.model_validate({**base, **extra}))
        assert exc.value.status == 400 and exc.value.body()["error"]["param"] == param
    with pytest.raises(ValidationError, match="seed"):
        ChatCompletionRequest.model_validate({**base, "seed": -1})


# --------------------------------------------------------------------------- auth
def test_api_key_resolution_and_checks():
    assert resolve_api_key_digest(ServeConfig(), environ={}) is None
    assert resolve_api_key_digest(ServeConfig(api_key_env="K"), environ={"K": " s3cret "}) == key_digest("s3cret")
    assert resolve_api_key_digest(ServeConfig(api_key="a", api_key_env="K"), environ={"K": "b"}) == key_digest("a")
    assert bearer_token("Bearer abc") == "abc" and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    auth = ApiKeyAuth(key_digest("s3cret"))
    auth.check("Bearer s3cret")
    for header in (None, "Bearer wrong", "s3cret", "Basic s3cret"):
        with pytest.raises(AuthError):
            auth.check(header)
    assert auth.requires_key("/v1/answer") and not auth.requires_key("/healthz")
    assert not ApiKeyAuth(None).requires_key("/v1/answer")
    assert route_path({"path": "/secure/v1/answer", "root_path": "/secure"}) == "/v1/answer"


# --------------------------------------------------------------------------- limits
async def _echo_app(scope, receive, send):
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def test_body_limit_refuses_by_content_length_and_by_streamed_size():
    asyncio.run(_body_limit_checks())


async def _body_limit_checks():
    app = BodySizeLimit(_echo_app, max_bytes=2048)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ok = await client.post("/", content=b"x" * 2048)
        assert ok.status_code == 200 and ok.text == "2048"
        declared = await client.post("/", content=b"x" * 5000)
        assert declared.status_code == 413
        assert declared.json()["error"]["param"] == "max_body_bytes"
        assert "Content-Length" in declared.json()["error"]["message"]

        async def chunks():  # no Content-Length: chunked upload, counted as it streams
            for _ in range(10):
                yield b"y" * 1000

        streamed = await client.post("/", content=chunks())
        assert streamed.status_code == 413 and "streamed" in streamed.json()["error"]["message"]


def test_question_and_token_limits_name_the_limit():
    limits = LimitsConfig(max_questions=2, max_question_chars=20, max_new_tokens=16)
    assert check_questions([" a? ", "b"], limits) == ["a?", "b"]
    with pytest.raises(LimitExceeded) as exc:
        check_questions(["a", "b", "c"], limits)
    assert exc.value.param == "max_questions" and exc.value.body()["error"]["limit"]["maximum"] == 2
    with pytest.raises(InvalidInput, match="empty"):
        check_questions(["ok", "  "], limits)
    with pytest.raises(InvalidInput, match="at least one"):
        check_questions([], limits)
    with pytest.raises(LimitExceeded, match="max_question_chars"):
        check_questions(["x" * 21], limits)
    assert resolve_max_new_tokens(None, 64, limits, "max_new_tokens") == 16
    with pytest.raises(LimitExceeded, match="max_new_tokens=16"):
        resolve_max_new_tokens(17, 8, limits, "max_tokens")


# --------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("body, field", [
    ({"sequence": "MKT", "questions": [1]}, "questions"),
    ({"sequence": "MKT", "questions": "what?"}, "questions"),
    ({"sequence": 7, "questions": ["q"]}, "sequence"),
    ({"questions": ["q"]}, "exactly one"),
    ({"sequence": "MKT", "structure": {"format": "pdb", "data": "x"}, "questions": ["q"]}, "exactly one"),
    ({"sequence": "MKT", "chain": "A", "questions": ["q"]}, "chain"),
    ({"structure": {"format": "xyz", "data": "x"}, "questions": ["q"]}, "format"),
    ({"sequence": "MKT", "questions": ["q"], "max_new_tokens": "8"}, "max_new_tokens"),
    ({"sequence": "MKT", "questions": ["q"], "do_sample": 1}, "do_sample"),
    ({"sequence": "MKT", "questions": ["q"], "tempreature": 0.5}, "tempreature"),
])
def test_answer_request_is_strict(body, field):
    with pytest.raises(ValidationError, match=field):
        AnswerRequest.model_validate(body)


def test_chat_request_ignores_unused_openai_fields_and_takes_one_user_turn():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "What is <protein>?"}]}],
        "protein": {"sequence": "MKT"}, "presence_penalty": 0.5, "user": "abc",
    })
    limits = LimitsConfig()
    assert question_from_messages(req.messages, limits) == "What is <protein>?"
    with pytest.raises(InvalidInput, match="system prompt"):
        question_from_messages([ChatMessage(role="system", content="x"), ChatMessage(role="user", content="q")], limits)
    with pytest.raises(InvalidInput, match="multi-turn"):
        question_from_messages([ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="a")], limits)
    with pytest.raises(LimitExceeded, match="max_messages"):
        question_from_messages([ChatMessage(role="user", content="q")] * 3, LimitsConfig(max_messages=2))


# --------------------------------------------------------------------------- protein input (real files)
def test_sequence_input_is_cleaned_and_checked():
    assert clean_sequence(" mkt ay\n") == "MKTAY"
    with pytest.raises(InvalidInput, match=r"outside the protein alphabet '\*1' \(first at residue 4\)"):
        clean_sequence("MKT1A*")
    with pytest.raises(LimitExceeded, match="max_residues=10"):
        resolve_protein(ProteinInput(sequence="M" * 11), LimitsConfig(max_residues=10))


def test_pdb_and_mmcif_uploads_give_sequence_and_coordinates():
    pdb = resolve_protein(ProteinInput(structure={"format": "pdb", "data": _text("biotite_testdata/1aki.pdb.gz")}),
                          LimitsConfig())
    assert (pdb.source, pdb.chain, len(pdb.sequence)) == ("pdb", "A", 129)
    assert pdb.sequence.startswith("KVFGRCELAAAMKRHGLDNYRGYSLGNWVC") and pdb.residues_with_coords == 129
    assert pdb.coords.shape == (129, 3)
    cif = resolve_protein(ProteinInput(structure={"format": "cif", "data": _text("biotite_testdata/7gsa.cif.gz")}),
                          LimitsConfig())
    assert cif.source == "cif" and 0 < cif.residues_with_coords < len(cif.sequence)  # unmodelled residues masked


def test_structure_upload_errors_carry_the_reason():
    lcd = _text("biopython_testdata/pdb/1LCD.pdb.gz")
    assert resolve_protein(ProteinInput(structure={"format": "pdb", "data": lcd}, chain="A"), LimitsConfig()).chain == "A"
    cases = [
        ({"format": "pdb", "data": lcd}, "B", "nucleic-acid chain"),
        ({"format": "pdb", "data": lcd}, "Z", "chain Z not found; protein chains: A"),
        ({"format": "pdb", "data": ">sp|P1\nMKT\n"}, None, "fasta content"),
        ({"format": "pdb", "data": "hello, world"}, None, "unrecognised content"),
        ({"format": "cif", "data": "data_x\nloop_\n_atom_site.id\n"}, None, "no usable protein chain"),
        ({"format": "pdb", "data": "\x00\x01\x02binary"}, None, "binary content"),
    ]
    for structure, chain, reason in cases:
        with pytest.raises(InvalidInput, match=reason):
            resolve_protein(ProteinInput(structure=structure, chain=chain), LimitsConfig())


# --------------------------------------------------------------------------- streaming text
@pytest.fixture(scope="module")
def bpe_tokenizer():
    from sepit.models.tokenizer import train_llm_tokenizer

    texts = ["The protein binds ATP and hydrolyses it.", "Located in the cytoplasm; kinase activity.",
             "Enzyme: EC 2.7.11.1, with Mg²⁺ as cofactor — α/β fold."] * 20
    return train_llm_tokenizer(texts, vocab_size=400)


def test_incremental_text_deltas_rebuild_the_final_text(bpe_tokenizer):
    text = "Binds ATP — α/β fold, Mg²⁺ cofactor."
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    inc = IncrementalText(bpe_tokenizer)
    deltas = [inc.update(ids[: i + 1]) for i in range(len(ids))]
    assert all("\ufffd" not in d for d in deltas)  # half characters are held back
    assert "".join(deltas) + inc.finish(text) == text


def test_incremental_text_never_emits_what_a_stop_string_cuts(bpe_tokenizer):
    text = "kinase activity. END of answer"
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    inc = IncrementalText(bpe_tokenizer, stops=["END"])
    streamed = "".join(inc.update(ids[: i + 1]) for i in range(len(ids)))
    final, stopped = cut_at_stop(text, ["END"])
    assert stopped and final == "kinase activity. "
    assert final.startswith(streamed) and streamed + inc.finish(final) == final


def test_deployments_follow_the_config():
    from sepit.serve.app import ingress_deployment, model_runner_deployment
    from sepit.serve.config import AutoscalingConfig

    gpu = model_runner_deployment(ServeConfig(model_dir="/m", replicas=3, num_gpus_per_replica=1, max_ongoing_requests=32))
    assert gpu.num_replicas == 3 and gpu.ray_actor_options["num_gpus"] == 1 and gpu.max_ongoing_requests == 32
    scaled = ServeConfig(model_dir="/m", autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4))
    model_runner_deployment(scaled)  # Serve validates the autoscaling config here
    assert ingress_deployment(scaled).max_ongoing_requests == 4 * scaled.max_ongoing_requests
    assert ingress_deployment(scaled).ray_actor_options["num_cpus"] == 0
