"""Loggers written to disk whenever a checkpoint is: a run killed between checkpoints loses at most the metrics
of one checkpoint interval (Lightning's CSV logger otherwise holds up to 100 steps in memory)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class FlushLogsOnCheckpoint(Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()
