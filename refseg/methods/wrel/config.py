"""WRELConfig: the `wrel` section of a training config (LRB-WREL's stages), one comment per field.

In a config file the section is `wrel: {teacher_steps: 3000, ...}`; on the
command line each field is a flag `--wrel-<field>` (`--wrel-bank-lr 0.1`).
A plain run ignores the section.
"""

from dataclasses import dataclass

FINAL_CHOICES = ("teacher", "student")
EMA_RESCALE_CHOICES = ("horizon", "breaks")
BANK_SITE_CHOICES = ("encoder", "features")  # bank.py SITES


@dataclass
class WRELConfig:
    teacher_steps: int = 0  # stage 1 (teacher on the accurate refs) optimiser steps (0 = as max_steps / epochs)
    bank_prompts: int = 20  # stage 2: learnable prompt vectors per weak ref, placed after the class-name tokens
    bank_site: str = "features"  # stage 2: where the prompts enter: features (extra tokens of the frozen text encoder's output; a step costs the head only) or encoder (word embeddings read by the text encoder)
    bank_iters: int = 10  # stage 2: Adam steps spent on each weak ref's prompts
    bank_lr: float = 0.01  # stage 2: Adam learning rate of the prompts
    bank_batch: int = 0  # stage 2: weak refs optimised together (0 = batch_size)
    ema_epochs: float = 40.0  # stage 3: length in epochs of the run the EMA schedule (epochs 0-1-3) is written for; shorter runs squeeze it
    ema_rescale: str = "horizon"  # stage 3, a run shorter than ema_epochs: horizon (breakpoints squeezed and each 1 - momentum scaled up by the same factor, so the EMA averages over the same fraction of the run) or breaks (breakpoints squeezed, momenta as written)
    accurate_repeat: int = 1  # stage 3: each accurate sentence appears this many times per epoch, weak ones once (1 = the mixed data as they are)
    final: str = "teacher"  # stage 3: the network validated, kept in best/ and shipped: teacher (the EMA) or student

    CHOICES = {"final": FINAL_CHOICES, "ema_rescale": EMA_RESCALE_CHOICES, "bank_site": BANK_SITE_CHOICES}
    RESUME_FIXED = ("accurate_repeat", "bank_batch", "bank_prompts", "bank_site")  # a resumed run keeps them

    def validate(self) -> "WRELConfig":
        """Raise ValueError naming the field (`wrel.<field>`) of a value out of range; return self."""
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"wrel.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("bank_prompts", "bank_iters", "accurate_repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"wrel.{name} must be positive, got {getattr(self, name)}")
        for name in ("bank_lr", "ema_epochs"):
            if not getattr(self, name) > 0 or getattr(self, name) == float("inf"):
                raise ValueError(f"wrel.{name} must be a positive finite number, got {getattr(self, name)}")
        for name in ("teacher_steps", "bank_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"wrel.{name} must be >= 0, got {getattr(self, name)}")
        return self
