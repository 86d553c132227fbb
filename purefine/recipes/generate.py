"""The generate recipe (scripts/generate.py): complete prompts with a base model, an adapter or a run.

    python scripts/generate.py --run-dir outputs/demo --prompt "Give three tips for staying healthy."
    python scripts/generate.py --checkpoint-dir checkpoints/llama2-7b --adapter-dir out/adapter --quantize \\
        --template llama2-chat --system "Answer briefly." --prompts-file prompts.txt --temperature 0.7 --top-p 0.9

Prompts are rendered with the data layer's chat templates (``--template``; a run's default is
the template it trained with; ``raw`` encodes the prompt as plain text after BOS), batched with
left padding, and generated until EOS, the template's end-of-turn token, a ``--stop`` string or
``--max-new-tokens``. Completions are printed; ``--output`` also writes them as JSON lines
(``prompt``, ``completion``, ``tokens``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from purefine import data, fsutil, generate
from purefine.errors import ConfigError, DataError
from purefine.recipes.loading import (
    DType, ModelSource, check_source, compute_dtype, load_model, pick_device, require_tokenizer,
)

PLAIN = "plain"  # the prompt as plain text after BOS, no chat formatting (the data pipeline's "plain" too)


@dataclass(frozen=True)
class GenerateConfig(ModelSource):
    """Generate text from a model (a base checkpoint, optionally with an adapter, or a training run)."""

    prompt: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """A prompt (repeat the flag for several; they run as one batch)."""
    prompts_file: str | None = None
    """A file of prompts: one per line, or JSON lines with a "prompt" field (.jsonl)."""
    template: str | None = None
    """Chat template: tokenizer (its own chat template), alpaca, llama2-chat, chatml, llama3, or plain (the text after BOS); default: the run's, else the tokenizer's own, else plain."""
    system: str | None = None
    """A system message (chat templates; not plain)."""
    max_new_tokens: int = 128
    """Most tokens to generate per prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_k: int | None = None
    """Sample among the k most likely tokens only."""
    top_p: float | None = None
    """Sample from the smallest set of tokens whose probability reaches p (nucleus)."""
    seed: int = 0
    """Sampling seed (a run repeats exactly)."""
    stop: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Stop when the completion contains this string (repeatable); the string is cut off."""
    batch_size: int = 8
    """Prompts per batch."""
    dtype: DType = "auto"
    """Compute dtype: auto = bf16 on CUDA or for an NF4 base, else fp32."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    output: str | None = None
    """Also write the completions as JSON lines (prompt, completion, tokens) to this file."""


def check(cfg: GenerateConfig) -> None:
    """Flag errors before any model is loaded (ConfigError naming the flag)."""
    check_source(cfg)
    if not cfg.prompt and cfg.prompts_file is None:
        raise ConfigError("no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected a positive integer, found {cfg.max_new_tokens}")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, found {cfg.batch_size}")
    if cfg.temperature < 0:
        raise ConfigError(f"--temperature: expected >= 0, found {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise ConfigError(f"--top-k: expected a positive integer, found {cfg.top_k}")
    if cfg.top_p is not None and not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"--top-p: expected a probability in (0, 1], found {cfg.top_p}")
    if cfg.template is not None and cfg.template not in data.TEMPLATES:
        raise ConfigError(f"--template: unknown template {cfg.template!r}; expected one of {', '.join(data.TEMPLATES)}")
    if cfg.template in (PLAIN, "none") and cfg.system is not None:
        raise ConfigError("--system: the plain template has no system message; pick a chat --template")
    if any(not s for s in cfg.stop):
        raise ConfigError("--stop: an empty stop string would stop at once")


def read_prompts(path: str) -> list[str]:
    """The prompts of a file: JSON lines with a "prompt" string (.jsonl), else one prompt per non-empty line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--prompts-file {file}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"--prompts-file {file}: not UTF-8 text ({e})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if file.suffix != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"--prompts-file {file}: line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f"--prompts-file {file}: line {n}: expected an object with a \"prompt\" string, "
                            f"found {line[:80]!r}")
        prompts.append(row["prompt"])
    return prompts


def all_prompts(cfg: GenerateConfig) -> list[str]:
    """--prompt values, then the --prompts-file ones; an empty result is an error."""
    prompts = list(cfg.prompt) + (read_prompts(cfg.prompts_file) if cfg.prompts_file is not None else [])
    if not prompts:
        raise DataError(f"--prompts-file {cfg.prompts_file}: holds no prompts")
    return prompts


def prompt_tokens(prompt: str, template: str, tokenizer: data.Tokenizer, system: str | None = None) -> list[int]:
    """A prompt's ids: BOS + the text for ``plain``, else the template's rendering of [system,] user,
    ending with the assistant header (``data.prompt_ids``), exactly as training encoded prompts."""
    if template in (PLAIN, "none"):
        return tokenizer.encode(prompt, bos=True)
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    messages = [*system_turn, {"role": "user", "content": prompt}]
    return data.prompt_ids(messages, template, tokenizer)


def end_of_turn_ids(template: Any, tokenizer: data.Tokenizer) -> list[int]:
    """The special tokens that close an assistant turn under ``template``: a hand-written template's
    ``stop_tokens`` (``<|im_end|>``, ``<|eot_id|>``); for the tokenizer's own chat template, the last
    trained token of a rendered assistant turn when it is a special token."""
    if isinstance(template, data.Template):
        return [i for t in template.stop_tokens if (i := tokenizer.token_to_id(t)) is not None]
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, trained = data.chat_template.tokenize_chat(turn, template, tokenizer)
    last = [i for i, keep in zip(ids, trained) if keep][-1:]
    return [i for i in last if i in set(tokenizer.special_tokens.values())]


def stop_ids(cfg: Any, tokenizer: data.Tokenizer, template: str) -> tuple[int, ...]:
    """Token ids that end a completion: the model config's eos ids, the tokenizer's EOS and the
    template's end-of-turn tokens."""
    ids = list(generate.default_eos_ids(cfg)) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    if template not in (PLAIN, "none"):
        ids += end_of_turn_ids(data.formats.resolve_template(template, tokenizer), tokenizer)
    return tuple(dict.fromkeys(ids))


def default_template(cfg: GenerateConfig, loaded: Any, tokenizer: data.Tokenizer) -> str:
    """--template, else the template the run trained with (a --run-dir, or an --adapter-dir inside a
    run's output directory), else the tokenizer's own chat template, else plain."""
    if cfg.template is not None:
        return cfg.template
    if loaded.template is not None:
        return loaded.template
    run = Path(cfg.adapter_dir).parent / "config.yaml" if cfg.adapter_dir is not None else None
    if run is not None and run.is_file():
        from purefine.config import load_preset

        return load_preset(str(run)).data.template
    return "tokenizer" if data.chat_template.ChatTemplate.of(tokenizer) is not None else PLAIN


def main(cfg: GenerateConfig) -> list[dict]:
    """Generate for every prompt, print the completions (and write --output); returns
    [{"prompt", "completion", "tokens"}] in prompt order."""
    check(cfg)
    prompts = all_prompts(cfg)
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device, cfg.quantize)
    loaded = load_model(cfg, device=device, dtype=dtype)
    tokenizer = require_tokenizer(loaded)
    template = default_template(cfg, loaded, tokenizer)
    encoded = [prompt_tokens(p, template, tokenizer, cfg.system) for p in prompts]
    eos = stop_ids(loaded.cfg, tokenizer, template)
    params = generate.cast_params(loaded.params, dtype)
    results = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = encoded[start: start + cfg.batch_size]
        outputs = generate.generate(loaded.cfg, params, batch, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_ids=eos,
                                    stop=cfg.stop, decode=tokenizer.decode, seed=cfg.seed + start)
        for prompt, tokens in zip(prompts[start: start + cfg.batch_size], outputs):
            completion = generate.trim_stop(tokenizer.decode(tokens), cfg.stop)
            results.append({"prompt": prompt, "completion": completion, "tokens": tokens})
            print(f">>> {prompt}\n{completion}\n", flush=True)
    if cfg.output is not None:
        fsutil.atomic_write(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    return results
