"""Names of the metrics a trial reports, with no imports: the one list every reader derives from.

Evaluation (`trainables.metrics`) reports each scalar as f"{split}_{name}" and each class-wise
list as f"{split}_class_{...}"; the trial loop adds the training diagnostics. The sweeper's MLflow
contract (`sweeper.contract`) builds its selection metrics, table columns and class-wise
artifact keys from these tuples, so a metric added here reaches every reader.
"""

# Scalars `trainables.metrics.evaluate` returns for a split.
SCALAR_METRICS = (
    "natural_acc",
    "robust_acc",
    "worst_class_natural_acc",
    "worst_class_robust_acc",
    "class_natural_acc_std",
    "boundary_error",
)
# Class-wise lists `evaluate` returns for a split (one value per class, true labels), and the
# images per class they were measured on (the denominators a binomial interval needs).
CLASSWISE_METRICS = ("class_natural_acc", "class_robust_acc", "class_count")
# Splits evaluated: validation for selection, test for reporting.
EVAL_SPLITS = ("val", "test")
# AutoAttack (`eval.autoattack`), once after the last epoch, on a fixed class-stratified subset
# of the test split: scalars, and the class-wise list (true labels). `pgd_autoattack_gap` is
# PGD's robust accuracy on the same subset minus AutoAttack's (gradient masking shows as a
# large gap).
AUTOATTACK_METRICS = ("test_autoattack_acc", "test_worst_class_autoattack_acc",
                      "test_pgd_autoattack_gap")
AUTOATTACK_CLASSWISE = ("test_class_autoattack_acc", "test_class_autoattack_count")
# Beside them in the final report (`trainables.autoattack.evaluate_autoattack`): natural and
# PGD accuracy on AutoAttack's images (the gap's two terms) and how many lines its checks
# flagged (scalars); the flagged lines and the images' positions in the dataset's test
# split (lists, not class-wise: metrics.json has them as `autoattack_flags`/`_indices`).
AUTOATTACK_DETAILS = ("test_autoattack_natural_acc", "test_autoattack_pgd_acc",
                      "test_autoattack_flag_count")
AUTOATTACK_RECORDS = ("test_autoattack_flags", "test_autoattack_indices")
# Best and last checkpoints (`eval.keep_best`): the final report's `test_*` metrics are the last
# epoch's; the same metrics of the weights of the best evaluated epoch by `eval.best_metric`
# (a validation scalar) are `test_best_*` (AutoAttack's too with `eval.autoattack_best`), and
# `best_epoch` (1-based) says which epoch that was.
BEST_EPOCH = "best_epoch"
LAST_PREFIX, BEST_PREFIX = "test_", "test_best_"
# The validation scalars a lower value of which is better (a spread, an error).
LOWER_IS_BETTER_SCALARS = ("class_natural_acc_std", "boundary_error")
# Class-wise lists (one value per class, by observed label) the trial reports every epoch; it
# also reports each one's history as `<name>_by_epoch` (a list per epoch).
CLASSWISE_DIAGNOSTICS = ("train_class_frac_anti", "train_class_mean_eps")


def split_metrics(split: str, names: tuple[str, ...] = SCALAR_METRICS) -> tuple[str, ...]:
    """The reported names of ``names`` on ``split``: ("val", ...) -> ("val_natural_acc", ...)."""
    return tuple(f"{split}_{n}" for n in names)


def best_name(name: str) -> str:
    """The best checkpoint's name of a last-epoch test metric: "test_robust_acc" ->
    "test_best_robust_acc"."""
    if not name.startswith(LAST_PREFIX):
        raise ValueError(f"{name!r}: only test metrics have a best-checkpoint twin")
    return BEST_PREFIX + name[len(LAST_PREFIX):]
