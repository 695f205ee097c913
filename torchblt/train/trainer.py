"""The training loop: ``Trainer(cfg).fit()``.

Per optimizer step (:meth:`Trainer.train_step`): ``grad_accum`` micro-batches are read, the number of
target tokens of the whole step is summed over ranks, and each micro-batch's *summed* fp32 loss is
scaled by ``world_size / global_tokens`` before its backward (FSDP averages gradients over ranks), so
the gradient is that of the mean token loss of the global batch however it is split. The gradient norm
is clipped once, on the full (all-shard) norm. Metrics are summed over ranks in fp64. A non-finite loss
or gradient norm stops the run *before* the optimizer step, with a clear message; the last checkpoint
is untouched. Bad data records (``data.on_bad_record: skip``: skipped, or kept when only not UTF-8, or
split when too long) are summed over ranks and logged with every step (``data_skipped``, ``data_<reason>``);
a line says so when the first appears and at the end (``error``: the first one stops the run, named).

Around it: :meth:`maybe_eval` (validation bits-per-byte via :func:`torchblt.eval.bpb.evaluate_bpb`),
:meth:`maybe_checkpoint`, :meth:`log`. SIGTERM / SIGINT / SIGUSR2 finish the current step, save a
checkpoint and return. Re-running on a run folder with checkpoints resumes from the latest one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchblt.data.sources import BAD_RECORD_REASONS, SKIPPED_REASONS, bad_record_summary
from torchblt.formats.common import build_model
from torchblt.model.blt import BLT
from torchblt.model.config import config_to_dict
from torchblt.model.entropy_model import EntropyModel
from torchblt.patching import Patcher
from torchblt.train import checkpoint as ckpt
from torchblt.train import materialize
from torchblt.train.config import TrainConfig, config_to_yaml
from torchblt.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, parallelize
from torchblt.train.hash_sharding import clip_gradients, init_adamw_state, optimizer_step, zero_row_grads
from torchblt.train.kinds import get_kind
from torchblt.train.metrics import MetricsLogger, device_peak_flops, training_flops_per_byte
from torchblt.train.schedule import lr_factor
from torchblt.train.state import TrainState


def bad_record_fields(stats: dict[str, int], prefix: str) -> dict[str, int]:
    """Metrics of the bad records in ``stats``: ``{prefix}_skipped`` (always) and ``{prefix}_{reason}`` (when not 0)."""
    out = {f"{prefix}_skipped": sum(int(stats.get(k, 0)) for k in SKIPPED_REASONS)}
    out.update({f"{prefix}_{k}": int(stats[k]) for k in BAD_RECORD_REASONS if stats.get(k)})
    return out


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf."""


def _broadcast_object(obj: Any) -> Any:
    """``obj`` of rank 0 on every rank (no-op in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    def __init__(self, cfg: TrainConfig, *, loader: Any = None, dist_info: DistInfo | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.train.device, cfg.train.data_parallel)
        self.device = self.dist.device
        self.kind = get_kind(cfg.model.kind)
        self.run_dir = Path(cfg.run_dir)
        ckpt.check_run_dir(self.run_dir)  # before anything is written there
        self.bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and self.device.type == "cuda")
        self.state = TrainState()
        self.signal_received: int | None = None  # set by the handler, on this rank
        self.stop_signal: int | None = None  # set from all ranks' flags in train_step: every rank stops together

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.entropy_model = self._load_entropy_model()
        self.data_cfg = dataclasses.replace(cfg.data, kind=self.kind.data_kind)
        self.model = self._build_model()
        self.loader = loader if loader is not None else self._make_loader()
        if isinstance(self.model, BLT):
            self._sync_patching(self.model)
        self.raw_config = self.model.config
        self.param_count = sum(p.numel() for p in self.model.parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=self.device.type == "cuda" or None)
        self.lr_at = lambda step: o.lr * lr_factor(step, schedule=o.schedule, warmup_steps=o.warmup_steps,
                                                   total_steps=cfg.train.steps, min_lr_ratio=o.min_lr_ratio,
                                                   decay_fraction=o.decay_fraction)
        self.resumed_from = self._maybe_resume()
        self.batches = iter(self.loader)
        self.metrics = MetricsLogger(
            self.run_dir, total_steps=cfg.train.steps, start_step=self.state.step, enabled=self.dist.is_main,
            progress=cfg.log.progress, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
            wandb_project=cfg.log.wandb_project, config=dataclasses.asdict(cfg))
        self.peak_flops = device_peak_flops(self.device)
        self.last_val: dict[str, float] = {}
        self.bad_records: dict[str, int] = {}  # summed over ranks, at the last step
        self._bad_reported = self._val_bad_reported = False
        self._flops: dict[float | None, float] = {}
        self._profiler = None

    # ------------------------------------------------------------------ set-up
    def _load_entropy_model(self):
        path = self.cfg.model.entropy_model or self.cfg.data.entropy_model
        if path is None:
            return None
        from torchblt.formats import load_model
        from torchblt.model.entropy_model import EntropyModel

        em = load_model(path, device=self.device)
        if not isinstance(em, EntropyModel):
            raise ValueError(f"model.entropy_model: {path} is not an entropy model")
        return em.requires_grad_(False)

    def _build_model(self) -> nn.Module:
        """Build on the meta device, ``parallelize`` (shard), then materialise only this rank's shards:
        from the checkpoint being resumed (later, by DCP), from ``init_from`` (a DCP checkpoint, or a
        model folder read by slices / on rank 0), or by a random init equal to a one-process one."""
        cfg, source = self.cfg, self.cfg.model.init_from
        weights = state = dcp_source = None
        if source and ckpt.is_checkpoint_or_run(source):
            dcp_source = ckpt.resolve_checkpoint(source)
            config, _ = ckpt.checkpoint_model_config(dcp_source)
        elif source:
            from torchblt.formats.lazy import open_weights

            opened = open_weights(source)
            if opened is not None:
                config, weights = opened
            else:  # a layout without slices: rank 0 reads it whole, the shards are broadcast
                from torchblt.formats import load_model

                full = load_model(source) if self.dist.is_main else None
                config = full.config if full is not None else None
                config = _broadcast_object(config)
                state = full.state_dict() if full is not None else None
        else:
            config = self.kind.make_config(cfg.model.arch)
        model = build_model(config, device="meta")
        self._check_fits(model)
        want = BLT if self.kind.data_kind == "blt" else EntropyModel
        if not isinstance(model, want):
            raise ValueError(f"model.init_from: {source} holds a {type(model).__name__}, "
                             f"model.kind {cfg.model.kind!r} trains a {want.__name__}")
        parallelize(model, self.dist.mesh, compile=cfg.train.compile,
                    activation_checkpointing=cfg.train.activation_checkpointing,
                    mixed_precision=self.bf16 and self.dist.mesh is not None and self.device.type == "cuda",
                    hash_sharding=cfg.train.hash_sharding)
        resuming = ckpt.latest_checkpoint(self.run_dir) is not None
        if resuming or dcp_source is not None:
            model.to_empty(device=self.device)  # the tensors come from a DCP checkpoint (resume: _maybe_resume)
            materialize.reset_buffers(model)
            if not resuming:
                ckpt.load_model_weights(dcp_source, model)
        elif weights is not None:
            materialize.load_shards(model, weights, self.device)
        elif source:
            materialize.load_from_rank0(model, state, self.device)
        else:
            materialize.init_weights(model, self.device)
        model.train()
        return model

    def _check_fits(self, model: nn.Module) -> None:
        """A ``ValueError`` naming ``model.arch`` when the weights alone exceed the device's memory (a typo such
        as ``dim: 100000``), instead of an allocation failure deep in the set-up."""
        n = sum(p.numel() for p in model.parameters())
        need = 4 * n / (self.dist.world_size if self.dist.mesh is not None else 1)  # fp32, FSDP-sharded
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        if total and need > total:
            raise ValueError(f"model.arch: {n:.3g} parameters need {need / 2**30:,.1f} GiB in fp32 on {self.device}, "
                             f"more than its {total / 2**30:,.0f} GiB of memory; check the sizes")

    def _make_loader(self) -> Any:
        """The kind's loader (given the model's config), or :func:`torchblt.data.build_loader`."""
        kw = dict(rank=self.dist.rank, world_size=self.dist.world_size, entropy_model=self.entropy_model)
        if self.kind.make_loader is not None:
            return self.kind.make_loader(self.data_cfg, model_config=self.model.config, **kw)
        from torchblt.data import build_loader

        return build_loader(self.data_cfg, **kw)

    def _sync_patching(self, model: BLT) -> None:
        """The exported model patches as it was trained: its ``config.patching`` is the loader's patching
        (``loader.patching``: ``data.patching`` with the threshold in use, calibrated or restored on resume;
        an injected loader that does not say uses ``data.patching``). A threshold the data leaves to
        calibration that never ran (no entropy patching) keeps the model's."""
        patching = getattr(self.loader, "patching", None) or self.data_cfg.patching
        if patching.threshold is None:
            patching = dataclasses.replace(patching, threshold=model.config.patching.threshold)
        model.config.patching = dataclasses.replace(patching)

    def model_config_record(self) -> dict[str, Any]:
        return {"kind": self.cfg.model.kind, "arch": config_to_dict(self.raw_config),
                "entropy_model": self.cfg.model.entropy_model or self.cfg.data.entropy_model}

    def _maybe_resume(self) -> Path | None:
        def same_architecture(path: Path) -> None:
            saved, now = ckpt.read_model_config(path).get("arch", {}), config_to_dict(self.raw_config)
            saved.pop("patching", None)
            now.pop("patching", None)  # the patching threshold may be calibrated: compared by the loader
            if saved != now and not self.cfg.model.init_from:
                raise ValueError(f"{path}: checkpoint architecture differs from model.arch; use a new run_dir "
                                 "(or init_from to fine-tune from exported weights)")

        if ckpt.latest_checkpoint(self.run_dir) is not None:
            init_adamw_state(self.optimizer)  # (else DCP would step with zero gradients, dense for the hash tables)
        found = ckpt.resume_latest(self.run_dir, self.model, self.optimizer, self.dist, check=same_architecture)
        if found is None:
            return None
        latest, train_state = found
        self.state.load_state_dict(train_state)
        saved_world = ckpt.saved_world_size(latest)
        if self.state.data:
            if saved_world == self.dist.world_size:
                self.loader.load_state_dict(self.state.data)
            else:  # another number of processes: every rank takes its shards from all the saved ranks' states
                merge = getattr(type(self.loader), "merge_states", None)
                if merge is None:
                    raise ValueError(f"{latest}: written by {saved_world} process(es), now {self.dist.world_size}; "
                                     f"this data loader ({type(self.loader).__name__}) can only resume on the same "
                                     "number of processes")
                self.loader.load_state_dict(merge([st.get("data", {}) for st in ckpt.read_train_states(latest)]))
            if isinstance(self.model, BLT):
                self._sync_patching(self.model)
        return latest

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or until a stop signal); returns the last logged metrics."""
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
            if self.resumed_from is not None:
                self.metrics.message(f"resuming from {self.resumed_from} (step {self.state.step})")
        record: dict[str, Any] = {}
        with self._signals():
            while self.state.step < cfg.train.steps:
                self._maybe_profile()
                record = self.train_step()
                self.state.step += 1
                self.metrics.advance()
                record.update(self.maybe_eval())
                self.log(record)
                if self.stop_signal is not None:
                    self.save()
                    self.metrics.message(f"stopped by signal {self.stop_signal} at step {self.state.step}; "
                                         f"checkpoint saved. Re-run the same command to resume.")
                    self.metrics.close()
                    return record
                self.maybe_checkpoint()
        if self._profiler is not None:
            self._profiler.stop()
        if not ckpt.latest_checkpoint(self.run_dir) or self.state.step % cfg.checkpoint.every:
            self.save()
        if any(self.bad_records.values()):
            self.metrics.message(f"data: {bad_record_summary(self.bad_records)}")
        if not self.last_val and self._val_enabled() and self.state.step > 0:
            val = self.maybe_eval(force=True)
            if val:
                self.log({"step": self.state.step, **val})
                record.update(val)
        if cfg.checkpoint.export:
            self.export(self.run_dir / "model")
        if self.dist.is_main:
            (self.run_dir / "finished.json").write_text(
                json.dumps({"step": self.state.step, **{k: v for k, v in record.items() if k.startswith("val")}}),
                encoding="utf-8")
        self.metrics.close()
        return record

    def train_step(self) -> dict[str, Any]:
        cfg, model, t0 = self.cfg, self.model, time.perf_counter()
        lr = self.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [next(self.batches).to(self.device) for _ in range(cfg.train.grad_accum)]
        local_tokens = sum(int(b.mask.sum()) for b in micro)
        (global_tokens,) = all_reduce_sum([float(local_tokens)], self.device)
        scale = self.dist.world_size / max(global_tokens, 1.0)
        loss_sum, n_bytes, n_patches, patched = 0.0, 0, 0, 0
        for i, batch in enumerate(micro):
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce gradients on the last micro-batch
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with self._autocast():
                out = self.kind.loss(model, batch)
            (out.loss_sum * scale).backward()
            loss_sum += float(out.loss_sum.detach())
            n_bytes += out.n_bytes
            n_patches += out.n_patches or 0
            patched += out.patched_bytes or 0
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_gradients(model, clip)  # (hash tables: row gradients, see train/hash_sharding.py)
        signalled = self.signal_received  # read once: the handler may fire at any time
        data_stats = getattr(self.loader, "stats", None) or {}  # cumulative bad-record counts of this rank's data
        sums = all_reduce_sum([loss_sum, float(local_tokens), float(n_bytes), float(n_patches), float(patched),
                               float(signalled is not None), *(float(data_stats.get(k, 0)) for k in BAD_RECORD_REASONS)],
                              self.device)
        loss = sums[0] / max(sums[1], 1.0)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            zero_row_grads(model)
            last = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"step {self.state.step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; stopped before "
                f"the optimizer step. Last good checkpoint: {last or 'none'} (lower optim.lr, raise "
                "optim.warmup_steps or check the data; re-running resumes from that checkpoint)")
        if sums[5] > 0:  # some rank was signalled before this reduction: all ranks stop after this step
            self.stop_signal = signalled or signal.SIGTERM
        optimizer_step(model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        zero_row_grads(model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.state.bytes_seen += int(sums[2])
        record = {"step": self.state.step + 1, "loss": loss, "bpb": loss * sums[1] / max(sums[2], 1.0) / math.log(2),
                  "lr": lr, "grad_norm": grad_norm, "bytes_per_s": sums[2] / dt, "step_time_s": dt,
                  "bytes_seen": self.state.bytes_seen}
        if sums[3] > 0:
            record["mean_patch_length"] = sums[4] / sums[3]
        flops = self.flops_per_byte(record.get("mean_patch_length"))
        record["flops_per_byte"] = flops
        if self.peak_flops:
            record["mfu"] = flops * sums[2] / dt / (self.peak_flops * self.dist.world_size)
        if self.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.bad_records = {k: int(v) for k, v in zip(BAD_RECORD_REASONS, sums[6:])}
        record.update(bad_record_fields(self.bad_records, "data"))
        if not self._bad_reported and any(self.bad_records.values()):
            self._bad_reported = True
            self.metrics.message(f"data: {bad_record_summary(self.bad_records)} so far (data.on_bad_record: "
                                 f"{cfg.data.on_bad_record}; the counts are logged as data_* in metrics.jsonl)")
        return record

    # ------------------------------------------------------------------ around the loop
    def flops_per_byte(self, mean_patch_length: float | None = None) -> float:
        key = None if mean_patch_length is None else round(mean_patch_length, 2)
        if key not in self._flops:
            d = self.data_cfg
            context = d.seq_len if d.kind == "bytes" else (d.max_bytes or d.seq_len * (key or 4.5))
            self._flops[key] = training_flops_per_byte(self.model, key, context)[0]
        return self._flops[key]

    def _val_enabled(self) -> bool:
        return bool(self.cfg.data.validation)

    def maybe_eval(self, force: bool = False) -> dict[str, float]:
        every, step = self.cfg.eval.every, self.state.step
        due = force or (every > 0 and step % every == 0) or step == self.cfg.train.steps
        if not (due and self._val_enabled()):
            return {}
        from torchblt.data import iter_documents, new_stats
        from torchblt.eval.bpb import evaluate_bpb

        patcher = None
        if isinstance(self.model, BLT):
            patcher = Patcher(self.model.config.patching, self.entropy_model)
            if patcher.mode == "entropy" and patcher.entropy_model is None:
                raise ValueError("validation with entropy patching needs model.entropy_model (a frozen entropy model)")
        e = self.cfg.eval
        # every rank evaluates all documents (FSDP needs every rank in every forward); the results are equal
        d, val_stats = self.cfg.data, new_stats()
        docs = iter_documents(d.validation, d.text_field, stats=val_stats, on_bad_record=d.on_bad_record)
        self.model.eval()
        try:
            with self._autocast():
                res = evaluate_bpb(self.model, docs, patcher=patcher, context_bytes=e.context_bytes,
                                   batch_size=e.batch_size, device=self.device, max_documents=e.max_documents)
        finally:
            self.model.train()
        self.last_val = {"val_bpb": res.bpb, "val_bytes": res.n_bytes, **bad_record_fields(val_stats, "val")}
        if not self._val_bad_reported and bad_record_summary(val_stats):
            self._val_bad_reported = True
            self.metrics.message(f"validation data: {bad_record_summary(val_stats)}")
        if res.mean_patch_length is not None:
            self.last_val["val_mean_patch_length"] = res.mean_patch_length
        return dict(self.last_val)

    def maybe_checkpoint(self) -> None:
        if self.state.step % self.cfg.checkpoint.every == 0:
            self.save()

    def save(self) -> Path:
        self.state.data = self.loader.state_dict()
        return ckpt.save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer,
                                    self.state.state_dict(), self.model_config_record(), self.dist,
                                    self.cfg.checkpoint.keep)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step % self.cfg.log.every == 0 or step == self.cfg.train.steps or any(k.startswith("val") for k in record):
            self.metrics.log(record)

    def export(self, out: Path) -> None:
        """Write the inference format (``load_model`` reads it) to ``out`` (rank 0; gathers FSDP shards)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.is_main:
            export_state(state, self.raw_config, out, self.entropy_model,
                         extra={"trained_steps": self.state.step, "trained_bytes": self.state.bytes_seen,
                                "kind": self.cfg.model.kind})
        barrier()

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.signal_received is not None:  # a second signal: stop now (the last checkpoint stays valid)
                raise KeyboardInterrupt(f"second signal {signum}: stopped without saving")
            self.signal_received = signum
            self.metrics.message(f"signal {signum}: finishing this step, then saving a checkpoint")

        names = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR2] if hasattr(signal, "SIGUSR2") else [])
        previous = {s: signal.signal(s, handler) for s in names}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _autocast(self):
        if self.bf16 and self.dist.mesh is None:
            # with activation checkpointing the blocks keep no bf16 weight copies for the backward; without
            # the cache neither does autocast (blt-1b on one GPU: 2.7 GiB less at the peak, same numbers)
            return torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  cache_enabled=not self.cfg.train.activation_checkpointing)
        return contextlib.nullcontext()

    def _maybe_profile(self) -> None:
        steps = self.cfg.log.profile_steps
        if not steps:
            return
        if self.state.step == steps[0] and self._profiler is None:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profiler = profile(activities=acts, record_shapes=True, on_trace_ready=tensorboard_trace_handler(
                str(self.run_dir / "profile"), worker_name=f"rank{self.dist.rank}"))
            self._profiler.start()
        elif self.state.step == steps[1] and self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
            self.metrics.message(f"profiler trace written to {self.run_dir / 'profile'}")


def export_state(state: dict[str, torch.Tensor], config: Any, out: Path, entropy_model: nn.Module | None,
                 extra: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Build a plain model from ``config``, load ``state`` and write it (+ entropy model) with ``save_model``."""
    from torchblt.formats import save_model
    from torchblt.formats.common import load_state_dict_strict

    model = build_model(config, device="meta")
    # take: no second copy of the weights; the model only lives to be written (it may alias the trainer's)
    load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, source="training state", take=True)
    em = entropy_model if isinstance(model, BLT) else None
    return save_model(model, out, overwrite=overwrite, extra=extra, entropy_model=em)  # type: ignore[arg-type]


def run_training(config_path: str | Path | None, overrides: list[str], run_dir: str | None = None,
                 print_config: bool = False) -> dict[str, Any]:
    """Load a run config (YAML + dotted overrides), train, and return the last logged metrics.

    A diverged run raises ``ValueError`` with the message of :class:`TrainingDiverged`. ``print_config``
    only prints the resolved config."""
    from torchblt.train.config import load_config

    cfg = load_config(config_path, list(overrides) + ([f"run_dir={run_dir}"] if run_dir else []))
    if print_config:
        print(config_to_yaml(cfg), end="")
        return {}
    try:
        return Trainer(cfg).fit()
    except TrainingDiverged as e:
        raise ValueError(str(e)) from None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
