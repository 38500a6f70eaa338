"""A researcher's own task, checker, steering method and models, from a folder outside the repository, through the
same `make reproduce` runner — without an edit of `saif_utils`."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import copy_run

from saif_utils.data import DATA_DIR, DataError, DataSources
from saif_utils.pipeline import main as pipeline_main
from saif_utils.pipeline import run_pipeline
from saif_utils.plugins import PluginError, load_plugins
from saif_utils.profiles import get_profile


@pytest.fixture
def restore_registries():
    """Checkers, methods and architectures a test's plugins register are gone after it (other tests see the
    package's own), and its plugin modules are forgotten."""
    import sys

    from saif_utils import architectures, evaluation, methods

    saved = (dict(evaluation.CHECKERS), dict(methods.METHODS), list(architectures.ARCHITECTURES), set(sys.modules))
    yield
    evaluation.CHECKERS.clear()
    evaluation.CHECKERS.update(saved[0])
    methods.METHODS.clear()
    methods.METHODS.update(saved[1])
    architectures.ARCHITECTURES[:] = saved[2]
    for name in set(sys.modules) - saved[3]:
        if name.startswith("saif_plugin_"):
            del sys.modules[name]

USER_MODULE = '''
"""A lab's own checker and steering method."""
from saif_utils.evaluation import Verdict, register_checker
from saif_utils.methods import SteeringMethod, register


@register_checker("mentions_weather")
def check_mentions_weather(response, source=None):
    """Strict: the word 'weather'; loose: weather words."""
    text = response.lower()
    return Verdict("weather" in text, any(w in text for w in ("weather", "rain", "sun", "wind")))


@register
class HalfSaif(SteeringMethod):
    """SAIF's vector at half its strength, at SAIF's chosen configuration."""

    name = "half_saif"
    borrows = "saif"
    uses_latents = True

    def vector(self, source, cond, draw=0):
        vector, n_latents = source.latent_vector(cond)
        return 0.5 * vector, n_latents
'''

WEATHER_VARIANTS = [
    ("weather-en-00", "en", "paraphrase", "Mention the weather in your answer about this text."),
    ("weather-en-01", "en", "paraphrase", "Say something about the weather when you answer about this text."),
    ("weather-en-02", "en", "paraphrase", "Bring up the weather in your reply to this text."),
    ("weather-fr-00", "fr", "translation", "Mentionne la météo dans ta réponse à ce texte."),
]


def user_study(root: Path) -> dict[str, str]:
    """A folder as a researcher would write it: a plugin module, a tasks file with one new task, and the committed
    instruction variants plus the new task's; returns the pipeline parameters that point at them."""
    root.mkdir(parents=True)
    (root / "my_ext.py").write_text(USER_MODULE)
    tasks = (DATA_DIR / "tasks.jsonl").read_text()
    tasks += json.dumps({"task": "weather", "description": "Mention the weather.", "checker": "mentions_weather"}) + "\n"
    (root / "tasks.jsonl").write_text(tasks)
    shutil.copytree(DATA_DIR / "instructions", root / "instructions")
    (root / "instructions" / "weather.jsonl").write_text("".join(
        json.dumps({"task": "weather", "variant_id": vid, "language": lang, "kind": kind, "text": text}) + "\n"
        for vid, lang, kind, text in WEATHER_VARIANTS))
    return {"plugins": str(root / "my_ext.py"), "tasks_path": str(root / "tasks.jsonl"),
            "instructions_path": str(root / "instructions")}


def test_a_new_task_checker_and_method_from_a_user_module_run_in_the_pipeline(tiny_run, tmp_path, restore_registries):
    """(a) a task judged by the user's checker and (b) a user-defined steering method, both from a module outside the
    repository, run through notebooks 02, 05 and 06 and show up in the results and the report."""
    src, _, _ = tiny_run
    params = user_study(tmp_path / "my_study")
    run_dir = copy_run(src, tmp_path / "run", ("01_sae_loading",))
    run_pipeline("tiny", run_dir, only=["02", "05", "06"],
                 extra={**params, "tasks": ["weather", "summarize"],
                        "methods": ["no_instruction", "prompting", "saif", "half_saif"], "n_test": 2, "n_val": 2})
    results = pd.read_csv(run_dir / "05_steering_sweeps" / "results.csv")
    assert {("weather", "half_saif"), ("weather", "saif"), ("summarize", "half_saif")} <= set(
        zip(results["task"], results["method"])), results[["task", "method"]]
    half, saif = (results[(results["task"] == "weather") & (results["method"] == m)].iloc[0] for m in ("half_saif", "saif"))
    assert (half["layer"], half["k"], half["alpha"]) == (saif["layer"], saif["k"], saif["alpha"]), "not at SAIF's config"
    generations = pd.read_parquet(run_dir / "05_steering_sweeps" / "generations.parquet")
    weather = generations[generations["task"] == "weather"]
    assert len(weather) and (weather["checker_strict"] == weather["response"].str.lower().str.contains("weather")).all()
    report = (run_dir / "report.md").read_text()
    assert "half_saif" in report and "weather" in report


def test_adding_a_task_rejudges_no_other_tasks_verdicts(tmp_path, restore_registries):
    """A verdict's cache key holds its own checker's fingerprint: registering a new checker leaves every other task's
    key unchanged, and editing a threshold one checker reads changes that checker's key only."""
    from saif_utils import evaluation

    before = {name: evaluation.code_fingerprint(fn) for name, fn in evaluation.CHECKERS.items()}
    load_plugins(user_study(tmp_path / "study")["plugins"])
    after = {name: evaluation.code_fingerprint(fn) for name, fn in evaluation.CHECKERS.items()}
    assert "mentions_weather" in after and {n: after[n] for n in before} == before
    original = evaluation.SUMMARY_SIM_MIN
    try:
        evaluation.SUMMARY_SIM_MIN = 0.6
        changed = {name for name in before if evaluation.code_fingerprint(evaluation.CHECKERS[name]) != before[name]}
    finally:
        evaluation.SUMMARY_SIM_MIN = original
    assert changed == {"summarize"}, changed


def test_checker_fingerprints_are_the_same_in_every_process():
    """A warm rerun's kernels read the verdicts an earlier process cached: every checker's fingerprint, and a cache
    key holding a set, must not depend on the process's string-hash seed (a frozenset's repr does)."""
    import os
    import subprocess
    import sys

    script = ("from saif_utils import evaluation; from saif_utils.io import content_hash; "
              "print({n: evaluation.code_fingerprint(f) for n, f in sorted(evaluation.CHECKERS.items())}, "
              "content_hash({'words': frozenset(['the', 'a', 'de', 'la', 'of', 'and'])}))")
    prints = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(prints) == 1, prints


def test_bad_plugins_tasks_and_profile_files_are_refused_before_any_model_work(tmp_path, capsys, restore_registries):
    study = user_study(tmp_path / "study")
    broken = tmp_path / "broken_ext.py"
    broken.write_text("import numpy\nimport no_such_package_xyz\n")
    with pytest.raises(PluginError, match=r"broken_ext\.py.*does not import.*no_such_package_xyz"):
        load_plugins(str(broken))
    with pytest.raises(SystemExit):
        pipeline_main(["--profile", "tiny", "--output-dir", str(tmp_path / "run"), "-p", "plugins", str(broken)])
    assert "no_such_package_xyz" in capsys.readouterr().err and not (tmp_path / "run").exists()

    # A task naming a checker nobody registered: refused when the tasks load, naming the close match.
    (module,) = load_plugins(study["plugins"])
    module.__spec__.loader.exec_module(module)  # run again (as a reload does): it replaces its own checker and method
    copy = tmp_path / "copy_of_my_ext.py"
    copy.write_text(Path(study["plugins"]).read_text())
    with pytest.raises(PluginError, match="a checker named 'mentions_weather' is already registered"):
        load_plugins(str(copy))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text((DATA_DIR / "tasks.jsonl").read_text() + json.dumps(
        {"task": "weather", "description": "Mention the weather.", "checker": "mentions_wether"}) + "\n")
    with pytest.raises(DataError, match="no checker named 'mentions_wether'; did you mean 'mentions_weather'"):
        DataSources(study["instructions_path"], None, tasks).check()
    # A checker that raises on a response: the error names the task and the response.
    from saif_utils.evaluation import Verdict, judge, load_tasks, register_checker

    @register_checker("fragile")
    def check_fragile(response, source=None):
        return {"ok": Verdict(True, True)}[response]

    fragile_tasks = {**load_tasks(), "fragile": load_tasks(tasks)["weather"].__class__("fragile", "Breaks.",
                                                                                     checker="fragile")}
    responses = pd.DataFrame({"task": "fragile", "response": ["ok", "not ok"], "source": "s",
                              "response_id": ["r-1", "r-2"]})
    with pytest.raises(RuntimeError, match=r"checker of task 'fragile' raised on response 'r-2' \('not ok'\): KeyError"):
        judge(responses, fragile_tasks)
    # A target task without instruction variants.
    with pytest.raises(DataError, match=r"task\(s\) \['weather'\] have no instruction variants"):
        DataSources(None, None, study["tasks_path"]).check()

    # Profile files: an unknown key (close match named), a missing model field, an unknown stage field.
    cases = {'sae_layer = [1]\n[model]\nname = "m"\nhf_id = "m"\nn_layers = 2\nd_model = 8\n': "did you mean 'sae_layers'",
             'sae_layers = [1]\n[model]\nname = "m"\nhf_id = "m"\nn_layers = 2\n': r"\[model\]: missing \['d_model'\]",
             'sae_layers = [1]\n[model]\nname = "m"\nhf_id = "m"\nn_layers = 2\nd_model = 8\n'
             '[stage_defaults.steering]\nk_strat = 3\n': "did you mean 'k_start'",
             'sae_layers = [5]\n[model]\nname = "m"\nhf_id = "m"\nn_layers = 2\nd_model = 8\n': "out of range"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"profile_{i}.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            get_profile(str(path))


def test_a_model_with_an_unknown_layout_is_refused_naming_the_paths_looked_for():
    from saif_utils.architectures import blocks

    class Mamba(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"model\.layers \(llama\), transformer\.h \(gpt2\), gpt_neox\.layers"):
        blocks(Mamba())


# ---------------------------------------------------------------- models that are not SmolLM2
TINY_STAGES = textwrap.dedent('''
    [stage_defaults.sae_loading]
    n_ce_tokens = 256
    [stage_defaults.discovery]
    n_passages = 3
    n_bootstrap = 5
    tasks = ["translate_fr", "summarize"]
    [stage_defaults.steering]
    tasks = ["translate_fr", "summarize"]
    methods = ["no_instruction", "prompting", "saif", "diff_in_means"]
    k_grid = [1, 5]
    k_start = 5
    alpha_grid = [0.5]
    n_val = 2
    n_test = 2
    max_new_tokens = 6
''')


def random_model(kind: str, folder: Path) -> int:
    """A 4-block model of `kind` with random weights and SmolLM2's tokenizer, saved with `save_pretrained` in `folder`;
    returns its width."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    from saif_utils.models import dequantised_model_dir, load_tokenizer
    from saif_utils.profiles import SMOLLM2_135M

    tokenizer = load_tokenizer(str(dequantised_model_dir(SMOLLM2_135M)))
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    if kind == "gemma2":  # Gemma-2's particulars: logit soft-capping, sliding-window attention, pre/post norms
        model = Gemma2ForCausalLM(Gemma2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0, max_position_embeddings=512, **ids))
    else:
        # At the default init (0.02) a random GPT-NeoX's blocks barely move the residual, so no SAE latent separates
        # prompts with and without an instruction and discovery (rightly) refuses to go on.
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                 num_attention_heads=4, max_position_embeddings=512,
                                                 initializer_range=0.2, **ids))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.config.hidden_size


def gemma_scope_like_saes(folder: Path, layers: tuple[int, ...], d_in: int, d_sae: int = 256) -> None:
    """JumpReLU SAEs as sae-lens loads Gemma Scope's (thresholded ReLU, no b_dec subtracted from the input, hook
    `blocks.L.hook_resid_post`), random weights, saved in sae-lens's `save_model` layout as `layer_<L>/`."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    generator = torch.Generator().manual_seed(1)
    for layer in layers:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, metadata=SAEMetadata(
            hook_name=f"blocks.{layer}.hook_resid_post", model_name="tiny-gemma2")))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=generator) * 0.2)
            sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
            sae.threshold.fill_(0.05)
        sae.save_model(folder / f"layer_{layer}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma2", "gpt_neox"])
def test_profile_files_run_the_pipeline_on_models_that_are_not_smollm2(kind, tmp_path):
    """(c) A Gemma-2-architecture model with Gemma-Scope-style JumpReLU SAEs from local folders (TOML profile), and a
    GPT-NeoX model (`gpt_neox.layers`, not laid out like Llama) with SAEs trained in seconds (YAML profile), each run
    by the pipeline from its profile file through SAE loading, discovery, steering and the report."""
    study = tmp_path / "my_models"
    d_model = random_model(kind, study / "model")
    if kind == "gemma2":
        gemma_scope_like_saes(study / "saes", (1, 2), d_model)
        profile = study / "tiny_gemma2.toml"
        profile.write_text(textwrap.dedent(f'''
            description = "A 4-block Gemma-2 with random weights and JumpReLU SAEs in Gemma Scope's layout."
            sae_layers = [1, 2]
            sae_path_template = "saes/layer_{{layer}}"
            batch_size = 8
            [model]
            name = "tiny-gemma2"
            hf_id = "model"
            n_layers = 4
            d_model = {d_model}
        ''') + TINY_STAGES)
        # An SAE that does not fit the model is refused by notebook 01's loader, naming both widths.
        gemma_scope_like_saes(study / "narrow", (1,), d_in=32)
        narrow = get_profile(str(profile), sae_path_template=str(study / "narrow" / "layer_{layer}"), sae_layers=[1])
        from saif_utils.models import load_model
        from saif_utils.saes import profile_saes

        with pytest.raises(ValueError, match="SAE d_in=32 .* does not match the model's d_model=64"):
            profile_saes(load_model(narrow), narrow)
    else:
        profile = study / "tiny_neox.yaml"
        profile.write_text(textwrap.dedent(f'''
            description: A 4-block GPT-NeoX with random weights and SAEs trained here in seconds.
            sae_layers: [1, 2]
            batch_size: 8
            model: {{name: tiny-neox, hf_id: model, n_layers: 4, d_model: {d_model}}}
            sae_train: {{d_sae: 256, k: 8, n_train_tokens: 4096, n_eval_tokens: 1024, epochs: 4, batch_size: 256,
                        lr: 0.001, lr_warm_up_steps: 5, dead_feature_window: 20, context_size: 64}}
        ''') + "stage_defaults:\n" + textwrap.indent(_toml_stages_as_yaml(), "  "))
    run_dir = tmp_path / "run"
    run_pipeline(str(profile), run_dir, only=["01", "02", "05", "06"])
    saes = json.loads((run_dir / "01_sae_loading" / "saes.json").read_text())
    assert {entry["source"] for entry in saes.values()} == ({"local"} if kind == "gemma2" else {"trained"})
    results = pd.read_csv(run_dir / "05_steering_sweeps" / "results.csv")
    assert set(results["method"]) == {"no_instruction", "prompting", "saif", "diff_in_means"}
    assert set(results["task"]) == {"translate_fr", "summarize"} and (results["n"] == 2).all()
    report = (run_dir / "report.md").read_text()
    assert f"profile `{profile.stem}`" in report


def _toml_stages_as_yaml() -> str:
    """TINY_STAGES written as YAML (the GPT-NeoX profile is a YAML file)."""
    import tomllib

    import yaml

    return yaml.safe_dump(tomllib.loads(TINY_STAGES)["stage_defaults"], default_flow_style=None)
