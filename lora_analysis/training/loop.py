"""The training loop: LoRA on a Hugging Face model with AdamW, warm-up + linear decay, clipping.

    result = train(TrainConfig(steps=200, seed=0, output_dir="runs/r8"))
    result.metrics["final"]["val_accuracy"], result.adapter

Writes to `output_dir` (rank 0 only): the adapter in PEFT layout (adapter_model.safetensors,
adapter_config.json; the classifier head as modules_to_save), `metrics.json`, and while
running `checkpoint.pt` (removed when the run completes). On the CPU the same config gives a
bit-identical adapter file, with or without interruptions and `resume`. What may already be in
`output_dir`, and the lock held on it while training: see `output_dir`.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..adapters import Adapter, load_adapter, save_adapter
from ..config import LoraConfig
from ..devices import resolve_device
from ..errors import InputFileError, LoraAnalysisError
from ..fileio import atomic_write_text
from ..lora import extract_adapter, inject_lora, is_adaptable, lora_layers
from .checkpoint import CHECKPOINT_NAME, check_recipe, check_resumable, load_checkpoint, restore, rng_state, save_checkpoint
from .config import TrainConfig
from .data import ShuffledStream, TextDataset, collate, encode, load_dataset, split_dataset
from .distributed import DistContext, all_reduce_sum, barrier, gather_to_main, init_distributed
from .models import PEFT_TASK_TYPES, head_module_names, load_model
from .output_dir import FINISHED, METRICS_NAME, RESUME, claim_output_dir, read_metrics


@dataclass
class TrainResult:
    """adapter: the trained factors (+ head); metrics: what metrics.json holds; status:
    "trained", "resumed" (continued from a checkpoint) or "finished" (found complete, not rerun);
    model: the trained model with LoRA layers in it (None for a "finished" run)."""

    adapter: Adapter
    metrics: dict[str, Any]
    output_dir: Path | None
    status: str
    model: nn.Module | None = None


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Train one LoRA adapter; `overrides` replace fields of `config` (or of the defaults)."""
    config = replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    return run_training(config)


def run_training(config: TrainConfig, bar: tqdm | None = None) -> TrainResult:
    """`train(config)`, counting its steps on `bar` (a sweep's overall bar) when given instead
    of drawing a bar of its own."""
    ctx = init_distributed(config.device)
    device = resolve_device(config.device, ctx.local_rank)
    if config.output_dir is None:
        return _Run(config, ctx, device, bar).run()
    output_dir = Path(config.output_dir)
    with claim_output_dir(config, output_dir, ctx) as verdict:
        if verdict == FINISHED:
            return load_finished(output_dir, config)
        return _Run(config, ctx, device, bar).run(resume=verdict == RESUME)


def load_finished(output_dir: Path, config: TrainConfig) -> TrainResult:
    """The completed run in `output_dir`, which must have been trained with `config`'s recipe."""
    metrics_path = output_dir / METRICS_NAME
    metrics = read_metrics(metrics_path)
    check_recipe(metrics_path, TrainConfig.from_dict(metrics["config"]).recipe(), config.recipe(), InputFileError)
    return TrainResult(load_adapter(output_dir), metrics, output_dir, "finished")


class _Run:
    """One training run: set-up, the step loop, evaluation, checkpoints and outputs."""

    def __init__(self, config: TrainConfig, ctx: DistContext, device: torch.device, bar: tqdm | None = None):
        self.config, self.ctx, self.device, self.shared_bar = config, ctx, device, bar
        self.output_dir = Path(config.output_dir) if config.output_dir is not None else None
        self.classify = config.task == "classification"
        self.autocast = device.type == "cuda"  # bf16 autocast on CUDA; exact fp32 on the CPU

        data = load_dataset(config.data, config.task, config.text_column, config.label_column, config.labels)
        self.train_set, self.val_set = split_dataset(data, config.val_fraction, config.split_seed)
        torch.manual_seed(config.seed)  # a classification head is initialised from the global RNG
        self.model, tokenizer, model_name = load_model(config.model, config.task, data.label_names)
        self.lora_config = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            target_modules=config.targets,
            lora_dropout=config.dropout,
            modules_to_save=head_module_names(self.model) if self.classify else None,
            task_type=PEFT_TASK_TYPES[config.task],
            base_model_name_or_path=model_name,
        )
        _inject(self.model, self.lora_config, config.seed)
        self.model.to(device).train()
        self.pad_id = tokenizer.pad_token_id
        self.train_ids = encode(self.train_set.texts, tokenizer, config.max_seq_len)
        self.val_ids = encode(self.val_set.texts, tokenizer, config.max_seq_len)
        lengths = [len(ids) for ids in self.train_ids] if config.group_by_length else None
        self.stream = ShuffledStream(len(self.train_set), config.seed, lengths, config.batch_size * ctx.world_size)

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        schedule = warmup_then_linear_decay(config.warmup_steps, config.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.forward_model = self.model
        if ctx.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        torch.manual_seed(config.seed + ctx.rank)  # dropout stream, distinct per DDP rank
        self.step = 0
        self.progress: dict[str, Any] = {"train_loss": [], "evals": [], "wall_time_s": 0.0}
        self.status = "trained"

    # -- the loop ---------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainResult:
        """Train to `config.steps` (from the output directory's checkpoint when `resume`)."""
        if resume:
            self._resume()
        if self.step == 0 and self.config.eval_every:
            self._evaluate()
        started, first_step = time.perf_counter(), self.step
        with self._progress_bar() as bar, _deferred_sigint() as interrupted:
            while self.step < self.config.steps:
                loss, stop = self._train_step(interrupted.is_set())
                self.progress["train_loss"].append(loss)
                if stop:
                    self._on_interrupt(started)
                elapsed = time.perf_counter() - started
                examples_per_s = (self.step - first_step) * self.global_batch / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{examples_per_s:.1f}", refresh=False)
                advance(bar)
                if self.step < self.config.steps:
                    if self.config.eval_every and self.step % self.config.eval_every == 0:
                        self._evaluate()
                    if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                        self._save_checkpoint(started)
        self.progress["wall_time_s"] += time.perf_counter() - started
        self._evaluate()
        return self._finish()

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[tqdm]:
        """This run's own bar, or the shared one it counts its steps on (without the steps a
        resumed run did before: they are not this invocation's work)."""
        if self.shared_bar is not None:
            if self.shared_bar.total is not None:
                self.shared_bar.total -= self.step
            yield self.shared_bar
            return
        with tqdm(
            total=self.config.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
            disable=not (self.config.progress and self.ctx.is_main), dynamic_ncols=True,
        ) as bar:
            yield bar

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.ctx.world_size

    def _train_step(self, interrupted: bool) -> tuple[float, bool]:
        """One optimizer step; returns (loss averaged over processes, whether any process got SIGINT)."""
        indices = self.stream.batch(self.step, self.config.batch_size, self.ctx.rank, self.ctx.world_size)
        batch = self._batch([self.train_ids[i] for i in indices], self._labels(self.train_set, indices))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.forward_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # One collective per step carries both the loss and the interrupt flag, so all ranks stop together.
        loss_sum, stop = all_reduce_sum([loss.item(), float(interrupted)], self.ctx, self.device)
        if not math.isfinite(loss_sum):
            raise LoraAnalysisError(f"training diverged at step {self.step} (loss {loss_sum}); lower the learning rate")
        return loss_sum / self.ctx.world_size, stop > 0

    def _batch(self, token_ids: list[list[int]], labels: list[int] | None) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(token_ids, self.pad_id, labels).items()}

    @staticmethod
    def _labels(dataset: TextDataset, indices: list[int]) -> list[int] | None:
        return None if dataset.labels is None else [dataset.labels[i] for i in indices]

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Validation metrics at the current step: accuracy and mean cross-entropy for
        classification; token-level mean loss and perplexity exp(loss) for causal LM."""
        if not len(self.val_set):
            return
        self.model.eval()
        # This process's shard, sorted by length so batches carry little padding.
        shard = sorted(range(self.ctx.rank, len(self.val_set), self.ctx.world_size), key=lambda i: len(self.val_ids[i]))
        loss_sum = correct = count = 0.0
        size = self.config.eval_batch_size
        for start in range(0, len(shard), size):
            indices = shard[start : start + size]
            batch = self._batch([self.val_ids[i] for i in indices], self._labels(self.val_set, indices))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if self.classify:
                loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                correct += (logits.argmax(-1) == batch["labels"]).sum().item()
                count += len(indices)
            else:
                targets = batch["labels"][:, 1:]
                loss_sum += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum").item()
                count += (targets != -100).sum().item()
        self.model.train()
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], self.ctx, self.device)
        record = {"step": self.step, "val_loss": loss_sum / max(count, 1)}
        if self.classify:
            record["val_accuracy"] = correct / max(count, 1)
        else:
            record["val_perplexity"] = math.exp(min(record["val_loss"], 700.0))
        self.progress["evals"].append(record)

    # -- checkpoints ------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        assert self.output_dir is not None, "only runs with an output_dir checkpoint"
        return self.output_dir / CHECKPOINT_NAME

    def _save_checkpoint(self, started: float) -> None:
        if self.output_dir is None:
            return
        rng_states = gather_to_main(rng_state(self.device), self.ctx)
        if rng_states is not None:  # rank 0: gather_to_main gives the other ranks None
            progress = dict(self.progress, wall_time_s=self.progress["wall_time_s"] + time.perf_counter() - started)
            save_checkpoint(
                self.checkpoint_path, step=self.step, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, rng_states=rng_states, progress=progress, recipe=self.config.recipe(),
            )
        barrier(self.ctx)

    def _resume(self) -> None:
        """Continue from the verified checkpoint (see `checkpoint`): same recipe, same process
        count, every tensor and state exactly as saved."""
        path = self.checkpoint_path
        state = load_checkpoint(path)
        check_recipe(path, state["recipe"], self.config.recipe())
        step = check_resumable(path, state, steps=self.config.steps, world_size=self.ctx.world_size, device=self.device)
        restore(path, state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                rank=self.ctx.rank, device=self.device)
        self.step, self.progress, self.status = step, state["progress"], "resumed"

    def _on_interrupt(self, started: float) -> None:
        """SIGINT arrived during the step just finished: checkpoint the consistent state, stop."""
        self._save_checkpoint(started)
        if self.ctx.is_main and self.output_dir is not None:
            print(f"\nlora-analysis: saved a checkpoint at step {self.step}; continue with --resume", file=sys.stderr)
        raise KeyboardInterrupt

    # -- outputs ----------------------------------------------------------------------------

    def _finish(self) -> TrainResult:
        adapter = extract_adapter(self.model, self.lora_config)
        metrics = self._metrics(adapter)
        if self.ctx.is_main and self.output_dir is not None:
            # metrics.json marks a finished run: gone while the adapter is replaced, written last.
            (self.output_dir / METRICS_NAME).unlink(missing_ok=True)
            save_adapter(adapter, self.output_dir)
            atomic_write_text(self.output_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
            self.checkpoint_path.unlink(missing_ok=True)
        barrier(self.ctx)
        return TrainResult(adapter, metrics, self.output_dir, self.status, self.model)

    def _metrics(self, adapter: Adapter) -> dict[str, Any]:
        lora = adapter.num_parameters()
        trainable = sum(p.numel() for p in self.params)
        wall = self.progress["wall_time_s"]
        evals = self.progress["evals"]
        return {
            "completed": True,
            "task": self.config.task,
            "steps": self.step,
            "initial": evals[0] if evals and evals[0]["step"] == 0 else None,
            "final": evals[-1] if evals else None,
            "evals": evals,
            "train_loss": self.progress["train_loss"],
            "examples": {"train": len(self.train_set), "validation": len(self.val_set)},
            "label_names": self.train_set.label_names,
            "parameters": {
                "lora": lora,
                "head": trainable - lora,
                "trainable": trainable,
                "model": sum(p.numel() for p in self.model.parameters()),
            },
            "wall_time_s": wall,
            "examples_per_s": self.step * self.global_batch / wall if wall > 0 else None,
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "config": self.config.to_dict(),
            "versions": library_versions(),
        }


def _inject(model: nn.Module, config: LoraConfig, seed: int) -> None:
    """`inject_lora`, with the model's layer names in the error when the targets match nothing."""
    try:
        inject_lora(model, config, seed=seed)
    except LoraAnalysisError as err:
        if "matches no" not in str(err):
            raise
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_adaptable(m)})
        raise LoraAnalysisError(f"{err}; this model's Linear/Conv1D layers are named {leaves}") from None
    if not any(True for _ in lora_layers(model)):
        raise LoraAnalysisError("no LoRA layer was injected")


def advance(bar: tqdm) -> None:
    """Count one step on `bar`. Its last step is drawn only by `close()` (which always redraws),
    so a log shows the final line once, not twice."""
    if bar.total is not None and bar.n + 1 >= bar.total:
        bar.n += 1
    else:
        bar.update(1)


def warmup_then_linear_decay(warmup_steps: int, total_steps: int):
    """LR multiplier: 0 → 1 linearly over `warmup_steps`, then 1 → 0 linearly at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[threading.Event]:
    """The first Ctrl-C sets an event (the loop checkpoints after the current step and stops);
    a second one interrupts at once. Only the main thread can own signal handlers."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def handler(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def library_versions() -> dict[str, str]:
    import numpy
    import transformers

    from ..version import __version__

    return {
        "lora_analysis": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
