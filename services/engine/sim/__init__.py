"""A simulated engine: vLLM's scheduler shape, a real paged prefix cache and real KV
events, with step times from a timing model instead of a model run.

It serves the same EngineService and Member record as a vLLM engine, so the router,
tokenizer, KV store and clients treat it as one (its record carries ``engine=sim``).
It is for width: capacity planning, routing research and tests of the mesh's own parts
at 32-64 engines on a small host, as Dynamo's mocker and llm-d's inference simulator
are for theirs. It computes no model: its token ids are a deterministic function of the
context, and its figures say nothing about a model's speed beyond its timing profile.
No torch or vLLM here.
"""
