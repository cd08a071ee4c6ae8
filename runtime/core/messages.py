"""Requests, chunks and results: frozen, keyword-only msgspec Structs.

Requests validate themselves when constructed and when decoded (``__post_init__``), so bad input
is refused at the edge with an :class:`~runtime.core.errors.InvalidRequestError` that names the field,
its value and the limit. Sampling defaults follow llama.cpp's server (``repeat_penalty`` 1.0,
``top_k`` 40, ``top_p`` 0.95, ``min_p`` 0.05) except ``temperature``, 0.8 as in Ollama.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar

import msgspec

from runtime.core.errors import InvalidRequestError
from runtime.core.structured import constraint_grammar
from runtime.core.tools import CALL_OPEN, NamedTool, Tool, ToolCall, ToolChoice, split_calls

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Chunk",
    "Completion",
    "CompletionBuilder",
    "DoneReason",
    "EmbedRequest",
    "Embeddings",
    "GenerateRequest",
    "QueueEstimate",
    "RequestStats",
    "TokenLogprob",
    "TopLogprob",
    "decode_request",
]

DoneReason = Literal["stop", "length", "cancel", "error"]

MAX_TOKENS_LIMIT = 1 << 20  # no context we support is larger; a bigger ask is a client bug
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters per stop string; the holdback buffer is bounded by it
SEED_LIMIT = (1 << 32) - 1  # llama.cpp seeds are uint32
MAX_EMBED_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (and Ollama's)
PENALTY_LIMIT = 2.0  # presence and frequency penalties: OpenAI's range is -2 to 2
PRIORITY_LIMIT = 1000  # priority classes run -1,000 to 1,000
MAX_TENANT_LENGTH = 256  # characters of a tenant's name
MAX_DEADLINE_MS = 86_400_000.0  # a day


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def _check_text(field: str, text: str, *, allow_empty: bool = False) -> None:
    _check(allow_empty or bool(text), f"{field} is empty; it needs at least one character")
    nul = text.find("\x00")
    _check(nul < 0, f"{field} contains a NUL character at index {nul}; NUL is not allowed")
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{field} contains a lone surrogate at index {exc.start}; text must be valid Unicode (UTF-8)"
        ) from None


class _Sampling(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields shared by every request: how many tokens, how to sample, when to stop."""

    max_tokens: int | None = None
    """Tokens to generate at most (1 to 1,048,576). None: until the slot's context is full."""
    overflow: Literal["refuse", "stop"] = "refuse"
    """A max_tokens the slot has no room for after the prompt: ``refuse`` the request
    (ContextOverflowError before any compute; OpenAI's way), or ``stop`` when the context is
    full, or at ``max_tokens_cap``, with done_reason ``length`` (Ollama's way with num_predict)."""
    temperature: float = 0.8
    """0 means greedy (argmax); otherwise 0 < t <= 100."""
    top_k: int = 40
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 0.95
    """Nucleus sampling mass in (0, 1]; 1 disables."""
    min_p: float = 0.05
    """Drop tokens below min_p x the top probability, in [0, 1]; 0 disables."""
    repeat_penalty: float = 1.0
    """Penalty for tokens among the last ``repeat_last_n``, in (0, 10]; 1 disables."""
    repeat_last_n: int = 64
    """How many recent tokens the repeat penalty looks at (0 to 4,096)."""
    seed: int | None = None
    """Sampling seed (0 to 2**32-1); None draws one per request."""
    stop: tuple[str, ...] = ()
    """Stop strings (at most 16, each 1 to 256 characters); never emitted."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token among the last ``repeat_last_n`` (OpenAI's
    presence penalty, -2 to 2; llama.cpp's penalties sampler); 0 disables."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it occurs among the last ``repeat_last_n``
    (OpenAI's frequency penalty, -2 to 2); 0 disables."""
    logprobs: bool = False
    """Give each generated token's log-probability (``Chunk.logprobs``)."""
    top_logprobs: int = 0
    """With ``logprobs``: also this many most likely tokens at each position (0 to 20)."""
    format: Literal["json"] | dict[str, Any] | None = None
    """Constrain the answer to JSON: ``"json"`` any JSON object, a dict a JSON schema it must
    match (Ollama's ``format``; runtime.core.structured). A bad schema is refused before any
    compute."""
    grammar: str | None = None
    """Constrain the answer to a GBNF grammar (llama.cpp's ``grammar``) or a Lark grammar
    (llguidance's syntax). At most one of ``format``, ``grammar`` and tools is given."""
    priority: int = 0
    """Scheduling class, higher first (-1,000 to 1,000): a waiting request of a higher class
    goes to a free slot before every lower one (until a lower one has waited ``queue_aging_s``)."""
    tenant: str = ""
    """Whom the request is for (OpenAI's ``user``; up to 256 characters): within a class, the
    slots are shared between tenants by weight (``tenant_weights``), with per-tenant caps."""
    deadline_ms: float | None = None
    """Refuse the request at once (DeadlineUnmetError) if its first token is predicted later
    than this many milliseconds after it was asked for: a wait for its model's load or for room
    in the queue counts (0 to 86,400,000); None: no deadline."""

    def _validate_admission(self) -> None:
        p = self.priority
        _check(
            -PRIORITY_LIMIT <= p <= PRIORITY_LIMIT,
            f"priority is {p}; it must be -{PRIORITY_LIMIT:,} to {PRIORITY_LIMIT:,}",
        )
        _check_text("tenant", self.tenant, allow_empty=True)
        n = len(self.tenant)
        _check(n <= MAX_TENANT_LENGTH, f"tenant is {n} characters; at most {MAX_TENANT_LENGTH} are allowed")
        d = self.deadline_ms
        _check(
            d is None or (math.isfinite(d) and 0 <= d <= MAX_DEADLINE_MS),
            f"deadline_ms is {d}; it must be 0 to {MAX_DEADLINE_MS:,.0f} (a day)",
        )

    def _validate_sampling(self) -> None:
        self._validate_admission()
        m = self.max_tokens
        _check(
            m is None or 1 <= m <= MAX_TOKENS_LIMIT,
            f"max_tokens is {m}; it must be between 1 and {MAX_TOKENS_LIMIT:,}",
        )
        t = self.temperature
        _check(math.isfinite(t) and 0 <= t <= 100, f"temperature is {t}; it must be 0 to 100")
        _check(0 <= self.top_k <= 1 << 20, f"top_k is {self.top_k}; it must be >= 0")
        p = self.top_p
        _check(math.isfinite(p) and 0 < p <= 1, f"top_p is {p}; it must be in (0, 1]")
        p = self.min_p
        _check(math.isfinite(p) and 0 <= p <= 1, f"min_p is {p}; it must be in [0, 1]")
        r = self.repeat_penalty
        _check(math.isfinite(r) and 0 < r <= 10, f"repeat_penalty is {r}; it must be in (0, 10]")
        n = self.repeat_last_n
        _check(0 <= n <= 4096, f"repeat_last_n is {n}; it must be 0 to 4,096")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(
                math.isfinite(v) and -PENALTY_LIMIT <= v <= PENALTY_LIMIT,
                f"{name} is {v}; it must be -{PENALTY_LIMIT:g} to {PENALTY_LIMIT:g}",
            )
        k = self.top_logprobs
        _check(0 <= k <= MAX_TOP_LOGPROBS, f"top_logprobs is {k}; it must be 0 to {MAX_TOP_LOGPROBS}")
        _check(self.logprobs or k == 0, f"top_logprobs is {k}; it needs logprobs true")
        s = self.seed
        _check(s is None or 0 <= s <= SEED_LIMIT, f"seed is {s}; it must be 0 to {SEED_LIMIT:,}")
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
        )
        for i, text in enumerate(self.stop):
            _check_text(f"stop[{i}]", text)
            _check(
                len(text) <= MAX_STOP_LENGTH,
                f"stop[{i}] is {len(text)} characters; at most {MAX_STOP_LENGTH} are allowed",
            )

    def constraint(self) -> str | None:
        """The llguidance grammar of this request's output constraint, None when it is free
        (cached by the constraint's text; validated when the request was made)."""
        return constraint_grammar(self.format, self.grammar)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax of the logits with nothing else applied."""
        return self.temperature == 0 and not self.penalized

    @property
    def penalized(self) -> bool:
        """True when a repeat, presence or frequency penalty applies."""
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0


class GenerateRequest(_Sampling, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Complete ``prompt`` (raw text; the model's BOS is added if the model wants one).

    :raises InvalidRequestError: if a field is out of range (the message names it and the limit),
        or ``format`` / ``grammar`` does not compile (runtime.core.structured).
    """

    prompt: str
    parse_special: bool = False
    """Read special tokens' texts in ``prompt`` as those tokens (``<|im_start|>``): for a caller
    that writes the whole template itself (Ollama's ``raw``). Off, they are plain text."""

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt)
        self._validate_sampling()
        self.constraint()


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One chat turn; ``role`` is system, user, assistant or tool (OpenAI and Ollama roles).

    An assistant turn may carry the ``tool_calls`` it made; a tool turn is a call's result,
    with the ``tool_call_id`` it answers (OpenAI) and the function's ``name`` (Ollama's
    ``tool_name``) where known.
    """

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        _check_text("content", self.content, allow_empty=True)
        _check(
            not self.tool_calls or self.role == "assistant",
            f"a {self.role} message has tool_calls; only an assistant message makes calls",
        )


class ChatRequest(_Sampling, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Answer ``messages``, rendered with the model's own chat template (GGUF metadata).

    :raises InvalidRequestError: if messages is empty, a field is out of range, a tool is named
        twice, ``tool_choice`` asks for a call without tools or names a function not among them,
        or the output constraint does not compile (runtime.core.structured).
    """

    messages: tuple[ChatMessage, ...]
    tools: tuple[Tool, ...] = ()
    """Functions the model may call (runtime.core.tools); the calls are in ``Completion.tool_calls``."""
    tool_choice: ToolChoice = "auto"
    """``none``, ``auto`` (text or a call), ``required`` (one call, constrained to a valid
    one) or a NamedTool (a call of that function)."""

    def __post_init__(self) -> None:
        _check(len(self.messages) > 0, "messages is empty; a chat needs at least one message")
        names = [t.name for t in self.tools]
        _check(len(set(names)) == len(names), f"tools names a function twice: {names}")
        for i, tool in enumerate(self.tools):
            _check_text(f"tools[{i}].name", tool.name)
            kind = tool.parameters.get("type", "object")
            _check(
                kind == "object",
                f"tools[{i}] ({tool.name}) has parameters of type {kind!r}; a function's parameters "
                "must be an object schema (type 'object')",
            )
        _check(
            isinstance(self.tool_choice, NamedTool) or self.tool_choice in ("none", "auto", "required"),
            f"tool_choice is {self.tool_choice!r}; give 'none', 'auto', 'required' or a NamedTool",
        )
        _check(
            not isinstance(self.tool_choice, NamedTool) or bool(self.tools),
            "tool_choice names a function but tools is empty",
        )
        _check(
            self.tool_choice in ("none", "auto") or bool(self.tools),
            "tool_choice is required but tools is empty",
        )
        self._validate_sampling()
        self.constraint()

    def constraint(self) -> str | None:
        """As GenerateRequest's, with the tools' call grammar when tool_choice is not none."""
        return constraint_grammar(self.format, self.grammar, self.tools, self.tool_choice)

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls (tools given, tool_choice not none)."""
        return bool(self.tools) and self.tool_choice != "none"


R = TypeVar("R", GenerateRequest, ChatRequest)


def decode_request(data: bytes | str | dict[str, Any], kind: type[R]) -> R:
    """Build a request of type ``kind`` from JSON text or a dict, refusing unknown fields.

    :raises InvalidRequestError: if the JSON is malformed, a field is unknown, missing, of the
        wrong type or out of range; the message names the field (``$.max_tokens``).
    """
    try:
        if isinstance(data, dict):
            return msgspec.convert(data, kind)
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"request is not valid JSON: {exc}") from None


class RequestStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counts (tokens) and durations (ns) of one finished request; Ollama's timing fields."""

    slot: int
    prompt_tokens: int
    prompt_tokens_cached: int
    """Prompt tokens whose KV cells were reused from the slot's previous request."""
    completion_tokens: int
    load_duration_ns: int
    """Time this request waited for the weights to load: 0 once the runtime is ready."""
    queue_duration_ns: int
    prefill_duration_ns: int
    decode_duration_ns: int
    total_duration_ns: int
    time_to_first_token_ns: int | None
    """None when no token was generated."""
    preemptions: int = 0
    """Times the request was parked for a request of a higher priority (or by hand), and resumed."""
    preempted_duration_ns: int = 0
    """Time it spent parked, in all (part of ``decode_duration_ns``)."""


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """One of the most likely tokens at a position, and its log-probability (natural log)."""

    token_id: int
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """A generated token's log-probability under the model's distribution at its position
    (the log-softmax of the raw logits, before penalties and temperature: what vLLM reports),
    and the ``top_logprobs`` most likely tokens there, most likely first."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


class QueueEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Where an admitted request stands in the queue, and when it is predicted to start."""

    position: int
    """Requests the queue would give a slot before this one (0: it is next)."""
    predicted_start_s: float | None
    """Seconds from admission until a slot is predicted to take it (0: at once); None before
    the runtime has measured a step."""
    predicted_ttft_s: float | None
    """Seconds from admission until its first token is predicted; None as above."""


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of the streamed answer: whole UTF-8 characters only, never part of a stop string.

    The last chunk has ``done=True`` with ``done_reason`` and ``stats`` set. A stream opened with
    ``queue_event=True`` begins with one chunk that carries no text, only ``queue``.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    """With ``logprobs`` asked: one per generated token of this chunk, in order (the
    end-of-generation token has none); empty otherwise."""
    index: int = 0
    """Which choice of a request's n this chunk belongs to (``Runtime.generate_choices``)."""
    done: bool = False
    done_reason: DoneReason | None = None
    stats: RequestStats | None = None
    queue: QueueEstimate | None = None
    """Only on the queue event (no text, no tokens): the request's place and predicted start."""


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A whole answer: the text, its token ids, why it ended and its stats."""

    text: str
    token_ids: tuple[int, ...]
    done_reason: DoneReason
    stats: RequestStats
    logprobs: tuple[TokenLogprob, ...] = ()
    """As the chunks' (one per generated token when asked)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls the answer made (a ChatRequest with tools); ``text`` is then what it wrote
    outside them, and ``done_reason`` stays ``stop``."""


class CompletionBuilder:
    """Gathers a stream's chunks into the whole answer (``Completion``); with ``tools``, the
    answer's tool calls are read out of its text (runtime.core.tools.split_calls)."""

    __slots__ = ("_logprobs", "_texts", "_tokens", "_tools")

    def __init__(self, *, tools: bool = False) -> None:
        self._tools = tools
        self._texts: list[str] = []
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprob] = []

    @classmethod
    def for_request(cls, request: GenerateRequest | ChatRequest) -> CompletionBuilder:
        """A builder that reads tool calls where ``request`` may make them."""
        return cls(tools=isinstance(request, ChatRequest) and request.calls_tools)

    def add(self, chunk: Chunk) -> Completion | None:
        """Take ``chunk``; return the Completion once ``chunk`` is the last one, else None."""
        self._texts.append(chunk.text)
        self._tokens.extend(chunk.token_ids)
        if chunk.logprobs:
            self._logprobs.extend(chunk.logprobs)
        if not chunk.done:
            return None
        assert chunk.done_reason is not None and chunk.stats is not None  # a last chunk has both
        text = "".join(self._texts)
        calls: tuple[ToolCall, ...] = ()
        if self._tools and text.lstrip().startswith(CALL_OPEN):  # as a stream reads it (CallHoldback)
            text, calls = split_calls(text)
        return Completion(
            text=text,
            tool_calls=calls,
            token_ids=tuple(self._tokens),
            done_reason=chunk.done_reason,
            stats=chunk.stats,
            logprobs=tuple(self._logprobs),
        )


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Embed each of ``inputs`` (``rt.embed``): a text, or token ids as OpenAI's ``input`` takes them.

    :raises InvalidRequestError: if inputs is empty or holds more than 2,048 items, an input is
        empty (or holds a NUL or a lone surrogate), or dimensions is below 1.
    """

    inputs: tuple[str | tuple[int, ...], ...]
    truncate: bool = True
    """An input longer than the slot's context (``n_ctx_per_slot`` tokens) is cut to its first
    ``n_ctx_per_slot`` tokens; with False it is refused (ContextOverflowError). Ollama's ``truncate``."""
    dimensions: int | None = None
    """Keep the first ``dimensions`` values of each vector and L2-normalise them again (Ollama's
    and OpenAI's ``dimensions``); None: the model's whole embedding."""
    normalize: bool = True
    """L2-normalise each vector (Ollama's /api/embed, OpenAI); False gives the pooled vector as the
    model makes it (Ollama's legacy /api/embeddings)."""

    def __post_init__(self) -> None:
        n = len(self.inputs)
        _check(n > 0, "inputs is empty; give at least one text to embed")
        _check(n <= MAX_EMBED_INPUTS, f"inputs has {n:,} items; at most {MAX_EMBED_INPUTS:,} are allowed")
        for i, item in enumerate(self.inputs):
            if isinstance(item, str):
                _check_text(f"input[{i}]", item)
            else:
                _check(len(item) > 0, f"input[{i}] is an empty token array; it needs at least one token")
        d = self.dimensions
        _check(d is None or d >= 1, f"dimensions is {d}; it must be 1 or more (None: every dimension)")


class Embeddings(msgspec.Struct, frozen=True, kw_only=True):
    """What ``rt.embed`` returns: one vector per input, in the inputs' order.

    ``vectors[i]`` has ``dimensions`` floats (float32 values), L2-normalised unless the request
    asked otherwise.
    """

    vectors: list[list[float]]
    input_tokens: list[int]
    """Tokens embedded for each input (after truncation)."""
    truncated: int
    """How many inputs were cut to the slot's context."""
    dimensions: int
    total_duration_ns: int
    """From the call to the answer: tokenizing, waiting for a batch and its decode."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens embedded, all inputs together (Ollama's ``prompt_eval_count``, OpenAI's usage)."""
        return sum(self.input_tokens)
