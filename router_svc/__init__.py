"""The router stage: the mesh's public gRPC API and OpenAI-compatible HTTP bridge.

It finds every other stage through etcd, picks workers by load, runs prefill then
decode with the KV handle, and streams text back (see ``pipeline``; the HTTP API is
``http``).
"""
