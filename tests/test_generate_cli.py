"""scripts/generate.py: a base checkpoint + adapter (or a training run) generates exactly what
``purefine.generate`` generates on the merged params; bad flags are one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from purefine import checkpoint, data, generate, lora, models, tree
from purefine.config import TrainConfig, to_yaml
from purefine.errors import DataError
from purefine.recipes import run
from purefine.recipes.generate import PLAIN, GenerateConfig, main, prompt_tokens, read_prompts, stop_ids
from tests.conftest import ROOT, make_hf_llama

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived", "Hi"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(base dir with the demo tokenizer, adapter dir, config, LoRA params) of a tiny random Llama."""
    root = tmp_path_factory.mktemp("generate")
    base = root / "base"
    make_hf_llama(base, vocab_size=1024)
    shutil.copyfile(data.DEMO_TOKENIZER, base / "tokenizer.model")
    cfg, params = checkpoint.load_hf(base)
    params = lora.apply(params, rank=4, alpha=8, where=["q_proj", "v_proj", "down_proj"], seed=2)
    gen = torch.Generator().manual_seed(0)
    params = tree.map_with_path(lambda p, x: torch.randn(x.shape, generator=gen) * 0.5 if p.endswith("lora_b") else x,
                                params)
    adapter = checkpoint.save_peft(root / "adapter", cfg, params, base_model=str(base))
    return base, adapter, cfg, params


def reference(cfg, params, prompts: list[list[int]], max_new_tokens: int, eos: tuple[int, ...]) -> list[list[int]]:
    """Greedy tokens of purefine.generate on the merged params, one prompt at a time (no padding)."""
    merged = lora.merge(params)
    return [generate.generate(cfg, merged, [p], max_new_tokens=max_new_tokens, eos_ids=eos)[0] for p in prompts]


def test_script_greedy_equals_generate_on_merged_params(model, tmp_path):
    base, adapter, cfg, params = model
    out = tmp_path / "out.jsonl"
    args = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint-dir", str(base), "--adapter-dir",
            str(adapter), "--max-new-tokens", "12", "--device", "cpu", "--output", str(out)]
    for p in PROMPTS:
        args += ["--prompt", p]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = data.load_tokenizer(base)
    prompts = [tokenizer.encode(p, bos=True) for p in PROMPTS]  # plain: BOS + the text
    want = reference(cfg, params, prompts, 12, stop_ids(cfg, tokenizer, PLAIN))
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == want
    assert want != reference(cfg, checkpoint.load_hf(base)[1], prompts, 12, ())  # the adapter matters
    for r in rows:
        assert r["completion"] == tokenizer.decode(r["tokens"])
        assert f">>> {r['prompt']}\n{r['completion']}\n" in proc.stdout


def test_chat_template_system_and_prompts_file(model, tmp_path, capsys):
    base, adapter, cfg, params = model
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    rows = main(GenerateConfig(checkpoint_dir=str(base), adapter_dir=str(adapter), prompts_file=str(file),
                               prompt=(PROMPTS[2],), template="chatml", system="Be brief.", max_new_tokens=6,
                               batch_size=2, device="cpu"))
    tokenizer = data.load_tokenizer(base)
    order = [PROMPTS[2], *PROMPTS[:2]]
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in order]
    prompts = [data.prompt_ids(m, "chatml", tokenizer) for m in messages]
    assert prompts[0] == prompt_tokens(order[0], "chatml", tokenizer, "Be brief.")
    assert [r["tokens"] for r in rows] == reference(cfg, params, prompts, 6, stop_ids(cfg, tokenizer, "chatml"))


def test_stop_strings_cut_the_completion(model):
    base, adapter, cfg, params = model
    first = main(GenerateConfig(checkpoint_dir=str(base), adapter_dir=str(adapter), prompt=(PROMPTS[0],),
                                max_new_tokens=12, device="cpu"))[0]
    stop = first["completion"][3:5]
    assert stop.strip() and stop in first["completion"]
    cut = main(GenerateConfig(checkpoint_dir=str(base), adapter_dir=str(adapter), prompt=(PROMPTS[0],),
                              max_new_tokens=12, stop=(stop,), device="cpu"))[0]
    assert cut["completion"] == first["completion"][: first["completion"].find(stop)]
    assert len(cut["tokens"]) < len(first["tokens"])


def test_run_dir_uses_the_runs_adapter_and_template(model, tmp_path):
    base, adapter, cfg, params = model
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train_cfg = TrainConfig(checkpoint_dir=str(base), peft="lora", output_dir=str(run_dir))
    train_cfg = TrainConfig(**{**train_cfg.__dict__, "data": type(train_cfg.data)(template="llama2-chat")})
    (run_dir / "config.yaml").write_text(to_yaml(train_cfg))
    shutil.copytree(adapter, run_dir / "adapter")
    rows = main(GenerateConfig(run_dir=str(run_dir), prompt=(PROMPTS[0],), max_new_tokens=5, device="cpu"))
    tokenizer = data.load_tokenizer(base)
    prompt = data.prompt_ids([{"role": "user", "content": PROMPTS[0]}], "llama2-chat", tokenizer)
    assert rows[0]["tokens"] == reference(cfg, params, [prompt], 5, stop_ids(cfg, tokenizer, "llama2-chat"))[0]


def test_quantized_base_generates_with_the_nf4_model(model):
    base, adapter, cfg, _ = model
    rows = main(GenerateConfig(checkpoint_dir=str(base), adapter_dir=str(adapter), quantize=True,
                               prompt=(PROMPTS[0],), max_new_tokens=5, device="cpu"))
    _, nf4_params = checkpoint.load_hf(base, dtype=torch.bfloat16, quantize=models.quantize_pattern(cfg))
    nf4_params = generate.cast_params(checkpoint.load_peft(adapter, nf4_params), torch.bfloat16)
    tokenizer = data.load_tokenizer(base)
    want = generate.generate(cfg, nf4_params, [tokenizer.encode(PROMPTS[0], bos=True)], max_new_tokens=5,
                             eos_ids=stop_ids(cfg, tokenizer, PLAIN))
    assert rows[0]["tokens"] == want[0]


def test_read_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second  \n")
    assert read_prompts(str(text)) == ["first prompt", "  second  "]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl: line 2"):
        read_prompts(str(bad))
    with pytest.raises(DataError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("args, message", [
    ([], "no prompt given"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "x", "--top-k", "0"], "--top-k"),
    (["--prompt", "x", "--template", "nope"], "--template: unknown template 'nope'"),
    (["--prompt", "x", "--template", "plain", "--system", "s"], "--system"),
    (["--prompt", "x", "--temperature", "warm"], "temperature"),
    (["--prompt", "x", "--bogus-flag"], "bogus"),
    (["--prompt", "x", "--stop", ""], "--stop"),
    (["--prompts-file", "missing.txt"], "missing.txt: file not found"),
])
def test_bad_flags_exit_2(model, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(main, GenerateConfig, args=["--checkpoint-dir", str(model[0]), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_script_bad_flag_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint-dir", str(tmp_path),
                           "--prompt", "x", "--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --top-p")
