"""The decode stage: its handlers (`handlers.py`) over the shared engine runtime in
`services/engine/`."""
