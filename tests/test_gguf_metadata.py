"""Reading a GGUF file's metadata from its header: typed values, long arrays on request, and a
clear error for a file that is not GGUF or is cut short."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime import ModelLoadError
from runtime.backends.gguf_metadata import read_gguf_metadata
from tests.helpers import require_modules
from tests.models import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_modules("gguf")
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_values_keep_their_types_and_long_arrays_come_on_request(tiny: Path) -> None:
    whole = read_gguf_metadata(tiny)
    short = read_gguf_metadata(tiny, max_array_items=5)
    assert whole["general.architecture"] == "llama" and whole["general.name"] == "tiny-llama"
    assert (whole["llama.context_length"], whole["llama.block_count"], whole["llama.embedding_length"]) == (
        256,
        2,
        64,
    )
    assert whole["llama.attention.layer_norm_rms_epsilon"] == 1e-05  # float32, as its shortest decimal
    tokens = whole["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and tokens[:3] == ["<unk>", "<s>", "</s>"] and len(tokens) > 259
    assert short["tokenizer.ggml.tokens"] == [] and short["tokenizer.ggml.scores"] == []
    assert {k: v for k, v in short.items() if not isinstance(v, list)} == {
        k: v for k, v in whole.items() if not isinstance(v, list)
    }
    assert list(short) == list(whole)  # every key, in file order


def test_a_file_that_is_not_gguf_or_is_cut_short_is_refused(tiny: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:2000])
    other = tmp_path / "other.bin"
    other.write_bytes(b"GGML" + bytes(100))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="runs past the end of the file"):
        read_gguf_metadata(cut)
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        read_gguf_metadata(other)
    with pytest.raises(ModelLoadError, match="could not read the GGUF metadata"):
        read_gguf_metadata(empty)
