"""Request and response bodies of the HTTP API (pydantic; also the schemas shown at ``/docs``).

Requests are strict: a wrong JSON type is a 422 naming the field, never a silent coercion
(``"questions": [1]`` is refused, not read as ``["1"]``).  ``/v1/answer`` refuses unknown
fields (typos surface); the OpenAI-compatible chat body ignores harmless fields it does not use
(``user``, ``presence_penalty``, ...) as OpenAI-compatible servers do, so standard clients work,
but declares the ones whose meaning it cannot serve (``n`` > 1, ``logprobs``, ``tools``, a JSON
``response_format``) so the ingress refuses them with 400
(:func:`sepit.serve.openai_compat.refuse_unsupported`) instead of answering something else.
"""

from __future__ import annotations

from typing import Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


#: Largest accepted ``seed`` (torch generators take 64-bit seeds).
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------- protein input
class StructureInput(BaseModel):
    """A structure file's text: PDB or mmCIF (``cif``/``mmcif``), one model is read."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["pdb", "cif", "mmcif"] = Field(description="File format of `data`.")
    data: str = Field(min_length=1, description="The whole file as text (not base64, not gzipped).")


class ProteinInput(BaseModel):
    """One protein: its sequence, or a structure file (then its Cα coordinates are used)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sequence: Optional[str] = Field(
        None, description="One-letter amino-acid sequence (20 standard letters plus X, U, O, B, Z, J).",
        examples=["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"],
    )
    structure: Optional[StructureInput] = Field(None, description="A PDB or mmCIF file instead of a sequence.")
    chain: Optional[str] = Field(
        None, min_length=1, max_length=4,
        description="Chain id to read from `structure` (default: its first protein chain).",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.sequence is None) == (self.structure is None):
            raise ValueError("give exactly one of `sequence` or `structure`")
        if self.chain is not None and self.structure is None:
            raise ValueError("`chain` applies only to a `structure`")
        return self


class GenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    max_new_tokens: Optional[int] = Field(None, ge=1, description="New tokens per answer (server default if unset).")
    do_sample: Optional[bool] = Field(None, description="Sample instead of greedy decoding.")
    temperature: Optional[float] = Field(None, gt=0, le=2, description="Sampling temperature.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    stop: Optional[List[str]] = Field(None, max_length=4, description="Strings that end an answer (not included).")
    timeout_s: Optional[float] = Field(
        None, gt=0, description="Client deadline in seconds; capped at the server's request timeout."
    )
    seed: Optional[int] = Field(
        None, ge=0, le=MAX_SEED,
        description="Seed of sampling: the same request with the same seed gives the same answers.",
    )


# --------------------------------------------------------------------------- /v1/answer
class AnswerRequest(ProteinInput, GenerationOptions):
    """``POST /v1/answer``: one protein, one or more questions about it."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "sequence": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ",
        "questions": ["What is the function of <protein>?", "Where is <protein> located in the cell?"],
        "max_new_tokens": 64,
    }]})
    questions: List[str] = Field(
        description="Questions; `<protein>` marks where the protein goes (prepended when absent).",
    )


class ProteinInfo(BaseModel):
    length: int = Field(description="Residues.")
    source: Literal["sequence", "pdb", "cif"]
    chain: Optional[str] = Field(None, description="Chain read from the structure.")
    residues_with_coords: int = Field(description="Residues with a Cα coordinate (0 for a sequence).")
    structure_used: bool = Field(description="Coordinates were passed to a structure-aware encoder.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="LLM prompt tokens, counting the protein span (residues + 2).")
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    parse_ms: float = Field(description="Validating the request and reading the structure.")
    queue_ms: float = Field(description="Longest wait of this request's questions for their batch.")
    generate_ms: float = Field(description="Longest generation time of the batches that served them.")
    total_ms: float = Field(description="Time in the API, from the request to the response.")


class AnswerItem(BaseModel):
    question: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    batch_size: int = Field(description="Generations in the batch that produced this answer.")


class AnswerResponse(BaseModel):
    id: str
    model: str
    answers: List[AnswerItem]
    protein: ProteinInfo
    structure_used: bool
    usage: Usage
    timings: Timings


# --------------------------------------------------------------------------- OpenAI chat
class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` (OpenAI-compatible) with the protein in an extra field."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"examples": [{
        "model": "sepit",
        "messages": [{"role": "user", "content": "What is the function of <protein>?"}],
        "protein": {"sequence": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"},
        "max_tokens": 64,
    }]})
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    protein: Optional[ProteinInput] = Field(
        None, description="The protein the user message's `<protein>` refers to (openai client: `extra_body`).",
    )
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 or unset: greedy decoding.")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, description="Only 1 is served (one choice per request); more is refused with 400.")
    seed: Optional[int] = Field(
        None, ge=0, le=MAX_SEED, description="Seed of sampling: the same request and seed give the same answer.",
    )
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    # Declared only to be refused (400) when asked for; see openai_compat.refuse_unsupported.
    logprobs: Optional[bool] = Field(None, description="Not served: `true` is refused with 400.")
    top_logprobs: Optional[int] = Field(None, ge=0, description="Not served: a value above 0 is refused with 400.")
    tools: Optional[List[Any]] = Field(None, description="Not served: tool calling is refused with 400.")
    tool_choice: Optional[Union[str, dict]] = Field(None, description="Not served unless `none`.")
    functions: Optional[List[Any]] = Field(None, description="Not served (legacy tools): refused with 400.")
    function_call: Optional[Union[str, dict]] = Field(None, description="Not served unless `none`.")
    response_format: Optional[dict] = Field(None, description="Only `{\"type\": \"text\"}` is served.")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage
    sepit: dict = Field(description="SEPIT extras: protein info and timings.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sepit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]
