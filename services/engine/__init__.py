"""What the two engine stages (prefill, decode) share: config, the in-process vLLM
engine, sampling translation, KV-event bridging and the EngineService servicer.

Only the engine stages import this package; it pulls in vLLM and torch, which the
router, tokenizer and KV store never load.
"""
