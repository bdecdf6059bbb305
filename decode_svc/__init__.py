"""The decode stage: a vLLM engine behind EngineService (see services/engine)."""
