"""Ending a finished prefill's KV lease early, from inside vLLM's engine core.

A prefill engine keeps a finished prompt's KV blocks for the decode engine that is to
pull them over NIXL, and vLLM's NixlConnector frees them on the decode side's read
notification or when the lease (``--kv-lease-seconds``) runs out. When the router
knows no decode engine will come (the client left, the decode side failed before it
read, no decode member is left), the blocks would sit idle for the rest of the lease,
taking cache space from new prompts. An abort cannot free them: the request has
already finished in the scheduler.

:func:`end_kv_leases` runs in the engine core (``AsyncLLM.collective_rpc`` takes a
cloudpickled function, which pickles by reference to this module) and moves those
requests' leases to now. The connector then frees them on its next step through its
own expiry path, with its own bookkeeping: nothing else in vLLM is changed. The lease
table is the NIXL worker's private state, so the test of this module
(``tests/test_engines.py``) is what notices if a vLLM upgrade moves it.
"""

from __future__ import annotations

from typing import Any

import cloudpickle
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector
from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group


def end_kv_leases(worker: Any, request_ids: list[str]) -> list[str]:
    """End the NIXL send leases of ``request_ids``; returns those the connector held.

    An id the connector does not hold (yet) is left out: the worker learns of a
    finished prefill one engine step after the scheduler, so a caller retries those.
    """
    del worker  # collective_rpc passes the worker first; the connector is global
    group = get_kv_transfer_group()
    connectors = getattr(group, "sub_connectors", [group])  # MultiConnector, or NixlConnector alone
    released: list[str] = []
    for connector in connectors:
        if not isinstance(connector, NixlConnector) or connector.connector_worker is None:
            continue
        leases: dict[str, float] = connector.connector_worker._reqs_to_send
        for request_id in request_ids:
            if request_id in leases:
                leases[request_id] = 0.0  # expired: freed at the connector's next step
                released.append(request_id)
    return released


#: :func:`end_kv_leases` as ``collective_rpc`` takes a function.
END_KV_LEASES = cloudpickle.dumps(end_kv_leases)
