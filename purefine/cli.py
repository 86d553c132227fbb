"""The ``purefine`` command (installed by pyproject): one entry point for every recipe.

    purefine train --config llama2-7b-qlora --checkpoint-dir meta-llama/Llama-2-7b-hf
    purefine generate --run-dir outputs/demo --prompt "Name three colors."
    purefine ls                                # the YAML presets shipped with the package

``purefine <command> --help`` shows a command's flags. Each command is also a script under
``scripts/`` in a checkout (``python scripts/train.py`` = ``purefine train``); both go through
``recipes.cli.run``: errors print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from purefine.recipes.cli import fail, run

# command -> (module, config type or None, main, what it does). Modules are imported on use, so
# ``purefine --help`` and ``purefine ls`` start fast.
COMMANDS: dict[str, tuple[str, str | None, str, str]] = {
    "train": ("purefine.recipes.train", None, "main", "fine-tune (LoRA, QLoRA, DoRA, full; SFT, DPO, distillation)"),
    "generate": ("purefine.recipes.generate", "GenerateConfig", "main", "generate text from a trained model"),
    "eval": ("purefine.recipes.evaluate", "EvalConfig", "main", "run lm-eval tasks on a trained model"),
    "export": ("purefine.recipes.export", "ExportConfig", "main", "merge adapters / write an HF checkpoint"),
    "download": ("purefine.recipes.hub", "DownloadConfig", "download_main", "download a model from the HF hub"),
    "upload": ("purefine.recipes.hub", "UploadConfig", "upload_main", "upload a model or adapter to the HF hub"),
    "data": ("purefine.recipes.data_preview", "DataPreviewConfig", "main", "preview tokenized samples and data statistics"),
    "bench": ("purefine.recipes.bench", "BenchConfig", "main", "benchmark tokens/s and memory against HF PEFT"),
    "check": ("purefine.recipes.check", "CheckConfig", "main", "compare a checkpoint's logits with transformers'"),
    "info": ("purefine.recipes.inspect", "InspectConfig", "main", "describe a checkpoint, run or preset"),
    "ls": ("purefine.recipes.configs", "Command", "main", "list the YAML presets"),
    "cp": ("purefine.recipes.configs", "Command", "main", "copy a preset to edit it"),
    "validate": ("purefine.recipes.configs", "Command", "main", "check a config without running it"),
}


def usage() -> str:
    """The command table ``purefine --help`` prints."""
    rows = [f"  {name:<10} {what}" for name, (_, _, _, what) in COMMANDS.items()]
    return "usage: purefine <command> [flags]   (purefine <command> --help for its flags)\n\ncommands:\n" + \
        "\n".join(rows)


def run_command(name: str, args: Sequence[str]) -> Any:
    """Run command ``name`` with its flags ``args`` (what ``purefine name args...`` does)."""
    module_name, config_name, main_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    main = getattr(module, main_name)
    prog = f"purefine {name}"
    if name == "train":
        from purefine.config import TrainConfig, parse_train_args

        return run(main, TrainConfig, list(args), parse=lambda a: parse_train_args(a, prog=prog))
    config_type = getattr(module, config_name)
    if name in ("ls", "cp", "validate"):  # subcommands of one configs command
        return run(main, config_type, [name, *args], prog="purefine")
    return run(main, config_type, list(args), prog=prog)


def main(argv: Sequence[str] | None = None) -> Any:
    """The ``purefine`` console script: dispatch ``argv[0]`` to its command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        fail(f"unknown command {name!r}{f' (did you mean {close[0]}?)' if close else ''}; "
             f"commands: {', '.join(COMMANDS)}")
    return run_command(name, argv[1:])


def console() -> None:
    """The installed ``purefine`` script (its exit status is 0 unless a command exits otherwise)."""
    main()


if __name__ == "__main__":
    console()
