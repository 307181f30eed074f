"""Where a run's metric rows go besides its own files: TensorBoard event files in the run folder (where
the tensorboard package is installed) and, with --track, Weights & Biases.

Each tracker takes the rows the metric log writes, as they are written: numbers already read back
from the device at the log interval, so tracking adds no device sync. A row's label columns (step,
epoch, seed, ...) are not drawn; a group's rows go under `<kind>/<metric>/seed<k>`.
"""
from __future__ import annotations

from pathlib import Path

from . import optional

LABELS = ("step", "epoch", "seed", "env_seed", "episodes")


def scalars(kind: str, row: dict) -> dict[str, float]:
    """A metric row's numbers under their tags (`train/loss_q`, `eval/score_mean/seed2`, in a grid
    `eval/score_mean/alpha=5/seed2`, ...)."""
    seed = (f"/{row['setting']}" if "setting" in row else "") + (f"/seed{row['seed']}" if "seed" in row else "")
    return {f"{kind}/{k}{seed}": v for k, v in row.items()
            if k not in LABELS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, kind: str, row: dict):
        for tag, v in scalars(kind, row).items():
            self.writer.add_scalar(tag, v, row["step"])

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A Weights & Biases run: `mode` "offline" writes it under the run folder's wandb/ with no network
    (`wandb sync` uploads it later); "online" needs a login (`wandb login`)."""

    def __init__(self, out: Path, config: dict, project: str, entity: str | None, mode: str, name: str):
        import wandb

        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(out), config=config, name=name,
                              resume="allow", id=_run_id(out))

    def write(self, kind: str, row: dict):
        self.run.log(scalars(kind, row), step=row["step"])

    def flush(self):
        pass

    def close(self):
        self.run.finish()


def _run_id(out: Path) -> str:
    """One W&B run per run folder, kept across resumes (its id stored in the folder)."""
    path = out / "wandb-run-id"
    if path.exists():
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)  # W&B ids: up to 64 of [a-z0-9]
    path.write_text(run_id + "\n")
    return run_id


def open_trackers(out: Path, track: bool = False, config: dict | None = None, project: str = "dtql_fast",
                  entity: str | None = None, mode: str = "online", name: str | None = None) -> list:
    """TensorBoard where it is installed; W&B when asked for (a missing wandb package is an error there)."""
    from .runfolder import TENSORBOARD

    trackers = [TensorBoard(out / TENSORBOARD)] if optional.have("tensorboard") else []
    if track:
        if not optional.have("wandb"):
            raise ImportError(optional.missing_message("wandb", "--track"))
        trackers.append(WandB(out, config or {}, project, entity, mode, name or out.name))
    return trackers
