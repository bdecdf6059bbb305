"""The OpenAI Agents SDK, as an agent author uses it, against the session mesh.

An agent with an ``output_type`` and ``tool_choice="required"`` makes the SDK send
``response_format`` (or the Responses API's ``text.format``) together with a required
tool choice. OpenAI and vLLM accept that: the tool choice governs the turn. The agent
must call its tool on the first turn, get the result, and end with an answer that
parses as its output type, over chat completions and over the Responses API.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx2
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from pydantic import BaseModel

from tests.support.stages import Mesh

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Forecast(BaseModel):
    """The agent's answer (bounded choices keep a 135M model's JSON short)."""

    city: Literal["Paris", "Rome", "Oslo"]
    sky: Literal["sunny", "cloudy", "rain"]


def weather_agent(model: OpenAIChatCompletionsModel | OpenAIResponsesModel) -> tuple[Agent, list]:
    """The agent, and the list its tool records its calls in."""
    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """The weather in a city now."""
        calls.append(city)
        return f"It is sunny in {city}."

    agent = Agent(
        name="forecaster",
        instructions="Look the weather up with get_weather, then answer.",
        tools=[get_weather],
        output_type=Forecast,
        model=model,
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
    )
    return agent, calls


def recording_client(mesh: Mesh, bodies: list[dict[str, Any]]) -> openai.AsyncOpenAI:
    """The SDK's OpenAI client, keeping every request body it sends."""

    async def keep(request: httpx2.Request) -> None:
        if request.method == "POST":
            bodies.append(json.loads(request.content))

    return openai.AsyncOpenAI(
        base_url=f"{mesh.http_url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=300,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [keep]}),
    )


async def served_model(client: openai.AsyncOpenAI) -> str:
    """The name of the model the mesh serves (the SDK sends it as it is)."""
    return (await client.models.list()).data[0].id


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_an_agent_with_an_output_type_and_a_required_tool(mesh: Mesh, api: str) -> None:
    """The agent calls its tool, then answers as its output type; its first request
    carried the output format with the required tool choice."""
    bodies: list[dict[str, Any]] = []
    client = recording_client(mesh, bodies)
    name = await served_model(client)
    model = (
        OpenAIChatCompletionsModel(model=name, openai_client=client)
        if api == "chat"
        else OpenAIResponsesModel(model=name, openai_client=client)
    )
    agent, calls = weather_agent(model)
    result = await Runner.run(
        agent,
        "What is the weather in Paris?",
        max_turns=4,
        run_config=RunConfig(tracing_disabled=True),
    )
    assert isinstance(result.final_output, Forecast)
    assert len(calls) >= 1 and all(city in ("Paris", "Rome", "Oslo") for city in calls)
    first = bodies[0]
    # What made the bridge answer 400 before: an output format with a required tool.
    assert first["tool_choice"] == "required"
    if api == "chat":
        assert first["response_format"]["type"] == "json_schema"
    else:
        assert first["text"]["format"]["type"] == "json_schema"
