"""A raw NIXL host-to-host copy between two agents in one process: the ceiling the
mesh's KV handoffs are compared with (same machine, same UCX backend, same run)."""

from __future__ import annotations

import time


def raw_copy_gbps(nbytes: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` GB/s of a NIXL READ of ``nbytes`` between two local agents."""
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    config = nixl_agent_config(backends=["UCX"])
    source = nixl_agent("bench-source", config)
    target = nixl_agent("bench-target", config)
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    source_regs = source.register_memory(src)
    target_regs = target.register_memory(dst)
    try:
        target.add_remote_agent(source.get_agent_metadata())
        best = float("inf")
        for _ in range(repeats):
            handle = target.initialize_xfer(
                "READ", target.get_xfer_descs(dst), source.get_xfer_descs(src), "bench-source"
            )
            start = time.perf_counter()
            state = target.transfer(handle)
            while state not in ("DONE", "ERR"):
                state = target.check_xfer_state(handle)
            elapsed = time.perf_counter() - start
            target.release_xfer_handle(handle)
            if state == "ERR":
                raise RuntimeError("NIXL transfer failed")
            best = min(best, elapsed)
        if not bool(torch.equal(src, dst)):
            raise RuntimeError("NIXL copy produced different bytes")
        return nbytes / best / 1e9
    finally:
        target.deregister_memory(target_regs)
        source.deregister_memory(source_regs)


if __name__ == "__main__":
    for size in (1 << 20, 16 << 20, 64 << 20):
        print(f"{size >> 20:4d} MiB: {raw_copy_gbps(size):.2f} GB/s")
