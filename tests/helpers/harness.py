"""Tiny lm-evaluation-harness tasks in local YAML files (multiple choice, generation, rolling
log-likelihood), shared by the adapter's tests and the server's."""

from __future__ import annotations

import json
from pathlib import Path

MC = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["three", "four"], "answer": 1},
    {"question": "Cats say", "choices": ["meow", "woof", "moo"], "answer": 2},
]
GEN_PROMPTS = ["Q: capital of France?\nA:", "Hello"]
ROLLING = ["A rolling document, scored byte by byte.", "Another one, rather longer than the first document is."]


def write_tasks(folder: Path, gen_targets: list[str]) -> None:
    data = folder / "data"
    data.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for row in MC:
            f.write(json.dumps(row) + "\n")
    with open(data / "gen.jsonl", "w") as f:
        for p, t in zip(GEN_PROMPTS, gen_targets):
            f.write(json.dumps({"prompt": p, "target": t}) + "\n")
    with open(data / "roll.jsonl", "w") as f:
        for t in ROLLING:
            f.write(json.dumps({"text": t}) + "\n")

    def common(name: str, file: str) -> str:
        return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / file}\n"
                "test_split: test\n")

    (folder / "tiny_mc.yaml").write_text(
        common("tiny_mc", "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        common("tiny_gen", "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "target_delimiter: \"\"\ngeneration_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "tiny_roll.yaml").write_text(
        common("tiny_roll", "roll.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n"
    )
