"""A started request: what :meth:`Pipeline.start <router_svc.pipeline.Pipeline.start>`
yields, and what the gRPC service and the HTTP layer render.

Its deltas come from every sequence of the request at once (every prompt of a batch,
``n`` times), merged as they arrive; the last message carries the usage totals. The
audit line and the guard's output check happen here, when the stream ends, so a request
is recorded once however it is consumed (streamed, or joined by :meth:`Generation.result`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from router_svc.prepare import Prompt
from router_svc.tools import ToolPlan
from services.aio import merge
from services.errors import InvalidRequest
from services.pb import common_pb2, router_pb2

if TYPE_CHECKING:
    from router_svc.pipeline import Pipeline


class Generation:
    """A started request. Iterate for its deltas (indexed prompt-major: prompt ``p``'s
    sequence ``i`` is choice ``p * n + i``); the last message carries the usage totals."""

    def __init__(
        self,
        pipeline: Pipeline,
        prompts: list[tuple[router_pb2.RouterGenerateRequest, Prompt]],
        n: int,
        request_id: str,
        deadline: float,
        caller: str = "",
        plan: ToolPlan | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._caller = caller
        self._prompts = prompts
        #: Sequences per prompt (outputs run prompt-major, n per prompt).
        self.n = n
        #: The request's tool plan, with its model's parser (None without tools): what
        #: the HTTP layer reads tool calls out of the text with.
        self.plan = plan
        self._deadline = deadline
        self.request_id = request_id
        #: What the engines know the request's sequences by: a keyed caller's ids are
        #: named under its key, so no caller can take or block another's id.
        self._engine_id = f"{caller}.{request_id}" if caller else request_id
        self.model = prompts[0][1].model
        #: Outputs the request asked for: prompts times n.
        self.choices = len(prompts) * n

    async def __aiter__(self) -> AsyncGenerator[router_pb2.RouterGenerateResponse, None]:
        usage = common_pb2.Usage()
        workers: list[str] = []
        streams = [
            self._pipeline.run_sequence(
                request,
                prompt,
                i,
                p * self.n + i,
                f"{self._engine_id}-{p * self.n + i}",
                self._deadline,
                usage,
                workers,
            )
            for p, (request, prompt) in enumerate(self._prompts)
            for i in range(self.n)
        ]
        audit, guard = self._pipeline.audit, self._pipeline.guard
        kept = bool(audit) or guard.output
        outputs = [""] * self.choices if kept else []
        reasons = [""] * self.choices if kept else []
        started = time.monotonic()
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(merge(streams)) as deltas:
                async for delta in deltas:
                    delta.request_id = self.request_id
                    if kept:
                        outputs[delta.index] += delta.text
                        if delta.finish_reason:
                            reasons[delta.index] = common_pb2.FinishReason.Name(delta.finish_reason)
                    yield delta
            await guard.check_output(
                self._prompts[0][0], self.request_id, self._caller, self.model, outputs
            )
        except BaseException as exc:  # recorded (a cancelled request too), then raised on
            error = exc
            raise
        finally:
            audit.record(
                request_id=self.request_id,
                key_id=self._caller,
                model=self.model,
                requests=[request for request, _ in self._prompts],
                outputs=outputs,
                finish_reasons=reasons,
                usage=usage,
                started=started,
                workers=workers,
                error=error,
            )
        yield router_pb2.RouterGenerateResponse(usage=usage, request_id=self.request_id)

    async def prompt_texts(self) -> list[str]:
        """Each prompt's text, as a completion's ``echo`` shows it: the text sent, or the
        ids sent decoded as generated text is."""
        decoder = await self._pipeline.catalogue.decoder(self.model)
        return [
            request.text
            if request.WhichOneof("input") == "text"
            else decoder.decode(prompt.token_ids, request.sampling.skip_special_tokens)
            for request, prompt in self._prompts
        ]

    async def result(self) -> router_pb2.RouterGenerateResult:
        """The whole result at once: each sequence's deltas joined, up to
        ``--max-result-mib`` (larger answers must be streamed)."""
        result = router_pb2.RouterGenerateResult(model=self.model, request_id=self.request_id)
        completions = [router_pb2.Completion(index=i) for i in range(self.choices)]
        held, bound = 0, self._pipeline.max_result_bytes
        async with contextlib.aclosing(aiter(self)) as deltas:
            async for delta in deltas:
                if delta.HasField("usage"):
                    result.usage.CopyFrom(delta.usage)
                    continue
                held += delta.ByteSize()
                if held > bound:
                    raise InvalidRequest(
                        f"the answer is larger than the {bound >> 20} MiB the router holds for a "
                        "request that is not streamed; ask for it streamed (stream: true)"
                    )
                completion = completions[delta.index]
                completion.text += delta.text
                completion.token_ids.extend(delta.token_ids)
                completion.logprobs.extend(delta.logprobs)
                completion.prompt_logprobs.extend(delta.prompt_logprobs)
                if delta.finish_reason:
                    completion.finish_reason = delta.finish_reason
                    completion.stop_reason = delta.stop_reason
        result.completions.extend(completions)
        return result
