"""`ttt-speech finetune`: run a config here, on several local processes (torchrun), or through submitit.

On SLURM, submitit sends SIGUSR2 before the time limit or on preemption; `FinetuneJob.checkpoint` then requeues
the same job, which resumes from the run's latest checkpoint (saved every `ckpt_freq` steps, and on SIGTERM /
SIGUSR1 at the end of the current step).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ttt_speech.config import load_config
from ttt_speech.errors import ConfigError
from ttt_speech.train.config import TrainConfig, check_lm_kwargs


@dataclasses.dataclass
class SlurmConfig:
    """submitit parameters. `cluster`: "slurm", "local" (a local process, as submitit's local executor), or "debug"
    (in this process)."""

    cluster: str = "slurm"
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 10
    time_min: int = 60 * 24
    account: str | None = None
    constraint: str | None = None
    qos: str | None = None
    mem_gb: int | None = None
    signal_delay_s: int = 120
    max_requeues: int = 10


class FinetuneJob:
    """A picklable, checkpointable callable: submitit runs it on every task; each task reads its rank from the
    SLURM environment."""

    def __init__(self, config_path: str, overrides: list[str]) -> None:
        self.config_path, self.overrides = config_path, list(overrides)

    def __call__(self) -> dict[str, Any]:
        import submitit

        from ttt_speech.train.trainer import train

        try:
            env = submitit.helpers.TorchDistributedEnvironment()
            env.export(set_cuda_visible_devices=False)
        except RuntimeError:  # not inside a submitit job (debug executor)
            pass
        os.environ.setdefault("NO_TORCH_COMPILE", "1")
        cfg = load_config(TrainConfig, self.config_path, self.overrides)
        result = train(cfg)
        result.pop("losses", None)
        return result

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(FinetuneJob(self.config_path, self.overrides))


def executor_parameters(slurm: SlurmConfig) -> dict[str, Any]:
    """The `update_parameters` arguments for submitit's AutoExecutor."""
    params: dict[str, Any] = {"timeout_min": slurm.time_min, "nodes": slurm.nodes}
    if slurm.cluster == "slurm":
        params.update(tasks_per_node=slurm.gpus_per_node, gpus_per_node=slurm.gpus_per_node,
                      cpus_per_task=slurm.cpus_per_task, slurm_signal_delay_s=slurm.signal_delay_s,
                      slurm_max_num_timeout=slurm.max_requeues)
        extra = {"slurm_partition": slurm.partition, "slurm_account": slurm.account,
                 "slurm_constraint": slurm.constraint, "slurm_qos": slurm.qos,
                 "mem_gb": slurm.mem_gb}
        params.update({k: v for k, v in extra.items() if v is not None})
    return params


def check(config_path: str, overrides: list[str], nproc: int | None = 1) -> TrainConfig:
    """The config with its overrides, checked as the job will check it (types, unknown keys, `ttt:` against the
    TTT schema, nonsense values), `model.lm_kwargs` (a name, a mapping, or a JSON file holding an object), plus what
    depends on the process count; builds nothing, reads no data."""
    cfg = load_config(TrainConfig, config_path, overrides)
    try:
        check_lm_kwargs(cfg.model)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from e
    if nproc is not None and nproc > 1 and cfg.parallel == "none":
        raise ConfigError(f"{config_path}: parallel: none with {nproc} processes: nothing would synchronise their "
                          "gradients; use parallel: fsdp2, or one process")
    return cfg


def submit(config_path: str, overrides: list[str], slurm: SlurmConfig, folder: str | Path | None = None):
    """Submit the fine-tune as a submitit job; returns the job (`job.result()` waits for it)."""
    import submitit

    if slurm.cluster not in ("slurm", "local", "debug"):
        raise ValueError(f"cluster must be slurm, local or debug, got {slurm.cluster!r}")
    tasks = slurm.nodes * slurm.gpus_per_node if slurm.cluster == "slurm" else 1
    cfg = check(config_path, overrides, nproc=tasks)  # fail here, not on the cluster
    folder = Path(folder or Path(cfg.run_dir) / "submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster=slurm.cluster)
    executor.update_parameters(name=Path(cfg.run_dir).name, **executor_parameters(slurm))
    return executor.submit(FinetuneJob(str(Path(config_path).resolve()), overrides))


def run_local(config_path: str, overrides: list[str], nproc: int = 1) -> int:
    """In this process (nproc 1) or with torchrun (nproc > 1)."""
    cfg = check(config_path, overrides, nproc)  # before torchrun starts any process
    if nproc <= 1:
        from ttt_speech.train.trainer import train

        result = train(cfg)
        skipped = f", {result['skipped_steps']} non-finite steps skipped" if result.get("skipped_steps") else ""
        print(f"finetune {result['status']}: {result['steps']} steps, resumed from {result['resumed_from_step']}"
              f"{skipped}")
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ttt_speech.cli", "finetune", config_path, *overrides]
    return subprocess.call(cmd)
