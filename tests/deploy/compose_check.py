"""The checks ``make test-compose`` runs against a mesh that ``docker compose up`` started
(tests/deploy/compose_test.sh does the rest: the daemon, the images, up, down).

Through the published router port, with the OpenAI SDK: greedy answers equal what
transformers generates from the bundled model on this host, on compose's P/D layout
with the KV store holding the prompts' blocks. Inside the containers: each stage holds
only its own certificate and key and the CA certificate, and etcd refuses a stage that
writes another role's key. Then the decode container is killed: compose restarts it
and the mesh answers again by itself.

    python -m tests.deploy.compose_check --url http://127.0.0.1:8000/v1 --api-key KEY
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import openai

from services.config import DEFAULT_HOME
from services.model import prepare_bundled_model

MAX_TOKENS = 16
PASSAGE = (
    "The Rhine is a river that begins in the Swiss Alps and flows north through Germany "
    "and the Netherlands before reaching the North Sea. Cities such as Basel, Strasbourg, "
    "Cologne and Rotterdam grew along its banks because it carried trade for centuries. "
)
#: Short, and several KV blocks long (the CPU block size is 128 tokens).
QUESTIONS = ("What is the capital of France?", PASSAGE * 5 + "Name one city on the Rhine.")
STAGES = ("tokenizer", "router", "prefill", "decode", "kvstore")


def compose(*args: str, check: bool = True) -> str:
    """``docker compose ARGS`` in the project (the environment names the daemon): its
    output, and with ``check=False`` its errors too."""
    done = subprocess.run(
        ["docker", "compose", *args], capture_output=True, text=True, timeout=600, check=False
    )
    if check and done.returncode != 0:
        raise SystemExit(f"docker compose {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout if check else done.stdout + done.stderr


def references() -> dict[str, str]:
    """What transformers answers, greedy in float32, to each question as a chat."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare_bundled_model(Path(os.environ.get("STAGEMESH_HOME", DEFAULT_HOME)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = {}
    for question in QUESTIONS:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(rendered, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        answers[question] = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    return answers


def check_answers(client: openai.OpenAI, expected: dict[str, str]) -> None:
    """Each question's greedy chat answer through the router equals transformers'."""
    for question, reference in expected.items():
        reply = client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        got = reply.choices[0].message.content
        assert got == reference, f"{question[:40]!r}: mesh {got!r} != transformers {reference!r}"
        print(f"  {len(question):>5} chars: {got!r} (equals transformers)")


def check_kvstore_holds_blocks() -> None:
    """The KV store has the prompts' blocks: prefill stored them there over NIXL."""
    status = compose("exec", "-T", "router", "stagemesh", "status", "--etcd", "etcd:2379")
    used = re.search(r"kvstore.*?blocks (\d+)/(\d+)", status)
    assert used and int(used.group(1)) > 0, f"the KV store holds no blocks:\n{status}"
    print(f"  the KV store holds {used.group(1)} of {used.group(2)} blocks")


def check_credentials_apart() -> None:
    """Each stage sees its own certificate and key and the CA certificate, nothing else;
    etcd turns away a stage that writes another role's member key."""
    for stage in STAGES:
        files = compose("exec", "-T", stage, "ls", "/var/lib/stagemesh/tls").split()
        assert sorted(files) == sorted(["ca.pem", f"{stage}.pem", f"{stage}-key.pem"]), (
            stage,
            files,
        )
    tls = "/var/lib/stagemesh/tls"
    forged = compose(
        "exec", "-T", "tokenizer", "etcdctl", "--endpoints=https://etcd:2379",
        f"--cacert={tls}/ca.pem", f"--cert={tls}/tokenizer.pem", f"--key={tls}/tokenizer-key.pem",
        "put", "/stagemesh/v1/members/decode/forged", "x",
        check=False,
    )  # fmt: skip
    assert "permission denied" in forged, f"the tokenizer wrote a decode member key: {forged}"
    print("  credentials apart; etcd refused a forged decode member")


def container_state(service: str) -> tuple[int, int, str]:
    """The service's container: its main process (as this host sees it), how often
    Docker restarted it, and its health."""
    (container,) = compose("ps", "-q", service).split()
    inspected = subprocess.run(
        ["docker", "inspect", container], capture_output=True, text=True, check=True
    )
    found = json.loads(inspected.stdout)[0]
    health = found["State"].get("Health") or {}
    return int(found["State"]["Pid"]), int(found["RestartCount"]), str(health.get("Status"))


def wait_for(what: str, ready: Callable[[], bool], timeout: float) -> float:
    """Poll ``ready`` until it holds (the seconds that took), or end the check."""
    started = time.monotonic()
    while not ready():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{what}: not within {timeout:.0f}s")
        time.sleep(2)
    return time.monotonic() - started


def check_decode_comes_back(client: openai.OpenAI, expected: dict[str, str]) -> None:
    """A crashed decode container is restarted by compose and serves again by itself."""
    pid, restarts, _ = container_state("decode")
    os.kill(pid, 9)  # a crash, not a stop: the restart policy applies
    print(f"  killed decode's process {pid}")

    def healthy_again() -> bool:
        _, now, health = container_state("decode")
        return now > restarts and health == "healthy"

    took = wait_for("decode restarted and healthy", healthy_again, 900)
    print(f"  compose restarted decode; healthy after {took:.0f}s")
    check_answers(client, expected)


def main() -> None:
    """Every check, in order; the first that fails ends the run with its reason."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    expected = references()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key, timeout=300, max_retries=0)
    print("greedy answers through the published port:")
    check_answers(client, expected)
    check_kvstore_holds_blocks()
    check_credentials_apart()
    print("decode killed:")
    check_decode_comes_back(client, expected)


if __name__ == "__main__":
    main()
