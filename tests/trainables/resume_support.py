"""Interrupting a trial as a killed process would, for the resume tests of every method
(`from resume_support import Interrupt, StopAfter, flat_tensors, timeless`)."""

from trainables.trial import DirectoryReporter


class Interrupt(Exception):
    pass


class StopAfter(DirectoryReporter):
    """A reporter that crashes the trial after `n` epochs, like a killed process."""

    def __init__(self, out_dir, n):
        super().__init__(out_dir)
        self.n = n

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["epoch"] == self.n:
            raise Interrupt


def flat_tensors(tree, prefix=""):
    """Every tensor and number in a nested state dict (or list), by path."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat_tensors(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list | tuple):
        return flat_tensors(dict(enumerate(tree)), prefix)
    return {prefix.rstrip("."): tree}


def timeless(history):
    """A metric history without its throughput (wall-clock dependent)."""
    return [{k: v for k, v in epoch.items() if k != "train_samples_per_s"} for epoch in history]
