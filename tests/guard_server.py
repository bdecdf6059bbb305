"""A small guard service for the tests (router_svc/guard.py's contract), run as its own
process: ``python -m tests.guard_server PORT LOG``. Every check it receives is appended
to LOG as a JSON line.

Its rules, on the request's JSON text: "forbidden" is denied (403), "slow down" is
denied as rate-limited (429), "rewrite me" becomes "Say yes." with at most 2 tokens, and
in the output phase a request that says "deny output" has its result denied.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from aiohttp import web


def decide(check: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(check["request"])
    if check["phase"] == "output":
        if "deny output" in text:
            return {"decision": "deny", "status": 403, "message": "output withheld"}
        return {"decision": "allow"}
    if "forbidden" in text:
        return {"decision": "deny", "status": 403, "message": "forbidden topic"}
    if "slow down" in text:
        return {"decision": "deny", "status": 429, "message": "too many requests for this user"}
    if "rewrite me" in text:
        request = dict(check["request"])
        request.pop("chat", None)
        request.pop("token_ids", None)
        request["text"] = "Say yes."
        request.setdefault("sampling", {})["max_tokens"] = 2
        return {"decision": "rewrite", "request": request}
    return {"decision": "allow"}


def main() -> None:
    port, log_path = int(sys.argv[1]), sys.argv[2]

    def record(body: dict[str, Any]) -> None:
        with open(log_path, "a") as log:
            log.write(json.dumps(body) + "\n")

    async def check(request: web.Request) -> web.Response:
        body = await request.json()
        record(body)  # before answering: the test reads the file after its call returns
        return web.json_response(decide(body))

    app = web.Application()
    app.router.add_post("/check", check)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
