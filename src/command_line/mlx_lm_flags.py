"""`mlx_lm lora`'s own command-line flags, taken by train_qlora.py under their own names.

A flag with an equivalent here becomes it, and the start of the run says so in one line
(`--iters 30` is `--max-steps 30`); a flag that changes nothing here is taken and said so;
a flag with no equivalent (`--test`, a `--clear-cache-threshold` above 0) is refused with
what to do instead. The meanings are config.py's table of `mlx_lm lora` YAML keys, so a
key and its flag always mean the same thing.
"""

from __future__ import annotations

import argparse

from command_line.settings_file import MASK_PROMPT_HERE, MLX_LM_KEYS, MLX_LM_NO_EFFECT, MLX_LM_ONLY_VALUE

# mlx_lm lora's flags that are switches (store_true there): the YAML key's value when given.
SWITCH_KEYS = ("train", "test", "mask_prompt")
# Its other flags with no name of ours: the value they take.
VALUE_KEYS = {"steps_per_report": int, "test_batches": int, "clear_cache_threshold": str}
DEST = "mlx_lm_"  # argparse's dest of each: its key with this prefix, apart from ours


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_mlx_lm_flags(parser: argparse.ArgumentParser, kinds: dict) -> None:
    """The group of mlx_lm lora's flags; `kinds`: our flat name -> the type of its flag."""
    group = parser.add_argument_group("mlx_lm lora's flags", "taken under their own names, each as the flag of "
                                                            "this toolkit named (the run's start says so)")
    for key, ours in MLX_LM_KEYS.items():
        group.add_argument(flag(key), dest=DEST + key, type=kinds[ours], default=None, metavar=ours.upper(),
                           help=f"= {flag(ours)}")
    for key in SWITCH_KEYS:
        why = MLX_LM_ONLY_VALUE.get(key, (None, "prompts are never learned here"))[1]
        group.add_argument(flag(key), dest=DEST + key, action="store_const", const=True, default=None,
                           help=("refused: " if key == "test" else "no effect: ") + why)
    for key, kind in VALUE_KEYS.items():
        why = (MLX_LM_NO_EFFECT.get(key) or MLX_LM_ONLY_VALUE[key][1]).replace("test: true", "--test")
        group.add_argument(flag(key), dest=DEST + key, type=kind, default=None, metavar="N",
                           help=("no effect: " if key in MLX_LM_NO_EFFECT else "only 0: ") + why)


def settings_from_mlx_lm_flags(args: argparse.Namespace, our_flags: dict) -> tuple[dict, list[str], list[str]]:
    """What mlx_lm lora's flags given on `args` set: ({our flat name: (value, their flag)}, notes,
    refusals). `our_flags`: our flat name -> our flag. Each refusal names what to do instead."""
    values, notes, refused = {}, [], []
    for key, ours in MLX_LM_KEYS.items():
        value = getattr(args, DEST + key, None)
        if value is None:
            continue
        if getattr(args, ours, None) is not None:
            refused.append(f"{flag(key)} and {our_flags[ours]} are the same setting: give one")
            continue
        values[ours] = (value, flag(key))
        notes.append(f"{flag(key)} {value} is {our_flags[ours]} {value} here")
    for key in SWITCH_KEYS + tuple(VALUE_KEYS):
        value = getattr(args, DEST + key, None)
        if value is None:
            continue
        if key == "mask_prompt":
            always = MASK_PROMPT_HERE.format(last="--learn-assistant-turns last")
            notes.append(f"--mask-prompt: nothing to change: {always}")
        elif key in MLX_LM_NO_EFFECT:
            notes.append(f"{flag(key)} has no effect here: {MLX_LM_NO_EFFECT[key].replace('test: true', '--test')}")
        else:
            wanted, why = MLX_LM_ONLY_VALUE[key]
            if value is wanted or str(value) == str(wanted):
                if key == "train":
                    notes.append(f"--train: {why}")
            else:
                refused.append(f"{flag(key)}{'' if value is True else ' ' + str(value)}: mlx_lm lora's, with no "
                               f"equivalent here ({why})")
    return values, notes, refused
