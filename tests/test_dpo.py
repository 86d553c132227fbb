"""--task dpo: each preference loss and reward metric against TRL's own code on the same tiny
transformers model and batch; a DPO run on the bundled pairs that peft loads (adapter off = the
reference); full fine-tuning's precomputed reference; bad rows named (exit 2); exact resume; and
two processes (FSDP, gloo) equal to one."""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from purefine import checkpoint, lora, preference, tree
from purefine.config import DpoConfig, LoraConfig, OptimConfig, TrainConfig
from purefine.data import DataConfig
from purefine.recipes.tasks import dpo, preference_data
from purefine.recipes.train import main
from tests.conftest import make_hf_llama
from tests.test_shard_parallel import one_thread, torchrun

trl = pytest.importorskip("trl")
TOLERANCE = 1e-5
METRICS = preference.METRICS


# ------------------------------------------------------------------------------------- the models

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random transformers Llama (the reference), our LoRA params over it with non-zero B
    (the policy), and the policy merged into a second transformers model."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf") / "llama"
    reference = make_hf_llama(path, seed=3)
    model_cfg, params = checkpoint.load_hf(path)
    params = lora.apply(params, rank=4, alpha=8, where=["q_proj", "v_proj", "down_proj"], seed=0)
    gen = torch.Generator().manual_seed(1)
    params = tree.map(lambda x: lora.LoRA(x.base, x.lora_a, torch.randn(x.lora_b.shape, generator=gen) * 0.3,
                                          None, x.alpha) if lora.is_lora(x) else x, params, is_leaf=tree.is_leaf)
    from trl.trainer.utils import add_fused_lm_head

    policy = LlamaForCausalLM(reference.config).eval()
    policy.load_state_dict(tree.flatten(lora.merge(params)))
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer does
    add_fused_lm_head(reference)  # (a plain call still runs the model's own forward)
    return {"cfg": model_cfg, "params": params, "policy": policy, "reference": reference}


def random_pairs(seed: int, n: int = 5, *, prompt_len: int | None = None, chosen_len: int | None = None) -> list:
    """[(prompt ids, chosen ids, rejected ids)] of varied lengths (fixed ones where given)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, 96, (k,), generator=g).tolist()

    return [(ids(prompt_len or 2 + i % 3), ids(chosen_len or 1 + (2 * i) % 5), ids(1 + (3 * i + 2) % 6))
            for i in range(n)]


def our_batch(pairs: list) -> dict:
    """The pairs as the DPO task batches them: right-padded (B, T) sides, labels on the completions."""
    t = max(len(p) + len(c) for p, *cr in pairs for c in cr)

    def side(k: int) -> dict:
        tokens = torch.zeros(len(pairs), t, dtype=torch.long)
        labels = torch.full((len(pairs), t), -100)
        for i, (prompt, *completions) in enumerate(pairs):
            seq = prompt + completions[k]
            tokens[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(completions[k])
        return {"tokens": tokens, "labels": labels, "positions": torch.arange(t).expand(len(pairs), t)}

    return {"chosen": side(0), "rejected": side(1), "index": torch.arange(len(pairs))}


def ours(models: dict, pairs: list, **options: object) -> tuple[float, dict[str, float]]:
    """(mean loss, {metric: mean}) of the DPO task's loss on the pairs."""
    opts = DpoConfig(**options)
    with torch.no_grad():
        total, n, sums = dpo.loss(models["cfg"], opts, None, False)(models["params"], our_batch(pairs))
    return float(total / n), {k: float(v / n) for k, v in sums.items()}


def accelerator() -> object:
    from accelerate import Accelerator

    return Accelerator(cpu=True)


# ---------------------------------------------------------------------------------- TRL's side

def trl_dpo(models: dict, pairs: list, loss_type: str, beta: float) -> tuple[float, dict[str, float]]:
    """TRL's DPOTrainer._compute_loss on the transformers policy and reference (a trainer built
    without its dataset preparation: only the attributes the loss reads)."""
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    with tempfile.TemporaryDirectory() as d:
        args = TrlDPOConfig(output_dir=d, beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True)
    t = object.__new__(DPOTrainer)
    t.args, t.model, t.ref_model, t.accelerator = args, models["policy"], models["reference"], accelerator()
    t.beta, t.loss_types, t.loss_weights, t.label_smoothing = args.beta, args.loss_type, [1.0], args.label_smoothing
    t.precompute_ref_logps, t.ld_alpha, t.use_weighting, t.aux_loss_enabled = False, args.ld_alpha, False, False
    t.f_divergence_type, t.f_alpha_divergence_coef = args.f_divergence_type, args.f_alpha_divergence_coef
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list), "eval": defaultdict(list)}, 0, 1
    inputs = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    with torch.no_grad():
        loss = t._compute_loss(t.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in t._metrics["eval"].items()}


def trl_batch(pairs: list) -> dict:
    """The pairs as TRL's CPO / ORPO trainers take them: full sequences, prompt labels -100."""
    out = {}
    for k, name in ((0, "chosen"), (1, "rejected")):
        seqs = [(p, p + cr[k]) for p, *cr in pairs]
        t = max(len(s) for _, s in seqs)
        ids = torch.tensor([s + [0] * (t - len(s)) for _, s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for _, s in seqs])
        labels = ids.masked_fill(mask == 0, -100)
        for i, (p, _) in enumerate(seqs):
            labels[i, :len(p)] = -100
        out |= {f"{name}_input_ids": ids, f"{name}_attention_mask": mask, f"{name}_labels": labels}
    return out


def trl_reference_free(cls: type, models: dict, pairs: list, **attrs: object) -> tuple[float, dict[str, float]]:
    """TRL's CPOTrainer / ORPOTrainer ``get_batch_loss_metrics`` on the transformers policy."""
    t = object.__new__(cls)
    t.accelerator, t.is_encoder_decoder, t.aux_loss_enabled = accelerator(), False, False
    for k, v in attrs.items():
        setattr(t, k, v)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, metrics = t.get_batch_loss_metrics(models["policy"], trl_batch(pairs), train_eval="train")
    return float(loss), metrics


def compare(ours_: tuple[float, dict], theirs: tuple[float, dict], names: tuple[str, ...]) -> float:
    """The largest |ours - TRL| over the loss and ``names``; asserts each is within TOLERANCE."""
    diffs = {"loss": abs(ours_[0] - theirs[0])} | {k: abs(ours_[1][k] - theirs[1][k]) for k in names}
    assert max(diffs.values()) < TOLERANCE, diffs
    return max(diffs.values())


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5), ("hinge", 0.3)])
def test_dpo_losses_and_rewards_equal_trls_dpo_trainer(models: dict, loss_type: str, beta: float) -> None:
    pairs = random_pairs(0)
    mine = ours(models, pairs, loss=loss_type, beta=beta)
    assert mine[1]["rewards/margins"] != 0 and 0 < mine[1]["rewards/accuracies"] < 1  # a batch that tells things apart
    compare(mine, trl_dpo(models, pairs, loss_type, beta), METRICS)


def test_label_smoothed_sigmoid_equals_trls_conservative_dpo(models: dict) -> None:
    """TRL 1.x's DPOTrainer dropped label smoothing from ``sigmoid``; its CPOTrainer keeps the
    conservative-DPO form, which on the log-ratios to the reference is DPO's."""
    from trl.experimental.cpo import CPOTrainer

    pairs = random_pairs(1)
    mine = ours(models, pairs, loss="sigmoid", beta=0.2, label_smoothing=0.15)
    batch = CPOTrainer.concatenated_inputs(trl_batch(pairs), padding_value=0)
    with torch.no_grad():
        logps = [CPOTrainer.get_batch_logps(m(batch["concatenated_input_ids"], attention_mask=batch[
            "concatenated_attention_mask"]).logits, batch["concatenated_labels"]) for m in (models["policy"], models["reference"])]
    ratios = (logps[0] - logps[1]).chunk(2)
    t = object.__new__(CPOTrainer)
    t.accelerator, t.alpha, t.loss_type, t.beta, t.label_smoothing = accelerator(), 0.0, "sigmoid", 0.2, 0.15
    losses, _, _ = t.cpo_loss(*ratios)
    assert abs(mine[0] - float(losses.mean())) < TOLERANCE
    assert mine[0] != pytest.approx(ours(models, pairs, loss="sigmoid", beta=0.2)[0], abs=1e-4)  # smoothing counts


def test_simpo_equals_trls_cpo_trainer(models: dict) -> None:
    from trl.experimental.cpo import CPOTrainer

    pairs = random_pairs(2)
    mine = ours(models, pairs, loss="simpo", beta=2.0, gamma=0.7, label_smoothing=0.1)
    theirs = trl_reference_free(CPOTrainer, models, pairs, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7, beta=2.0,
                                label_smoothing=0.1, alpha=0.0, pad_token_id=0)
    compare(mine, theirs, METRICS)


def test_orpo_equals_trls_orpo_trainer(models: dict) -> None:
    """A one-token prompt and chosen completions of one length, where TRL's batch-token-mean NLL
    (prompt included) is the mean of the pairs' completion NLLs that purefine sums."""
    from trl.experimental.orpo import ORPOTrainer

    pairs = random_pairs(3, prompt_len=1, chosen_len=4)
    mine = ours(models, pairs, loss="orpo", beta=0.25)
    theirs = trl_reference_free(ORPOTrainer, models, pairs, beta=0.25, padding_value=0)
    compare(mine, theirs, METRICS + preference.ORPO_METRICS)


def test_empty_rows_of_a_rank_share_change_nothing(models: dict) -> None:
    pairs = random_pairs(4, n=3)
    batch = our_batch(pairs)
    padded = our_batch([*pairs, pairs[0]])
    padded["index"][-1] = -1
    for side in ("chosen", "rejected"):
        padded[side]["labels"][-1] = -100
    for kind in preference.LOSSES:
        fn = dpo.loss(models["cfg"], DpoConfig(loss=kind), None, False)
        with torch.no_grad():
            (a, n, sa), (b, m, sb) = fn(models["params"], batch), fn(models["params"], padded)
        assert int(n) == int(m) == 3 and torch.isfinite(b) and float(a) == pytest.approx(float(b), abs=1e-6)
        assert all(float(sa[k]) == pytest.approx(float(sb[k]), abs=1e-6) for k in sa)


# ------------------------------------------------------------------------------------ runs

def run_cfg(out: Path, **overrides: object) -> TrainConfig:
    """A short DPO run of the bundled tiny model on the bundled pairs (the tiny-demo-dpo preset's shape)."""
    base = dict(task="dpo", model="llama-tiny", peft="lora", max_steps=20, batch_size=4, max_seq_len=96,
                output_dir=str(out), progress=False, plot=False, log_every=10, eval_batches=2,
                lora=LoraConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
                optim=OptimConfig(lr=3e-3, warmup_steps=5), data=DataConfig(cache_dir=str(out.parent / "cache")))
    return TrainConfig(**(base | overrides))


def held_out_batch(cfg: TrainConfig, model_cfg: object) -> dict:
    """The first 8 held-out pairs, batched as the task batches them."""
    from purefine import data
    from purefine.recipes import setup

    tokenizer = data.load_tokenizer(setup.tokenizer_path(cfg), model_vocab_size=model_cfg.vocab_size)
    _, held = preference_data.load(cfg, tokenizer)
    batch, _ = next(preference_data.batches(held, batch_size=8, seq_len=cfg.max_seq_len, state=data.SamplerState(),
                                            shuffle=False, loop=False))
    return batch


def hf_logps(model: object, batch: dict) -> torch.Tensor:
    """Summed completion log-probs (2B,) of a pair batch under a transformers model (whole logits)."""
    tokens = torch.cat([batch["chosen"]["tokens"], batch["rejected"]["tokens"]])
    labels = torch.cat([batch["chosen"]["labels"], batch["rejected"]["labels"]])
    logp = torch.log_softmax(model(tokens).logits.float(), -1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * (labels != -100)).sum(-1)


def test_dpo_on_the_bundled_pairs_learns_the_preference_and_peft_loads_it(tmp_path: Path, capsys) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from purefine.config import load_preset
    from purefine.recipes import setup

    cfg = dataclasses.replace(load_preset("tiny-demo-dpo"), output_dir=str(tmp_path / "dpo"), progress=False, plot=False,
                              save_merged=False)
    with one_thread():
        summary = main(cfg)
    assert summary["eval_rewards/accuracies_start"] == 0.0 and summary["eval_rewards/accuracies_end"] > 0.8, summary
    assert summary["eval_rewards/margins_end"] > 0 and summary["reference"] == "adapters off"
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed and "eval_rewards/accuracies" in printed and "logps/chosen" in printed
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(METRICS) <= r.keys() for r in rows)
    assert [r["step"] for r in rows if {f"eval_{k}" for k in METRICS} <= r.keys()] == [20, 40]  # --eval-every 20

    model_cfg, base = setup.load_model(cfg, torch.device("cpu"))
    trained = checkpoint.load_peft(tmp_path / "dpo" / "adapter", base)
    batch = held_out_batch(cfg, model_cfg)
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(setup.bundled_checkpoint("llama-tiny"),
                                                                    dtype=torch.float32), tmp_path / "dpo" / "adapter").eval()
    with torch.no_grad():
        policy, _ = dpo.sequence_logps(model_cfg, trained, batch)
        reference, _ = dpo.sequence_logps(model_cfg, lora.base_only(trained), batch)
        with hf.disable_adapter():
            hf_reference = hf_logps(hf, batch)
        hf_policy = hf_logps(hf, batch)
    torch.testing.assert_close(hf_reference, reference, atol=1e-4, rtol=1e-5)  # adapter off = DPO's reference
    torch.testing.assert_close(hf_policy, policy, atol=1e-4, rtol=1e-5)
    assert (policy - reference).abs().max() > 0.1


def test_full_finetuning_precomputes_the_reference(tmp_path: Path) -> None:
    with one_thread():
        summary = main(run_cfg(tmp_path / "full", peft="none", max_steps=3, optim=OptimConfig(lr=1e-4, warmup_steps=0)))
    assert summary["reference"] == "precomputed" and (tmp_path / "full" / "model" / "model.safetensors").exists()
    first = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    # step 1 runs the starting weights: the precomputed log-probs are the policy's own, so every reward is 0
    assert abs(first["rewards/margins"]) < 1e-5 and abs(first["rewards/chosen"]) < 1e-5
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5) and summary["eval_rewards/chosen_start"] == pytest.approx(0, abs=1e-5)
    assert summary["eval_rewards/margins_end"] != 0


@pytest.mark.parametrize("peft, precompute", [("qlora", None), ("dora", None), ("lora", True)])
def test_every_adapter_kind_starts_at_its_reference(tmp_path: Path, peft: str, precompute: bool | None) -> None:
    """Adapters start at B = 0, so step 1's policy is the reference (adapters off, or precomputed):
    every reward is 0 and the loss is log 2."""
    with one_thread():
        summary = main(run_cfg(tmp_path / peft, peft=peft, max_steps=2, eval_batches=1,
                               dpo=DpoConfig(precompute_ref=precompute)))
    assert summary["reference"] == ("precomputed" if precompute else "adapters off")
    first = json.loads((tmp_path / peft / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-5) and first["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert "adapter" in summary["outputs"]


def test_the_reference_shares_the_base_weights() -> None:
    from purefine import models, nf4

    cfg = models.preset("llama-debug")
    params = lora.apply(nf4.quantize(models.init(cfg), where=models.quantize_pattern(cfg)), rank=4, alpha=8,
                        where=["q_proj", "v_proj"], dora=True)
    reference = lora.base_only(params)
    leaf = params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert reference["model"]["layers"][0]["self_attn"]["q_proj"]["weight"] is leaf.base  # NF4, not a copy
    assert not lora.adapters(reference) and reference["lm_head"]["weight"] is params["lm_head"]["weight"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Add 1 and 2.", "chosen": "3"}, r"row 2, field 'rejected': missing"),
    ({"prompt": "Add 1 and 2.", "chosen": "  ", "rejected": "1 2"}, r"row 2, field 'chosen': empty completion"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": ""}], "rejected": "x"},
     r"row 2, field 'chosen': empty completion"),
])
def test_bad_rows_are_named_and_exit_2(tmp_path: Path, capsys, row: dict, message: str) -> None:
    from purefine.cli import main as cli

    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "2 2"}
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, row, good)))
    with pytest.raises(SystemExit) as exit_:
        cli(["train", "--task", "dpo", "--data.source", str(path), "--max-steps", "1", "--output-dir", str(tmp_path / "o"),
             "--no-progress", "--no-plot"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith("error: ") and str(path) in last
    assert re.search(message, last), last


@pytest.mark.parametrize("changes, message", [
    (dict(dpo=DpoConfig(loss="ipo", label_smoothing=0.1)), "--dpo.label-smoothing: applies to --dpo.loss sigmoid and simpo"),
    (dict(peft="none", dpo=DpoConfig(precompute_ref=False)), "--dpo.no-precompute-ref: full fine-tuning"),
    (dict(dpo=DpoConfig(label_smoothing=0.5)), r"--dpo.label-smoothing: must be in \[0, 0.5\)"),
    (dict(dpo=DpoConfig(beta=0.0)), "--dpo.beta: must be > 0"),
    (dict(teacher="somewhere"), "--teacher: only used with --task distill"),
])
def test_bad_options_name_the_flag(tmp_path: Path, changes: dict, message: str) -> None:
    from purefine.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        main(run_cfg(tmp_path / "o", max_steps=1, **changes))


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_ten_plus_ten_steps_equal_twenty(tmp_path: Path, peft: str) -> None:
    options = dict(peft=peft, eval_batches=0, optim=OptimConfig(lr=3e-3 if peft == "lora" else 1e-4, warmup_steps=5))
    with one_thread():
        whole = main(run_cfg(tmp_path / "whole", **options))
        first = main(run_cfg(tmp_path / "split", stop_after=10, save_every=10, **options))
        second = main(run_cfg(tmp_path / "split", save_every=10, resume="latest", **options))
    assert second["resumed_from"].endswith("step-00000010") and second["steps"] == 20
    assert first["losses"] + second["losses"] == whole["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "none"])
def test_two_processes_equal_one(tmp_path: Path, peft: str) -> None:
    """FSDP over 2 gloo processes (LoRA: the reference through the same gather; full: the reference
    precomputed by both ranks) against one process with the same global batch."""
    flags = ["--task", "dpo", "--peft", peft, "--max-steps", "4", "--max-seq-len", "96", "--eval-batches", "2",
             "--optim.lr", "1e-3", "--no-progress", "--no-plot"]
    torchrun(["scripts/train.py", *flags, "--parallel.dp-shard", "2", "--batch-size", "2", "--output-dir",
              str(tmp_path / "two")], tmp_path)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    with one_thread():
        one = main(TrainConfig(task="dpo", peft=peft, max_steps=4, max_seq_len=96, eval_batches=2, batch_size=4,
                               optim=OptimConfig(lr=1e-3), progress=False, plot=False, output_dir=str(tmp_path / "one")))
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5, rel=0)
    for key in ("eval_loss_end", "eval_rewards/accuracies_end", "eval_rewards/margins_end"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
