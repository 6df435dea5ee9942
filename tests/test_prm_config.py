"""PRMConfig: declared like every config section (help, ranges, choices), and refusing bad values
with their key."""

from __future__ import annotations

import pytest

from evostar.config import ConfigError, PRMConfig, build_config, describe, from_dict

ROWS = describe(PRMConfig)


def test_every_field_has_help_and_every_number_a_range():
    assert all(r.help for r in ROWS), [r.key for r in ROWS if not r.help]
    numbers = [r for r in ROWS if isinstance(r.default, (int, float)) and not isinstance(r.default, bool)]
    assert [r.key for r in numbers if not r.bounds] == []
    choices = {r.key: set(r.choices) for r in ROWS if r.choices}
    assert choices["strategy"] == {"binary", "every"} and choices["label"] == {"hard", "soft"}
    assert choices["aggregate"] == {"min", "mean", "last", "product"}


def test_defaults():
    cfg = PRMConfig()
    assert (cfg.n_completions, cfg.strategy, cfg.label, cfg.aggregate, cfg.init) == (
        8,
        "binary",
        "hard",
        "min",
        "policy",
    )


@pytest.mark.parametrize(
    "data, expect",
    [
        ({"strategy": "all"}, "strategy='all': choose one of"),
        ({"n_completions": 0}, "n_completions=0: must be >= 1"),
        ({"temperature": 0}, "temperature=0.0: must be > 0"),
        ({"negative_weight": -1}, "negative_weight=-1.0: must be >= 0"),
        ({"init": ""}, "init='': empty"),
        ({"optim": {"lr": 0}}, "prm.optim.lr=0.0: must be > 0"),
        ({"n_completions": 16, "completion_batch_size": 8}, "n_completions=16: more than completion_batch_size=8"),
        ({"tagg": "~"}, "unknown key"),
    ],
)
def test_bad_values_are_refused_naming_the_key(data, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace("[", r"\[")):
        from_dict(PRMConfig, data, "prm")


def test_the_loop_refuses_scored_selection_unless_it_runs_the_prm():
    for selection in ("top_k", "threshold"):
        with pytest.raises(ConfigError, match="prm.enabled is false"):
            build_config({"evolve": {"selection": selection}})
        assert build_config({"evolve": {"selection": selection}, "prm": {"enabled": True}}).prm.enabled
