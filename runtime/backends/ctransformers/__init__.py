"""The legacy ctransformers backend: the old GGML families, one library instance per slot, in a
worker process so that a native crash fails only the requests it held.

- ``backend``: CTransformersBackend, the Backend protocol over the worker process.
- ``process`` (parent side) and ``worker`` (``python -m runtime.backends.ctransformers.worker``).
- ``model_file``: what a model file is (GGUF or legacy GGML) and what it costs.
- ``cells`` and ``sampling``: per-slot token bookkeeping and the sampler ctransformers lacks.
- ``convert``: ``slotserve convert --for ctransformers``.
"""
