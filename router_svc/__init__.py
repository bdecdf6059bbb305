"""The router stage: the mesh's public gRPC API and OpenAI-compatible HTTP bridge.

It finds every other stage through etcd, picks workers by load, runs prefill then
decode with the KV handle, and streams text back (the HTTP API is ``http``). A
request's path starts at
``pipeline.Pipeline.start``; docs/design.md ("Life of a request") names the module of
each step.
"""
