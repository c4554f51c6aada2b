"""Your own search space and strategy pieces, in Python.

Registers two custom strategy pieces and searches over them next to the built-in ones:

- a freezing policy ``bias_norm`` (biases, norm weights and the head: the built-in ``bitfit`` and ``norm`` modes
  together), and
- an optimizer factory ``rmsprop`` with its own searched knob ``rms_alpha``;

then runs a search with a define-by-run space: ``space(trial) -> dict``, where plain Python decides what to
suggest (here: the learning-rate range depends on how much of the network trains).

    python examples/custom_space.py --data demo_data/digits --model efficientnet_lite0 --trials 12
    python examples/custom_space.py --yaml      # the same pieces searched from a YAML space instead

Offline without pretrained weights, pass --no-pretrained (or --weights FILE).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

import autoft


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
    parser.add_argument("--data", type=Path, default=Path("demo_data/digits"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--yaml", action="store_true", help="search the SearchSpace built in code instead")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/custom_space"))
    args = parser.parse_args()
    register()
    chosen = yaml_space() if args.yaml else space
    result = autoft.search(
        args.model,
        args.data,
        trials=args.trials,
        space=chosen,
        pretrained=args.pretrained,
        weights=args.weights,
        run_dir=args.run_dir,
    )
    print(f"best trial {result.best_trial}: val accuracy {result.best_score:.4f}  {result.best_recipe.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
