"""The router's OpenAI-compatible HTTP API (the "HTTP bridge"), one module per job, in
the shape of vLLM's ``entrypoints/openai``:

- ``app``: the aiohttp application, its middleware and routes, start and stop;
- ``errors``: every failure as OpenAI's error body; ``guard``: origins, hosts, content
  types and connections; ``incoming``: bodies, callers, session keys;
- ``sse``: the one streaming loop;
- ``chat`` and ``completions``: their renderers over ``choices``, and handlers;
  ``protocol``: their request bodies;
- ``responses``: the Responses API's handlers, with its bodies
  (``responses_protocol``), its items and event state machine (``response_events``)
  and its store (``response_store``);
- ``admin``: models, tokenization, adapters, health and metrics.

Handlers parse, call :meth:`Pipeline.start <router_svc.pipeline.Pipeline.start>` (or
another pipeline method) once, and render; generation lives in the pipeline.
"""
