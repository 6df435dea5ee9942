"""Config: every choice and range is declared with its field and refused at load time, naming the key."""

import re

import pytest
import torch

from evostar.config import Config, ConfigError, OptimConfig, describe, dump_yaml, load_config, resume_conflicts
from evostar.launch import check_environment

# Written out by hand so that a choice losing its declaration fails here.
CHOICE_KEYS = {
    "model.dtype",
    "gen.backend",
    "gen.rollout_dtype",
    "warmup.optim.schedule",
    "warmup.optim.autocast",
    "evolve.mode",
    "evolve.selection",
    "evolve.optim.schedule",
    "evolve.optim.autocast",
    "prm.strategy",
    "prm.label",
    "prm.aggregate",
    "prm.score_autocast",
    "prm.optim.schedule",
    "prm.optim.autocast",
    "evolve.pseudo_label",
    "adapt.controller",
}
REFUSED_CHOICES = {  # declared, but refused with their own message (here: the PRM is off)
    ("evolve.selection", "top_k"): "prm.enabled is false",
    ("evolve.selection", "threshold"): "prm.enabled is false",
    ("adapt.controller", "reward_pass"): "prm.enabled is false",
}
ROWS = describe()
NUMERIC = [r for r in ROWS if isinstance(r.default, (int, float)) and not isinstance(r.default, bool)]


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/x\nevolve:\n  iterations: 6\n  optim:\n    lr: 0.001\n")
    cfg = load_config(path, ["gen.temperature=0.7", "evolve.mode=iterative_rft", "data.test=/d/test_id.json"])
    assert cfg.output_dir == "runs/x"
    assert cfg.evolve.iterations == 6 and cfg.evolve.optim.lr == 0.001
    assert cfg.gen.temperature == 0.7 and isinstance(cfg.gen.temperature, float)
    assert cfg.evolve.mode == "iterative_rft"
    assert cfg.data.test == {"test_id": "/d/test_id.json"}
    assert cfg.gen.k == Config().gen.k  # unchanged sections keep their defaults


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["seed=3", "warmup.steps=10", "eval.pass_temperature=null"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg and cfg.eval.pass_temperature is None


def test_every_field_has_help():
    assert len(ROWS) > 30
    assert all(r.help for r in ROWS), [r.key for r in ROWS if not r.help]


def test_every_choice_is_declared_with_its_field():
    assert {r.key for r in ROWS if r.choices} == CHOICE_KEYS


def test_every_number_has_a_declared_range():
    assert [r.key for r in NUMERIC if not r.bounds] == []


@pytest.mark.parametrize("key", sorted(CHOICE_KEYS))
def test_a_bad_choice_is_refused_at_load_naming_the_key(key):
    with pytest.raises(ConfigError, match=re.escape(key) + ".*choose one of"):
        load_config(None, [f"{key}=no-such-choice"])


@pytest.mark.parametrize(
    "key, value", [(r.key, c) for r in ROWS if r.choices for c in r.choices], ids=lambda v: str(v) or "''"
)
def test_every_declared_choice_loads_or_is_refused_with_its_reason(key, value):
    override = [f"{key}={value}"]
    if key == "gen.rollout_dtype" and value:
        override.append("gen.backend=hf")
    if (key, value) in REFUSED_CHOICES:
        with pytest.raises(ConfigError, match=REFUSED_CHOICES[key, value]):
            load_config(None, override)
    else:
        assert load_config(None, override) is not None


def _outside(row):
    """A value just outside the declared range of a numeric field."""
    b = row.bounds
    step = 1 if isinstance(row.default, int) else 0.5
    if "ge" in b:
        return b["ge"] - step
    if "gt" in b:
        return b["gt"]
    if "le" in b:
        return b["le"] + step
    return b["lt"]


@pytest.mark.parametrize("row", NUMERIC, ids=lambda r: r.key)
def test_a_value_out_of_range_is_refused_at_load_naming_the_key(row):
    value = _outside(row)
    with pytest.raises(ConfigError, match=re.escape(f"{row.key}={value!r}") + ".*must be"):
        load_config(None, [f"{row.key}={value}"])
    if "le" in row.bounds or "lt" in row.bounds:  # the upper bound too
        high = row.bounds.get("le", row.bounds.get("lt"))
        high = high + (0.5 if "le" in row.bounds else 0)
        with pytest.raises(ConfigError, match=re.escape(row.key)):
            load_config(None, [f"{row.key}={high}"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("evolve.iterationz=3", "evolve.iterationz"),
        ("gen.k=many", "gen.k='many': expected an integer"),
        ("gen.k=2.5", "gen.k=2.5"),
        ("gen.k=true", "gen.k=True: expected a number"),
        ("gen.temperature=nan", "gen.temperature"),
        ("seed", "key=value"),
        ("progress=maybe", "progress"),
        ("model.prompt_template=no question here", "model.prompt_template"),
        ("model.prompt_template={question} {answer}", "model.prompt_template"),
        ("device=tpu", "device='tpu'"),
        ("output_dir=", "output_dir"),
        ("model.lora_targets=[]", "model.lora_targets"),
        ("gen=3", "gen: expected a mapping"),
        ("data.test=[1, 2]", "data.test"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.quantize_4bit=true"], "model.lora_r > 0"),
        (["gen.backend=vllm", "gen.workers=2"], "gen.backend"),
        (["warmup.hinted=true", "warmup.steps=10", "data.seed_cot=s.json"], "data.seed_cot is set too"),
        (["warmup.hinted=true", "warmup.steps=0"], "warmup.steps is 0"),
    ],
)
def test_values_that_do_not_work_together_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, overrides)


@pytest.mark.parametrize("key", ["warmup.optim.autocast", "evolve.optim.autocast"])
def test_fp16_is_refused_with_its_reason(key):
    with pytest.raises(ConfigError, match=f"{key}='fp16': not supported.*loss scaling"):
        load_config(None, [f"{key}=fp16"])


@pytest.mark.parametrize(
    "override, attr, value",
    [
        ("model.system_prompt=yes", "system_prompt", "yes"),
        ("model.path=007", "path", "007"),
        ("model.prompt_template=Q: {question}", "prompt_template", "Q: {question}"),
    ],
)
def test_text_keys_take_the_value_as_typed(override, attr, value):
    assert getattr(load_config(None, [override]).model, attr) == value


def test_large_integers_are_exact():
    assert load_config(None, ["seed=99999999999999999999"]).seed == 99999999999999999999


def test_yaml_booleans_are_not_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  system_prompt: yes\n")
    with pytest.raises(ConfigError, match="model.system_prompt=True: expected text"):
        load_config(path)


def test_wsd_schedule_is_accepted_where_the_trainer_takes_it():
    cfg = load_config(None, ["warmup.optim.schedule=wsd", "evolve.optim.schedule=wsd"])
    assert cfg.warmup.optim.schedule == "wsd"


def test_python_construction_is_checked_too():
    with pytest.raises(ConfigError, match="lr=-1"):
        OptimConfig(lr=-1)


def test_a_yaml_that_is_not_a_mapping_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("evolve: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("gen:\n  k: 0\n")
    with pytest.raises(ConfigError, match="nested.yaml: gen.k=0"):
        load_config(nested)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["device=cuda"], "no CUDA device"),
        (["device=cuda:3"], "no CUDA device"),
        (["gen.backend=vllm"], "vllm"),
        (["model.lora_r=8", "model.quantize_4bit=true"], "CUDA GPU"),
    ],
)
def test_what_this_machine_cannot_run_is_refused_before_compute(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        check_environment(load_config(None, overrides))


def test_resume_conflicts_list_result_keys_only():
    saved = load_config(None, ["seed=1", "warmup.steps=10"])
    same = load_config(None, ["seed=1", "warmup.steps=10", "progress=false", "threads=1", "output_dir=elsewhere"])
    assert resume_conflicts(saved, same) == []
    other = load_config(None, ["seed=2", "warmup.steps=20"])
    assert resume_conflicts(saved, other) == ["seed: 1 -> 2", "warmup.steps: 10 -> 20"]


@pytest.mark.parametrize("preset", ["smoke", "quick", "default"])
def test_demo_presets_are_valid_configs(preset, tmp_path):
    from evostar.demo import demo_config

    cfg = demo_config(preset, tmp_path, seed=0, overrides=[])
    assert cfg.data.seed_cot.endswith("seed.json") and cfg.output_dir == str(tmp_path)
    if preset != "smoke":
        # The warm-up's plateau was measured at a constant LR: a decaying LR flattens the
        # validation curve early only because the LR runs out (docs/experiments.md).
        assert cfg.warmup.optim.schedule == "constant"
        assert cfg.warmup.steps % cfg.warmup.eval_every == 0
