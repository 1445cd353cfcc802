"""Method knobs: each method declares its own pydantic model, composed of shared groups.

A trial config's `method` block is validated against the model of the method it names
(`method.name`), so a key the method does not read fails at load time with one line that
names the method and lists its knobs. The groups several methods share are defined once
here and composed by inheritance (the keys stay flat: `method.eps`, `method.beta`):

    AttackKnobs       eps, step_size, steps: the training attack
    TradesKnobs       + beta: TRADES' weight of the KL term
    MultiplierKnobs   FRL's class multipliers (reweight, remargin), shared by FRL and CAAT
    MetaKnobs         a meta-net and its meta steps (Meta-Weight-Net, CAAT)

A method changes a group's default by redeclaring the field with the group's type alias
(`meta_interval: MetaInterval = 20`): the bounds stay in one place. Torch-free: configs,
spaces and `caat-sweep methods` read these models without building anything.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Knobs(BaseModel):
    """The knobs of one method; subclasses add fields and fix ``name``."""

    # forbid: a knob the method does not have must fail, not be silently ignored.
    # validate_assignment: configs edited in code stay valid.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str

    @classmethod
    def knob_names(cls) -> list[str]:
        return sorted(k for k in cls.model_fields if k != "name")


# ------------------------------------------------------------------------- the attack

class AttackKnobs(Knobs):
    eps: float | None = Field(default=None, ge=0.0, le=1.0, description=(
        "L-inf training bound in pixel space; null: the dataset's (0.1 Fashion-MNIST, "
        "8/255 CIFAR)"))
    step_size: float | None = Field(default=None, gt=0.0, description=(
        "attack step; null: eps / 4"))
    steps: int = Field(default=10, ge=1, description="attack steps (K)")


class TradesKnobs(AttackKnobs):
    beta: float = Field(default=6.0, ge=0.0, description=(
        "weight of TRADES' KL(f(x) || f(x_adv)) term"))


# --------------------------------------------------------------- FRL's class multipliers

MarginLimit = Annotated[float, Field(ge=1.0, description=(
    "largest class bound scale (fair_robust: 3; CAAT: 2.5)"))]
BoundStep = Annotated[Literal["fixed", "max_bound"], Field(description=(
    "attack step at class bounds: fixed step_size (CAAT), or step_size * the batch's "
    "largest bound scale (FRL's max_i(eps_i) / 4)"))]


class MultiplierKnobs(Knobs):
    frl_mode: Literal["reweight", "remargin", "both"] = Field(default="both", description=(
        "reweight the loss terms per class, remargin the class bounds, or both"))
    tolerance: float = Field(default=0.05, ge=0.0, description=(
        "error gap over the average tolerated before a class is pushed"))
    reweight_rate: float = Field(default=0.05, ge=0.0, description=(
        "step of the reweight multipliers (lam1 takes twice it, as FRL)"))
    reweight_halving: int | None = Field(default=40, ge=1, description=(
        "epochs between halvings of reweight_rate (both references: 40); null: never"))
    remargin_rate: float = Field(default=0.2, ge=0.0, description=(
        "step of the remargin multipliers"))
    weight_limit: float = Field(default=0.5, gt=0.0, le=1.0, description=(
        "cap on the total of the reweight multipliers (<= 1 keeps every weight >= 0)"))
    margin_floor: float = Field(default=0.98, gt=0.0, le=1.0, description=(
        "smallest class bound scale (both references: 0.98)"))
    margin_limit: MarginLimit = 2.5
    frl_measure: Literal["eval_bound", "class_bound"] = Field(
        default="eval_bound", description=(
            "where the class errors are measured on the meta set: at the evaluation attack "
            "(as the references), or each class at its own bound with the training attack"))
    bound_step: BoundStep = "fixed"


# ------------------------------------------------------------------------ meta-learning

MetaInterval = Annotated[int, Field(ge=1, description="batches between meta steps")]
MetaLR = Annotated[float, Field(gt=0.0, description="the meta-net's Adam learning rate")]
MetaWeightDecay = Annotated[float, Field(ge=0.0, description=(
    "the meta-net's Adam weight decay"))]


class MetaKnobs(Knobs):
    meta_interval: MetaInterval = 50
    meta_lr: MetaLR = 1e-3
    meta_weight_decay: MetaWeightDecay = 1e-4
    meta_hidden: int = Field(default=100, ge=1, description="the meta-net's hidden units")
    meta_batch_size: int = Field(default=100, ge=1, description=(
        "clean meta-set samples per meta step"))


# ------------------------------------------------------------------------- description


def describe(model: type[Knobs]) -> list[dict[str, Any]]:
    """Each knob of a method: name, type, default, bounds and what it does (JSON-ready),
    for `caat-sweep methods`."""
    out = []
    for name in model.knob_names():
        field = model.model_fields[name]
        bounds = {}
        for item in field.metadata:
            for key in ("ge", "gt", "le", "lt"):
                if getattr(item, key, None) is not None:
                    bounds[key] = getattr(item, key)
        out.append({"name": name, "type": _type_name(field.annotation),
                    "default": field.default, "bounds": bounds,
                    "description": field.description or ""})
    return out


def _type_name(annotation: Any) -> str:
    text = str(annotation)
    for noise in ("typing.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None")
