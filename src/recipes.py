"""Named presets of training flags (``--recipe``). A preset only changes defaults: a flag
given on the command line always wins. Keys are argparse destinations; a key a stage has
no flag for (the distillation settings, for the teacher and the baseline) is left out
there, so the baseline and the KD student of one recipe train alike. ``--weights teacher``
is for students only: a teacher cannot start from itself.
"""

from __future__ import annotations

import re

RECIPES = {
    # The seed's setup, as the public reference describes it: kd with T=4, alpha 0.7,
    # beta 0.3; ReduceLROnPlateau on validation loss, early stopping, best val loss.
    "reference": {},
    # Consistent function matching (Beyer et al., CVPR 2022), measured best in the README:
    # a fixed budget with warm-up and cosine decay, the final model, paired mixup/cutmix
    # so the teacher labels mixed images it sees in HR, and the KD term dominant.
    "consistent": {"schedule": "cosine", "warmup_epochs": 1.0, "monitor": "last",
                   "mixup": 0.2, "cutmix": 1.0, "alpha": 0.1, "beta": 0.9},
    # The same, the LR student starting from the HR teacher's weights (baseline too).
    "teacher-init": {"schedule": "cosine", "warmup_epochs": 1.0, "monitor": "last",
                     "mixup": 0.2, "cutmix": 1.0, "alpha": 0.1, "beta": 0.9,
                     "weights": "teacher"},
    # The same with a transfer set: the teacher labels unlabelled images (--unlabelled PATH,
    # required) for the student, one unlabelled image per labelled one in every batch.
    "transfer": {"schedule": "cosine", "warmup_epochs": 1.0, "monitor": "last",
                 "mixup": 0.2, "cutmix": 1.0, "alpha": 0.1, "beta": 0.9,
                 "unlabelled_ratio": 1.0},
}
STUDENT_ONLY = {"weights"}
# Presets that need a transfer set (--unlabelled) for the KD student.
NEEDS_UNLABELLED = {"transfer"}
DEFAULT_RECIPE = "reference"


# Destinations whose flag has another name.
FLAG_NAMES = {"monitor": "select-by"}


def flag_name(key: str) -> str:
    """The command-line flag of a preset's key (an argparse destination)."""
    return f"--{FLAG_NAMES.get(key, key.replace('_', '-'))}"


def recipe_text(name: str) -> str:
    """The preset as flags, for --help and the README."""
    settings = RECIPES[name]
    if not settings:
        return "the parser defaults"
    return " ".join(f"{flag_name(key)} {value}" for key, value in settings.items())


def preset_note(args, message: str) -> str:
    """`` (the --recipe consistent preset sets --warmup-epochs 1)`` for each flag an error
    ``message`` names whose value in ``args`` is the preset's: the user may never have
    typed it. Empty when the preset set none of them."""
    named = []
    for key, value in RECIPES.get(getattr(args, "recipe", None), {}).items():
        flag = flag_name(key)
        mentioned = re.search(rf"{re.escape(flag)}(?![\w-])", message)
        if mentioned and getattr(args, key, None) == value:
            named.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    if not named:
        return ""
    return f" (the --recipe {args.recipe} preset sets {', '.join(named)})"


def recipe_defaults(name: str, destinations, stage: str) -> dict:
    """The preset's settings that ``stage``'s parser (with these ``destinations``) has
    flags for."""
    return {key: value for key, value in RECIPES[name].items()
            if key in destinations and not (stage == "teacher" and key in STUDENT_ONLY)}
