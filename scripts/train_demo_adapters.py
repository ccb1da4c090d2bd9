"""Train the two demo adapters that `loraplex up` serves: `pirate` and `french`.

Each is a real PEFT LoRA (rank 8 on q/k/v/o) of SmolLM2-135M-Instruct, trained on the
instruction/answer pairs in demo/data/<name>.jsonl (the user turn rendered with the
model's chat template, the loss on the assistant turn only). Seeded, so a rerun on the
same torch build writes the same weights up to float rounding. Usage (3 to 5 minutes
per adapter on 2 idle CPU cores):

    nice .venv/bin/python scripts/train_demo_adapters.py            # both adapters
    nice .venv/bin/python scripts/train_demo_adapters.py --only french

Writes demo/adapters/<name>/adapter_config.json + adapter_model.safetensors (float16,
about 1.8 MB each) and prints greedy answers to prompts outside the training data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loraplex.demo_adapter import DEMO_ADAPTERS, HELD_OUT_PROMPTS  # noqa: E402

# Where a reader of adapter_config.json finds the base model; a local path would not travel.
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IGNORE = -100  # label of tokens the loss skips (system and user turns, padding)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model folder (default: the bundled default)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "demo" / "data")
    parser.add_argument("--out-dir", type=Path, default=REPO / "demo" / "adapters")
    parser.add_argument("--only", choices=[a.name for a in DEMO_ADAPTERS], action="append")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else _default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for adapter in DEMO_ADAPTERS:
        if args.only and adapter.name not in args.only:
            continue
        examples = _read_examples(args.data_dir / f"{adapter.name}.jsonl")
        out = args.out_dir / adapter.name
        print(f"training {adapter.name} on {len(examples)} examples -> {out}", flush=True)
        model = _train(model_dir, tokenizer, examples, args)
        _save(model, out)
        _show(model, tokenizer)
    return 0


def _default_model() -> Path:
    from engine.model.default_model import ensure_default_model

    return ensure_default_model(Path.home() / ".cache" / "loraplex" / "models", progress=print)


def _read_examples(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _encode(tokenizer, example: dict[str, str]) -> tuple[list[int], list[int]]:
    """Token ids of the chat the engine would render, and labels for the answer only
    (up to and including <|im_end|>, so the adapter learns where to stop)."""
    user = [{"role": "user", "content": example["prompt"]}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    answer = example["answer"] + "<|im_end|>"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def _batches(encoded, batch_size: int, rng: random.Random, pad_id: int):
    """Batches of similar length (little padding), in a seeded random order."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        width = max(len(encoded[i][0]) for i in group)
        ids = torch.full((len(group), width), pad_id)  # [batch, width] int64
        labels = torch.full((len(group), width), IGNORE)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            tokens, targets = encoded[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(targets)] = torch.tensor(targets)
            mask[row, : len(tokens)] = 1
        yield ids, labels, mask


def _train(model_dir: Path, tokenizer, examples, args: argparse.Namespace):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora)
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    encoded = [_encode(tokenizer, example) for example in examples]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * -(-len(encoded) // args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (steps + 1))
    model.train()
    step, start = 0, time.monotonic()
    for epoch in range(args.epochs):
        for ids, labels, mask in _batches(encoded, args.batch_size, rng, tokenizer.pad_token_id):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 5 == 0 or step == steps:
                elapsed = time.monotonic() - start
                print(
                    f"  epoch {epoch + 1} step {step}/{steps} loss {loss.item():.3f} "
                    f"({elapsed:.0f} s)",
                    flush=True,
                )
    model.eval()
    return model


def _save(model, out: Path) -> None:
    # float16 halves the committed files; LoRA factors are small numbers it holds well.
    model.to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing
    # PEFT writes target_modules from a set, in hash order; sorted, a rerun writes the
    # same config bytes (the control plane keys identical content on them).
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _show(model, tokenizer) -> None:
    for prompt in HELD_OUT_PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        output = model.generate(**ids, max_new_tokens=40, do_sample=False)
        answer = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"  > {prompt}\n    {answer.strip()}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
