"""Fault injection: `CAAT_FAIL_AT_EPOCH` rules, and the reporter that raises by them.

Rules separated by `;`, each `EPOCH[:CELL_SUBSTRING[:always]]`: a matching trial raises
`InjectedFailure` before reporting that epoch, in its first attempt only (its retry resumes
from the previous epoch's checkpoint and gets past it; use EPOCH >= 2 for that), or in
every attempt with `always`. Example: `CAAT_FAIL_AT_EPOCH="2:/erm;2:/trades:always"`.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.errors import ConfigError

FAULT_ENV = "CAAT_FAIL_AT_EPOCH"


class InjectedFailure(RuntimeError):
    """Raised by fault injection (CAAT_FAIL_AT_EPOCH); never by real training."""


@dataclass(frozen=True)
class FailRule:
    epoch: int
    match: str = ""
    always: bool = False


def parse_fault_rules(text: str | None) -> list[FailRule]:
    rules = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        fields = part.strip().split(":")
        try:
            epoch = int(fields[0])
        except ValueError:
            raise ConfigError(f"{FAULT_ENV}: {part!r}: expected EPOCH[:CELL_SUBSTRING[:always]]"
                              ) from None
        always = len(fields) > 2 and fields[2] == "always"
        rules.append(FailRule(epoch, fields[1] if len(fields) > 1 else "", always))
    return rules


class FaultyReporter:
    """Wraps RayReporter: raises before reporting a matching epoch (fault injection)."""

    def __init__(self, inner, rules: list[FailRule], cell: str):
        self.inner = inner
        self.rules = [r for r in rules if r.match in cell]
        self.restored = False

    def latest_checkpoint(self):
        ckpt = self.inner.latest_checkpoint()
        self.restored = ckpt is not None
        return ckpt

    def report(self, metrics: dict, checkpoint_dir) -> None:
        for rule in self.rules:
            if metrics.get("epoch") == rule.epoch and (rule.always or not self.restored):
                when = "every attempt" if rule.always else "once"
                raise InjectedFailure(f"injected failure at epoch {rule.epoch} "
                                      f"({FAULT_ENV}, {when})")
        self.inner.report(metrics, checkpoint_dir)
