"""Named configurations: the paper's recipes (App. B) and small ones for CPU demos and tests.

A configuration is plain data (frozen dataclasses). ``get_config(name)`` returns one by name;
``dataclasses.replace`` makes variants. The ``cifar10`` config is the paper's CIFAR10 recipe
(Ho et al. 2020, §4 and App. B; official ``scripts/run_cifar.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .diffusion import LEARNED_VAR_TYPES, GaussianDiffusion


@dataclass(frozen=True)
class ModelConfig:
    """The UNet of App. B (a PixelCNN++-style backbone with group norm and self-attention)."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3  # 2 * in_channels when the variance is learned
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    # Class-conditional (Ho & Salimans 2022): the number of classes; None is unconditional (the paper).
    num_classes: int | None = None


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the parameterization of the reverse process (§2–3, Table 2)."""

    schedule: str = "linear"  # β_1 = 1e-4 … β_T = 0.02
    T: int = 1000
    mean_type: str = "eps"  # or "x0", "mu" (Table 2), "v" (Salimans & Ho 2022)
    var_type: str = "fixed_large"  # σ_t² = β_t, the official CIFAR10 choice; or "learned_range" (Nichol & Dhariwal)
    loss_type: str = "simple"  # L_simple, eq. 14; or "vlb", "hybrid" (Nichol & Dhariwal 2021, §3.1)


@dataclass(frozen=True)
class TrainConfig:
    """Algorithm 1 at the paper's scale (App. B)."""

    dataset: str = "cifar10"  # "cifar10" or a folder of images
    batch_size: int = 128  # global batch, split over processes
    lr: float = 2e-4
    warmup: int = 5000  # linear learning-rate warm-up, in steps
    grad_clip: float = 1.0  # global gradient-norm clip
    ema_decay: float = 0.9999
    steps: int = 800_000
    random_flip: bool = True
    seed: int = 0
    # Classifier-free guidance (Ho & Salimans 2022): the probability that a training label is replaced by
    # the null label, so one network learns ε(x, y) and ε(x, ∅). Used only when model.num_classes is set.
    label_drop: float = 0.1


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        d, m = self.diffusion, self.model
        GaussianDiffusion.from_config(d)  # raises ValueError naming a bad schedule/mean/var/loss choice
        want = 2 * m.in_channels if d.var_type in LEARNED_VAR_TYPES else m.in_channels
        if m.out_channels != want:
            raise ValueError(
                f"model.out_channels={m.out_channels} does not fit var_type={d.var_type!r}: "
                f"expected {want} (2 × in_channels when the variance is learned)"
            )


CONFIGS: dict[str, Config] = {
    # The paper's CIFAR10 model: 35,746,307 parameters.
    "cifar10": Config("cifar10"),
    # LSUN / CelebA-HQ 256×256: 114M parameters, lr 2e-5 (App. B).
    "lsun256": Config(
        "lsun256",
        model=ModelConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
        train=TrainConfig(dataset="", batch_size=64, lr=2e-5),
    ),
    # A small 32×32 model (CIFAR10-sized images) for CPU demos.
    "small": Config(
        "small",
        model=ModelConfig(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, dropout=0.0, num_groups=16),
        train=TrainConfig(batch_size=64, warmup=200, ema_decay=0.999, steps=20_000),
    ),
    # Beyond the paper: the paper's CIFAR10 model conditioned on the 10 classes, for classifier-free
    # guidance (Ho & Salimans 2022): 35,751,939 parameters (the label embedding adds 11 × 512).
    "cifar10_cond": Config(
        "cifar10_cond",
        model=ModelConfig(num_classes=10),
        train=TrainConfig(label_drop=0.1),
    ),
    # The book's model: Fashion-MNIST (28×28 grey, 60,000 training images; Debian's dataset-fashion-mnist offline),
    # the paper's T = 1000, linear β, ε-prediction and σ² = β_t, with the paper's UNet scaled down to 1.1M
    # parameters (ch 32, three levels 28/14/7, one block per level, attention at 7×7) so that 6,000 steps of
    # batch 64 train on one CPU core in 74 minutes. No dropout (six epochs do not overfit) and no flips
    # (the data's shoes face one way: 96% of its ankle boots have more of their lower half on the right).
    # Trained by tools/train_book_model.py; its EMA weights ship in ddpm_lib/weights/.
    "fashion": Config(
        "fashion",
        model=ModelConfig(
            image_size=28, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
            attn_resolutions=(7,), dropout=0.0, num_groups=8,
        ),
        train=TrainConfig(dataset="fashion", batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999,
                          steps=6_000, random_flip=False),
    ),
    # Its class-conditional twin for classifier-free guidance (Ho & Salimans 2022): the same network plus a
    # label embedding for the 10 classes and the null label ∅, labels dropped to ∅ with probability 0.1.
    "fashion_cond": Config(
        "fashion_cond",
        model=ModelConfig(
            image_size=28, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
            attn_resolutions=(7,), dropout=0.0, num_groups=8, num_classes=10,
        ),
        train=TrainConfig(dataset="fashion", batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999,
                          steps=6_000, random_flip=False, label_drop=0.1),
    ),
    # Trains in seconds on a CPU: for tests and smoke runs.
    "tiny": Config(
        "tiny",
        model=ModelConfig(
            image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            dropout=0.0, num_groups=8,
        ),
        diffusion=DiffusionConfig(T=100),
        train=TrainConfig(batch_size=8, warmup=10, ema_decay=0.99, steps=50),
    ),
}


# What a run of a config needs before its samples look like its data, printed when training starts.
TRAINING_NOTES: dict[str, str] = {
    "tiny": "tiny is a smoke test of the code path (seconds a step on a CPU): its samples stay noise at any "
            "length; for samples that look like their data offline, train --config fashion",
    "fashion": "fashion: the book's model trained 6,000 steps (74 min on one CPU core)",
    "fashion_cond": "fashion_cond: the book's conditional model trained 6,000 steps (74 min on one CPU core)",
    "cifar10": "the paper trains this recipe for 800k steps (10.6 h on a TPU v3-8, App. B)",
}


def get_config(name: str) -> Config:
    """The named configuration; ValueError lists the valid names."""
    if name not in CONFIGS:
        raise ValueError(f"config={name!r} is unknown; valid names: {sorted(CONFIGS)}")
    return CONFIGS[name]


def _omitted(cfg: Config) -> set[tuple[str, str]]:
    """Beyond-the-paper fields that ``config_to_dict`` leaves out because they change nothing: an
    unconditional model's ``num_classes`` (None) and its ``label_drop`` at the default. The paper's
    configs, and the checkpoints of unconditional runs, thus read as they did before these fields existed."""
    if cfg.model.num_classes is not None:
        return set()
    out = {("model", "num_classes")}
    if cfg.train.label_drop == TrainConfig.label_drop:
        out.add(("train", "label_drop"))
    return out


def config_to_dict(cfg: Config) -> dict:
    """A JSON-ready nested dict (tuples become lists), without the fields of ``_omitted``
    (``config_from_dict`` restores them from their defaults)."""
    def conv(obj, section: str = ""):
        if hasattr(obj, "__dataclass_fields__"):
            return {f.name: conv(getattr(obj, f.name), f.name) for f in fields(obj)
                    if (section, f.name) not in skip}
        if isinstance(obj, tuple):
            return [conv(v) for v in obj]
        return obj
    skip = _omitted(cfg)
    return conv(cfg)


def config_from_dict(d: dict) -> Config:
    """Inverse of ``config_to_dict``; unknown keys raise ValueError naming them."""
    def build(cls, sub: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(sub) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()})
    return Config(
        name=d["name"],
        model=build(ModelConfig, d.get("model", {})),
        diffusion=build(DiffusionConfig, d.get("diffusion", {})),
        train=build(TrainConfig, d.get("train", {})),
    )
