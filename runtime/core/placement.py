"""Which GPUs hold a model, and each one's share of its KV cache, as llama.cpp places them.

llama.cpp's ``split_mode`` (``llama_model_params``): ``none`` puts everything on ``main_gpu``;
``layer`` (its default) puts whole layers, each with its own KV cache, on the GPUs in
proportion to ``tensor_split``; ``row`` splits each weight matrix's rows over those GPUs and
keeps the KV cache and the other tensors on ``main_gpu``. With ``tensor_split`` unset (or 0 for
every visible GPU) llama.cpp uses every visible GPU, in proportion to its free memory at load;
we take that as equal shares, which it is on like GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.core.config import SplitMode

__all__ = ["kv_shares"]


def kv_shares(
    split_mode: SplitMode, main_gpu: int, tensor_split: Sequence[float], visible: int
) -> dict[int, float]:
    """Each GPU the model uses -> its share of the KV cache (0: it holds weights only).

    :param main_gpu: llama.cpp's ``main_gpu``; kept even beyond ``visible`` (it then reads as
        unknown, as llama.cpp refuses to load there).
    :param tensor_split: each GPU's share of the model, in CUDA's order; () when unset.
    :param visible: the GPUs CUDA shows this process (after CUDA_VISIBLE_DEVICES).
    :returns: GPU (CUDA ordinal) -> share, in ordinal order; the shares sum to 1.
    """
    if split_mode == "none":
        return {main_gpu: 1.0}
    weights = list(tensor_split[:visible])
    if not any(w > 0 for w in weights):
        weights = [1.0] * visible
    total = sum(weights)
    shares = {gpu: (w / total if split_mode == "layer" else 0.0) for gpu, w in enumerate(weights) if w > 0}
    if split_mode == "row":
        shares[main_gpu] = 1.0
    return dict(sorted(shares.items()))
