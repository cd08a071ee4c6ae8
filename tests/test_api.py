"""The public surface: exports, layering, configuration sources, error messages."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest

import runtime
from runtime import ConfigError, ContextOverflowError, GenerateRequest, InvalidRequestError, RuntimeConfig
from runtime.core import errors as errors_module
from runtime.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_complete_and_exact() -> None:
    """``__all__`` names exactly what runtime/__init__.py hands on (lazily), and each resolves
    to the object its home module defines."""
    tree = ast.parse((ROOT / "runtime" / "__init__.py").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If))  # the ``if TYPE_CHECKING:`` block
    typed = {a.asname or a.name for n in ast.walk(guarded) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert set(runtime.__all__) == typed == set(runtime._HOMES)
    for name in runtime.__all__:
        home = importlib.import_module(runtime._HOMES[name])
        assert getattr(runtime, name) is getattr(home, name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = runtime.nothing_here


def test_every_error_is_under_one_base_and_in_the_tree() -> None:
    doc = errors_module.__doc__ or ""
    for name in errors_module.__all__:
        cls = getattr(errors_module, name)
        assert issubclass(cls, runtime.SlotserveError)
        assert name in doc, f"{name} is missing from the tree in runtime/core/errors.py"


def test_config_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "slotserve.toml"
    toml.write_text('slots = 3\nmax_queue = 5\nmodel = "x.gguf"\n')
    monkeypatch.setenv("SLOTSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("SLOTSERVE_PREFIX_CACHE", "false")
    cfg = RuntimeConfig.load(toml, model="y.gguf")
    assert (cfg.slots, cfg.max_queue, cfg.model, cfg.prefix_cache) == (3, 7, "y.gguf", False)


def test_one_toml_file_holds_the_runtime_and_the_server_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part reads its own keys (as ``slotserve serve --config`` does); the environment
    still wins over the file, and a key no part knows is refused with its name."""
    toml = tmp_path / "slotserve.toml"
    toml.write_text('slots = 2\nhost = "127.0.0.2"\nport = 8081\nmax_body_bytes = 4096\n')
    monkeypatch.setenv("SLOTSERVE_PORT", "8082")
    cfg = RuntimeConfig.load(toml, others=ServerSettings.__struct_fields__)
    settings = ServerSettings.load(toml)
    assert cfg.slots == 2
    assert (settings.host, settings.port, settings.max_body_bytes) == ("127.0.0.2", 8082, 4096)
    with pytest.raises(ConfigError, match="host"):
        RuntimeConfig.load(toml)  # the server's keys are not the runtime's
    toml.write_text("slots = 2\nslotz = 3\n")
    with pytest.raises(ConfigError, match="slotz"):
        RuntimeConfig.load(toml, others=ServerSettings.__struct_fields__)
    toml.write_text("slots = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ServerSettings.load(toml)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"slots": 0}, "slots is 0; it must be between 1 and 1,024"),
        ({"n_ctx_per_slot": 8}, "n_ctx_per_slot is 8"),
        ({"restart_period_s": 0.0}, "restart_period_s is 0.0"),
    ],
)
def test_config_out_of_range_names_field_and_limit(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig.load(None, **fields)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown field `slot`"):
        RuntimeConfig.load(slot=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens is 0; it must be between 1 and 1,048,576"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature is nan"),
        ({"prompt": "x", "top_p": 0.0}, r"top_p is 0.0; it must be in \(0, 1\]"),
        ({"prompt": "x", "stop": [""]}, r"stop\[0\] is empty"),
        ({"prompt": "x", "seed": -1}, "seed is -1"),
    ],
)
def test_request_errors_name_field_value_and_limit(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest(**fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=message):
        runtime.decode_request(fields, GenerateRequest)


def test_decode_request_reports_json_and_type_errors() -> None:
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        runtime.decode_request(b"{oops", GenerateRequest)
    with pytest.raises(InvalidRequestError, match=r"Expected `int \| null`, got `str` - at `\$\.max_tokens`"):
        runtime.decode_request(b'{"prompt": "x", "max_tokens": "many"}', GenerateRequest)


def test_context_overflow_message_has_both_numbers() -> None:
    exc = ContextOverflowError(2310, 100, 2048)
    assert str(exc) == (
        "prompt is 2,310 tokens and max_tokens is 100 (2,410 in all); slot context is 2,048 tokens (n_ctx_per_slot)"
    )
    assert isinstance(exc, InvalidRequestError)


def test_text_must_be_valid_unicode() -> None:
    from runtime import ChatMessage

    with pytest.raises(InvalidRequestError, match="prompt contains a lone surrogate at index 1"):
        GenerateRequest(prompt="a\udc00b")
    with pytest.raises(InvalidRequestError, match=r"stop\[0\] contains a lone surrogate"):
        GenerateRequest(prompt="x", stop=("\ud800",))
    with pytest.raises(InvalidRequestError, match="content contains a lone surrogate"):
        ChatMessage(role="user", content="\udfff")
    assert ChatMessage(role="assistant", content="").content == ""
