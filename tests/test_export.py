"""scripts/export.py: merged HF exports that transformers loads, and adapter exports that peft loads,
compared with purefine's own LoRA / DoRA / QLoRA models (fp32 logits within 1e-4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from purefine import checkpoint, data, lora, models, nf4, tree
from purefine.config import TrainConfig, to_yaml
from purefine.errors import ConfigError
from purefine.recipes import run
from purefine.recipes.export import ExportConfig, main
from tests.conftest import make_hf_llama

TOL = 1e-4
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4], [3, 3, 81, 90, 12, 6, 7, 1]])
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random HF Llama with the demo tokenizer.model beside it."""
    path = tmp_path_factory.mktemp("export") / "base"
    make_hf_llama(path, vocab_size=1024)
    shutil.copyfile(data.DEMO_TOKENIZER, path / "tokenizer.model")
    return path


def trained(params: dict, *, dora: bool, seed: int = 1) -> dict:
    """LoRA (DoRA) leaves on TARGETS with random B and magnitudes, as if trained."""
    params = lora.apply(params, rank=4, alpha=8, where=TARGETS, dora=dora, seed=seed)
    gen = torch.Generator().manual_seed(seed)

    def perturb(path: str, x: torch.Tensor) -> torch.Tensor:
        if path.endswith("lora_b"):
            return torch.randn(x.shape, generator=gen, dtype=x.dtype) * 0.2
        if path.endswith("magnitude"):
            return x * (1 + 0.1 * torch.rand(x.shape, generator=gen, dtype=x.dtype))
        return x

    return tree.map_with_path(perturb, params)


def adapter_dir(tmp_path: Path, base_dir: Path, *, dora: bool, quantize: bool = False) -> tuple[Path, dict]:
    """Save trained adapters of the base (NF4 with ``quantize``) -> (adapter dir, purefine params)."""
    if quantize:
        pattern = models.quantize_pattern(checkpoint.read_config(base_dir)[0])
        _, params = checkpoint.load_hf(base_dir, dtype=torch.bfloat16, quantize=pattern)
    else:
        _, params = checkpoint.load_hf(base_dir)
    params = trained(params, dora=dora)
    cfg, _ = checkpoint.read_config(base_dir)
    path = checkpoint.save_peft(tmp_path / "adapter", cfg, params, base_model=str(base_dir))
    return path, params


def purefine_logits(cfg, params: dict) -> torch.Tensor:
    """fp32 logits of purefine's model; NF4 bases dequantized (what the exported merge computes)."""
    params = nf4.dequantize(params, torch.float32)
    params = tree.map(lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, params)
    params = tree.map(lambda x: x.astype(torch.float32) if lora.is_lora(x) else x, params, is_leaf=tree.is_leaf)
    with torch.no_grad():
        return models.forward(cfg, params, TOKENS).float()


def transformers_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_export_loads_in_transformers(base_dir, tmp_path, dora):
    adapter, params = adapter_dir(tmp_path, base_dir, dora=dora)
    out = main(ExportConfig(checkpoint_dir=str(base_dir), adapter_dir=str(adapter), output_dir=str(tmp_path / "out"),
                            dtype="fp32"))
    cfg, _ = checkpoint.read_config(base_dir)
    want = purefine_logits(cfg, params)
    got = transformers_logits(out)
    assert (got - want).abs().max() < TOL
    assert (want - transformers_logits(base_dir)).abs().max() > 1e-2  # the adapter changed the model
    assert (out / "tokenizer.model").read_bytes() == data.DEMO_TOKENIZER.read_bytes()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
        assert not any("lora" in k for k in f.keys())


def test_bf16_export_is_the_fp32_export_rounded(base_dir, tmp_path):
    adapter, _ = adapter_dir(tmp_path, base_dir, dora=False)
    common = dict(checkpoint_dir=str(base_dir), adapter_dir=str(adapter))
    fp32 = main(ExportConfig(**common, output_dir=str(tmp_path / "fp32"), dtype="fp32"))
    bf16 = main(ExportConfig(**common, output_dir=str(tmp_path / "bf16"), dtype="bf16"))
    auto = main(ExportConfig(**common, output_dir=str(tmp_path / "auto")))  # the base is stored in fp32
    assert json.loads((auto / "config.json").read_text())["torch_dtype"] == "float32"
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with (safe_open(fp32 / "model.safetensors", framework="pt") as a,
          safe_open(bf16 / "model.safetensors", framework="pt") as b):
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert b.get_tensor(k).dtype == torch.bfloat16
            assert torch.equal(a.get_tensor(k).to(torch.bfloat16), b.get_tensor(k))


@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_qlora_export_equals_dequantized_model(base_dir, tmp_path, dora):
    adapter, params = adapter_dir(tmp_path, base_dir, dora=dora, quantize=True)
    out = main(ExportConfig(checkpoint_dir=str(base_dir), adapter_dir=str(adapter), quantize=True,
                            output_dir=str(tmp_path / "out"), dtype="fp32"))
    cfg, _ = checkpoint.read_config(base_dir)
    assert all(nf4.is_nf4(leaf.base) for leaf in lora.adapters(params).values())
    got = transformers_logits(out)
    assert (got - purefine_logits(cfg, params)).abs().max() < TOL
    _, original = checkpoint.load_hf(base_dir)
    with safe_open(out / "model.safetensors", framework="pt") as f:  # k_proj: no adapter, NF4 dequantized
        k = "model.layers.0.self_attn.k_proj.weight"
        exported, source = f.get_tensor(k), tree.flatten(original)[k]
    assert torch.equal(exported, nf4.quantize_tensor(source.to(torch.bfloat16)).dense(torch.float32))
    assert not torch.equal(exported, source)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_export_loads_in_peft(base_dir, tmp_path, dora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, params = adapter_dir(tmp_path, base_dir, dora=dora)
    out = main(ExportConfig(checkpoint_dir=str(base_dir), adapter_dir=str(adapter), format="peft",
                            output_dir=str(tmp_path / "peft"), base_model="owner/tiny-llama"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "owner/tiny-llama" and config["use_dora"] is dora
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out).eval()
    with torch.no_grad():
        got = model(TOKENS).logits.float()
    cfg, _ = checkpoint.read_config(base_dir)
    assert (got - purefine_logits(cfg, params)).abs().max() < TOL


def write_run(run_dir: Path, cfg: TrainConfig, params: dict, model_cfg) -> None:
    """What scripts/train.py leaves behind for a PEFT run: config.yaml and adapter/."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    checkpoint.save_peft(run_dir / "adapter", model_cfg, params, base_model=cfg.checkpoint_dir or cfg.model)


@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_export_from_a_random_init_run(tmp_path, peft):
    """A demo-style run (a preset's seeded random init, NF4 for QLoRA): the base is rebuilt from config.yaml."""
    from purefine.recipes.setup import load_model

    cfg = TrainConfig(model="llama-debug", peft=peft, seed=7, init="random", output_dir=str(tmp_path / "run"))
    model_cfg, base = load_model(cfg, torch.device("cpu"))
    params = trained(base, dora=False, seed=3)
    write_run(tmp_path / "run", cfg, params, model_cfg)
    out = main(ExportConfig(run_dir=str(tmp_path / "run"), output_dir=str(tmp_path / "out"), dtype="fp32"))
    assert (transformers_logits(out) - purefine_logits(model_cfg, params)).abs().max() < TOL
    assert (out / "tokenizer.model").read_bytes() == data.DEMO_TOKENIZER.read_bytes()


def test_full_finetune_run_exports_its_model(base_dir, tmp_path):
    """A --peft none run leaves model/ (with its tokenizer): --format hf re-writes it, --format peft refuses."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrainConfig(checkpoint_dir=str(base_dir), peft="none", output_dir=str(run_dir))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    model_cfg, params = checkpoint.load_hf(base_dir)
    params = tree.map(lambda x: x * 1.5 if x.ndim == 2 else x, params)  # "trained"
    checkpoint.save_hf(run_dir / "model", model_cfg, params,
                       extra_files={"tokenizer.model": base_dir / "tokenizer.model"})
    out = main(ExportConfig(run_dir=str(run_dir), output_dir=str(tmp_path / "out"), dtype="fp32"))
    assert (transformers_logits(out) - purefine_logits(model_cfg, params)).abs().max() < TOL
    assert (out / "tokenizer.model").exists()
    with pytest.raises(ConfigError, match="no adapter"):
        main(ExportConfig(run_dir=str(run_dir), output_dir=str(tmp_path / "peft"), format="peft"))


def test_export_refuses_to_overwrite(base_dir, tmp_path):
    adapter, _ = adapter_dir(tmp_path, base_dir, dora=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = ExportConfig(checkpoint_dir=str(base_dir), adapter_dir=str(adapter), output_dir=str(out))
    with pytest.raises(ConfigError, match="--overwrite"):
        main(cfg)
    assert (out / "keep.txt").read_text() == "mine"
    main(ExportConfig(checkpoint_dir=str(base_dir), adapter_dir=str(adapter), output_dir=str(out), overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_failed_export_leaves_nothing(base_dir, tmp_path, monkeypatch):
    import purefine.checkpoint.hf as hf

    adapter, _ = adapter_dir(tmp_path, base_dir, dora=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", broken)
    with pytest.raises(OSError):
        main(ExportConfig(checkpoint_dir=str(base_dir), adapter_dir=str(adapter), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("args, message", [
    (["--output-dir", "o"], "no model given"),
    (["--checkpoint-dir", "c"], "--output-dir: required"),
    (["--run-dir", "r", "--checkpoint-dir", "c", "--output-dir", "o"], "--checkpoint-dir: not allowed with --run-dir"),
    (["--run-dir", "r", "--quantize", "--output-dir", "o"], "--quantize"),
    (["--checkpoint-dir", "c", "--output-dir", "o", "--dtype", "fp16"], "dtype"),
    (["--checkpoint-dir", "c", "--output-dir", "o", "--format", "gguf"], "format"),
    (["--checkpoint-dir", "nowhere", "--output-dir", "o"], "nowhere"),
    (["--run-dir", "nowhere", "--output-dir", "o"], "nowhere"),
])
def test_bad_flags_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(main, ExportConfig, args=args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_peft_format_needs_an_adapter(base_dir, tmp_path):
    with pytest.raises(ConfigError, match="no adapter"):
        main(ExportConfig(checkpoint_dir=str(base_dir), output_dir=str(tmp_path / "o"), format="peft"))
