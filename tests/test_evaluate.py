"""purefine.evaluate against lm-eval's own Hugging Face backend (HFLM) on a tiny random Llama.

The same checkpoint is scored by ``PurefineLM`` (purefine's forward, purefine's tokenizers) and by
``lm_eval.models.huggingface.HFLM`` (transformers' model and tokenizer, converted from the same
SentencePiece model): the local multiple-choice task, rolling loglikelihoods and greedy
``generate_until`` must agree. scripts/eval.py runs as a subprocess and must print lm-eval's table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine import checkpoint, data, models
from purefine.errors import ConfigError
from purefine.evaluate import (
    HAVE_LM_EVAL, continuation_logprobs, generation_options, local_tasks_dir, rolling_windows,
)
from tests.conftest import ROOT, make_hf_llama

needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval not installed (pip install 'purefine[eval]')")
TOL = 1e-4
TASK = "purefine_mc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (vocab = the demo tokenizer's 1024) with the demo tokenizer as a
    transformers tokenizer directory (tokenizer.json, converted by transformers itself)."""
    path = tmp_path_factory.mktemp("eval") / "model"
    make_hf_llama(path, vocab_size=1024, max_position_embeddings=256)
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert a SentencePiece model")
    from transformers import LlamaTokenizer

    spm_dir = path.parent / "spm"
    spm_dir.mkdir()
    shutil.copyfile(data.DEMO_TOKENIZER, spm_dir / "tokenizer.model")
    LlamaTokenizer.from_pretrained(spm_dir, legacy=True, add_bos_token=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return checkpoint.load_hf(model_dir)


def purefine_lm(loaded, tokenizer, **kw):
    from purefine.evaluate import PurefineLM

    cfg, params = loaded
    return PurefineLM(cfg, params, tokenizer, **kw)


def hf_lm(model_dir, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", **kw)


def evaluate(lm, num_fewshot):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(local_tasks_dir())], include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, num_fewshot=num_fewshot,
                                   log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def hf_results(model_dir):
    return evaluate(hf_lm(model_dir, batch_size=7), num_fewshot=1)


def assert_same_scores(lm, hf, ours: list, theirs: list, arguments: list) -> None:
    """Same tokens for every (context + continuation), log-probabilities within TOL, same greediness."""
    for (context, continuation), (lp_a, greedy_a), (lp_b, greedy_b) in zip(arguments, ours, theirs, strict=True):
        assert lm.tok_encode(context + continuation) == hf.tok_encode(context + continuation)
        assert abs(lp_a - lp_b) < TOL, (context, continuation, lp_a, lp_b)
        assert greedy_a == greedy_b


def flat_requests(results: dict) -> tuple[list, list]:
    """(arguments, responses) of every loglikelihood request in lm-eval's logged samples."""
    samples = results["samples"][TASK]
    return ([arg for s in samples for arg in s["arguments"]], [r[0] for s in samples for r in s["resps"]])


@needs_lm_eval
def test_multiple_choice_task_matches_hflm(model_dir, loaded, hf_results):
    """simple_evaluate on the local task, 1-shot: the same requests, scores and metrics as HFLM."""
    tokenizer = data.load_tokenizer(data.DEMO_TOKENIZER, model_vocab_size=1024)  # SentencePiece
    ours = evaluate(purefine_lm(loaded, tokenizer, batch_size=5), num_fewshot=1)
    arguments, responses = flat_requests(ours)
    their_arguments, their_responses = flat_requests(hf_results)
    assert arguments == their_arguments and len(arguments) == 20 * 4
    assert_same_scores(purefine_lm(loaded, tokenizer), hf_lm(model_dir, batch_size=1), responses, their_responses,
                       arguments)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][TASK][metric] == hf_results["results"][TASK][metric]


@needs_lm_eval
def test_hf_tokenizer_json_scores_match_hflm(model_dir, loaded, hf_results):
    """The same requests with purefine's tokenizer.json tokenizer (the transformers directory's own file)."""
    from lm_eval.api.instance import Instance

    arguments, their_responses = flat_requests(hf_results)
    lm = purefine_lm(loaded, data.load_tokenizer(model_dir), batch_size=6)
    ours = lm.loglikelihood([Instance("loglikelihood", {}, args, i) for i, args in enumerate(arguments)])
    assert_same_scores(lm, hf_lm(model_dir, batch_size=1), ours, their_responses, arguments)


@needs_lm_eval
def test_rolling_loglikelihood_matches_hflm(model_dir, loaded):
    from lm_eval.api.instance import Instance

    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "Hello world", "Question: what?\nAnswer: a cat."]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    tokenizer = data.load_tokenizer(data.DEMO_TOKENIZER)
    ours = purefine_lm(loaded, tokenizer, batch_size=2, max_length=16).loglikelihood_rolling(requests)
    theirs = hf_lm(model_dir, batch_size=3, max_length=16).loglikelihood_rolling(requests)
    assert len(tokenizer.encode(texts[0])) > 3 * 16  # several windows
    assert ours == pytest.approx(theirs, abs=TOL)


@needs_lm_eval
def test_generate_until_matches_hflm(model_dir, loaded):
    from lm_eval.api.instance import Instance

    contexts = ["Question: What is the capital of France?\nAnswer:", "Once upon a time", "The"]
    options = [{"until": ["\n", "."], "max_gen_toks": 10, "do_sample": False}, {"until": ["zz"], "max_gen_toks": 6}]
    requests = [Instance("generate_until", {}, (c, dict(o)), i) for i, (c, o) in
                enumerate((c, o) for o in options for c in contexts)]
    tokenizer = data.load_tokenizer(model_dir)  # the transformers tokenizer.json: identical decoding
    ours = purefine_lm(loaded, tokenizer, batch_size=2).generate_until(requests)
    theirs = hf_lm(model_dir, batch_size=2).generate_until(requests)
    assert ours == theirs
    assert any(len(text) > 5 for text in ours)


@needs_lm_eval
def test_generate_until_rejects_unknown_kwargs(loaded):
    from lm_eval.api.instance import Instance

    lm = purefine_lm(loaded, data.load_tokenizer(data.DEMO_TOKENIZER))
    request = Instance("generate_until", {}, ("Hi", {"until": ["\n"], "num_beams": 4}), 0)
    with pytest.raises(ConfigError, match="num_beams"):
        lm.generate_until([request])


def test_generation_options_follow_lm_eval():
    greedy = generation_options({"until": "\n\n", "max_gen_toks": 32, "temperature": 0.7, "do_sample": False})
    assert greedy == {"max_new_tokens": 32, "stop": ["\n\n"], "temperature": 0.0, "top_k": None, "top_p": None,
                      "seed": 0}
    sampled = generation_options({"until": ["a", "b"], "max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9})
    assert sampled["temperature"] == 0.5 and sampled["top_p"] == 0.9 and sampled["stop"] == ["a", "b"]
    assert sampled["max_new_tokens"] == 5
    assert generation_options({}, 17)["max_new_tokens"] == 17 and generation_options({})["temperature"] == 0.0
    with pytest.raises(ConfigError, match="num_beams"):
        generation_options({"num_beams": 4})


def reference_logprob(cfg, params, context, continuation):
    """log p(continuation | context) from one unpadded full forward."""
    tokens = torch.tensor([context + continuation])
    logprobs = models.forward(cfg, params, tokens)[0].float().log_softmax(-1)
    rows = logprobs[len(context) - 1: len(context) + len(continuation) - 1]
    picked = rows.gather(-1, torch.tensor(continuation)[:, None])[:, 0]
    return float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(continuation)).all())


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 95), min_size=1, max_size=12),
                          st.lists(st.integers(0, 95), min_size=1, max_size=5)), min_size=1, max_size=6),
       st.integers(1, 4))
def test_batched_scores_equal_one_by_one_forward(requests, batch_size):
    cfg = models.preset("llama-debug")
    params = models.init(cfg, seed=0)
    got = continuation_logprobs(cfg, params, requests, batch_size=batch_size)
    for (context, continuation), (logprob, greedy) in zip(requests, got, strict=True):
        want, want_greedy = reference_logprob(cfg, params, context, continuation)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_long_requests_are_cut_on_the_left():
    cfg = models.preset("llama-debug")
    params = models.init(cfg, seed=0)
    context, continuation = list(range(1, 30)), [5, 6, 7]
    got = continuation_logprobs(cfg, params, [(context, continuation)], max_length=10)[0]
    kept = (context + continuation)[-11:]
    want = reference_logprob(cfg, params, kept[: -len(continuation)], continuation)
    assert got[0] == pytest.approx(want[0], abs=1e-4)
    with pytest.raises(ConfigError, match="exceeds"):
        continuation_logprobs(cfg, params, [([1], list(range(12)))], max_length=10)
    with pytest.raises(ConfigError, match="empty continuation"):
        continuation_logprobs(cfg, params, [([1], [])])
    with pytest.raises(ConfigError, match="empty context"):
        continuation_logprobs(cfg, params, [([], [4, 5])])


@needs_lm_eval
def test_rolling_windows_score_every_token_once():
    tokens = list(range(10, 33))
    windows = rolling_windows(tokens, prefix_id=1, max_length=8)
    assert [t for _, cont in windows for t in cont] == tokens
    assert all(len(ctx) + len(cont) - 1 <= 8 for ctx, cont in windows)
    assert windows[0][0] == [1]


@needs_lm_eval
def test_local_task_loads_offline():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(local_tasks_dir())], include_defaults=False)
    assert TASK in manager.all_tasks
    task = manager.load_task_or_group([TASK])
    docs = list(next(iter(task.values())).test_docs())
    assert len(docs) == 20 and all(0 <= d["answer"] < len(d["choices"]) for d in docs)


def test_missing_lm_eval_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    import purefine.evaluate
    from purefine.recipes import run
    from purefine.recipes.evaluate import EvalConfig, main

    monkeypatch.setattr(purefine.evaluate, "HAVE_LM_EVAL", False)
    with pytest.raises(SystemExit) as exit_info:
        run(main, EvalConfig, args=["--checkpoint-dir", str(tmp_path), "--tasks", TASK])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lm-eval is not installed") and "pip install" in err and "\n" not in err


@pytest.mark.parametrize("args, message", [
    ([], "--tasks"),
    (["--tasks", TASK, "--batch-size", "0"], "--batch-size"),
    (["--tasks", TASK, "--limit", "-1"], "--limit"),
    (["--tasks", TASK, "--include-path", "/no/such/dir"], "--include-path"),
    (["--tasks", TASK, "--adapter-dir", "x", "--run-dir", "y"], "--adapter-dir"),
    (["--tasks", TASK, "--batch-size", "two"], "batch-size"),
])
def test_eval_bad_flags_exit_2(tmp_path, capsys, args, message):
    from purefine.recipes import run
    from purefine.recipes.evaluate import EvalConfig, main

    source = [] if "--run-dir" in args else ["--checkpoint-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        run(main, EvalConfig, args=source + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@needs_lm_eval
def test_unknown_local_task_names_are_reported():
    from lm_eval.tasks import TaskManager

    from purefine.recipes.evaluate import missing_tasks

    manager = TaskManager(include_path=[str(local_tasks_dir())], include_defaults=False)
    assert missing_tasks(manager, (TASK, "purefine_*", "no_such_task")) == ["no_such_task"]


@needs_lm_eval
def test_eval_script_prints_lm_eval_table(model_dir, hf_results, tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval.py"), "--checkpoint-dir", str(model_dir),
                           "--tasks", TASK, "--num-fewshot", "1", "--batch-size", "8", "--device", "cpu",
                           "--output", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from lm_eval.utils import make_table

    results = json.loads(out.read_text())
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("|") and "Tasks" in line)
    assert "Metric" in lines[header] and "Value" in lines[header]
    assert any(TASK in line and "acc" in line for line in lines[header:])
    assert make_table(results) in proc.stdout  # the table of the results it wrote, as lm-eval prints it
    assert results["results"][TASK]["acc,none"] == hf_results["results"][TASK]["acc,none"]
