#!/usr/bin/env python3
"""Scores a checkpoint with lm-evaluation-harness against `dsrun serve`, the way people score
checkpoints: the harness's `local-completions` model sends tokenized loglikelihood requests
(batches of id arrays, echo, logprobs) to /v1/completions.

Run by hand (needs `pip install "lm_eval[api]" transformers`; torch is not needed):

    cargo build --release
    python tools/run_lm_eval.py                       # the bundled model, a small local task
    python tools/run_lm_eval.py --model DIR --tasks hellaswag --limit 100   # a harness task

With no --tasks it writes a small local multiple-choice task (docstring continuations the
bundled model has seen the like of) so nothing is downloaded. dsrun is started on a free port
and stopped afterwards; the harness's results table is printed.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (context, choices, index of the right one): the right continuation is the docstring phrase.
DOCS = [
    ("Return the value of the", [" attribute.", " banana.", " ocean."], 0),
    ("This module provides functions for working with", [" files.", " cats.", " weather."], 0),
    ("Raise a ValueError if the argument is not a", [" string.", " dog.", " song."], 0),
    ("If the optional argument is given, it is used as the", [" default.", " river.", " mountain."], 0),
    ("Return a new list containing the", [" items.", " clouds.", " trumpets."], 0),
    ("The file is opened in binary", [" mode.", " forest.", " sandwich."], 0),
    ("Return True if the object is a", [" module.", " giraffe.", " violin."], 0),
    ("This function is deprecated; use the", [" new function instead.", " purple kite.", " wet sand."], 0),
]

TASK = """task: dsrun_docstrings
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base, server, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"dsrun serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit("dsrun serve did not become healthy")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "weights"), help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--dsrun", default=os.path.join(ROOT, "target", "release", "dsrun"))
    ap.add_argument("--tasks", help="harness tasks (default: a small local task written here)")
    ap.add_argument("--limit", type=int, help="documents per task")
    ap.add_argument("--parallel", type=int, default=4, help="dsrun serve --parallel")
    ap.add_argument("--batch", type=int, default=8, help="prompts per request (the harness's batch_size)")
    ap.add_argument("serve_args", nargs="*", help="more dsrun serve flags, after --")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="dsrun-lm-eval-")
    tasks, include = args.tasks, []
    if not tasks:
        data = os.path.join(work, "docstrings.jsonl")
        with open(data, "w") as f:
            for context, choices, answer in DOCS:
                f.write(json.dumps({"context": context, "choices": choices, "answer": answer}) + "\n")
        with open(os.path.join(work, "dsrun_docstrings.yaml"), "w") as f:
            f.write(TASK.format(data=data))
        tasks, include = "dsrun_docstrings", ["--include_path", work]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.dsrun, "serve", "--model", args.model, "--port", str(port), "--parallel", str(args.parallel), *args.serve_args])
    try:
        wait_healthy(base, server)
        model_args = ",".join([
            "model=dsrun",
            f"base_url={base}/v1/completions",
            f"tokenizer={args.model}",
            "tokenizer_backend=huggingface",
            "tokenized_requests=True",
            "num_concurrent=1",
        ])
        command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args, "--tasks", tasks, "--batch_size", str(args.batch), *include]
        if args.limit:
            command += ["--limit", str(args.limit)]
        print("+", " ".join(command), flush=True)
        result = subprocess.run(command)
        sys.exit(result.returncode)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
