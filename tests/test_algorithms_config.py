"""Every registered algorithm name is reachable from the config; bad names and values fail with
one clear line; defaults live only in the schema."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings

import pytest
import torch

from megacov.algorithms import (
    LossNormalizer,
    build_entropy_controller,
    compute_advantages,
    get_policy_loss,
    list_advantages,
    list_entropy_controllers,
    list_policy_losses,
    policy_loss,
)
from megacov.algorithms.checks import check_algorithm_config
from megacov.config import ConfigError, load_config
from megacov.config.schema import AlgorithmConfig
from megacov.config.validate import validate

ALGO_DIR = pathlib.Path(__file__).resolve().parents[1] / "megacov" / "algorithms"


def _batch():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g) * 3
    return lp, lp + 0.1 * torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.ones(4, 6) > 0


@pytest.mark.parametrize("name", ["ppo", "clip_cov", "kl_cov", "gspo", "cispo"])
def test_policy_losses_reachable_from_config(name):
    assert name in list_policy_losses()
    agg = ["algorithm.loss_agg_mode=seq-mean-token-mean"] if name == "gspo" else []
    cfg = load_config(None, [f"algorithm.policy_loss={name}", "algorithm.ppo_epochs=2", *agg])
    assert check_algorithm_config(cfg) == []
    lp, old, adv, mask = _batch()
    loss, _ = get_policy_loss(cfg.algorithm.policy_loss)(lp, old, adv, mask, norm=LossNormalizer.from_mask(mask),
                                                         selected=None, hp=cfg.algorithm)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_advantages_reachable_from_config(name):
    assert name in list_advantages()
    cfg = load_config(None, [f"algorithm.advantage={name}"])
    check_algorithm_config(cfg)
    adv = compute_advantages(cfg.algorithm.advantage, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
                             torch.ones(2, 3, dtype=torch.bool), cfg.algorithm)
    assert adv.shape == (2, 3)


@pytest.mark.parametrize("name", ["none", "adaptive", "par"])
def test_controllers_reachable_from_config(name):
    assert name in list_entropy_controllers()
    cfg = load_config(None, [f"algorithm.entropy_control={name}"])
    check_algorithm_config(cfg)
    ctl = build_entropy_controller(cfg.algorithm, cfg.trainer.total_epochs)
    assert ctl.step(entropy=0.1, step=0).positive_weight <= 1.0


@pytest.mark.parametrize("override,registered", [
    ("algorithm.policy_loss=clipcov", "registered: cispo, clip_cov, gspo, kl_cov, ppo"),
    ("algorithm.advantage=vtrace", "registered: gae, grpo, reinforce_pp, reinforce_pp_baseline, rloo"),
    ("algorithm.entropy_control=pid", "registered: adaptive, none, par"),
    ("algorithm.kl_estimator=k4", "registered: k1, k2, k3"),
    ("algorithm.par_schedule=cosine", "registered: stage, epoch, entropy"),
])
def test_unknown_names_list_registered(override, registered):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError) as err:
        check_algorithm_config(cfg)
    msg = str(err.value)
    assert override.split("=")[0] in msg and registered in msg and "\n" not in msg


@pytest.mark.parametrize("overrides,key", [
    (["algorithm.clip_cov_lb=5", "algorithm.clip_cov_ub=1"], "algorithm.clip_cov_lb"),
    (["algorithm.clip_ratio_c=0.5"], "algorithm.clip_ratio_c"),
    (["algorithm.kl_cov_ratio=0"], "algorithm.kl_cov_ratio"),
    (["algorithm.par_lambda=1.5"], "algorithm.par_lambda"),
    (["algorithm.entropy_control=par", "algorithm.par_schedule=stage", "algorithm.par_stage_steps=[5]",
      "algorithm.par_stage_lambdas=[0.5]"], "algorithm.par_stage_lambdas"),
    (["algorithm.entropy_control=par", "algorithm.par_schedule=epoch"], "trainer.total_epochs"),
    (["algorithm.entropy_top_ratio=0"], "algorithm.entropy_top_ratio"),
    (["algorithm.entropy_top_ratio=0.2", "algorithm.cov_scope=global_old"], "algorithm.entropy_top_ratio"),
    (["algorithm.rollout_correction=clip"], "algorithm.rollout_correction"),
    (["algorithm.rollout_correction_level=batch"], "algorithm.rollout_correction_level"),
    (["algorithm.rollout_mis_low=1.2"], "algorithm.rollout_mis_low"),
    (["algorithm.rollout_is_cap=0"], "algorithm.rollout_is_cap"),
    (["algorithm.cispo_clip_ratio_low=1.5"], "algorithm.cispo_clip_ratio_low"),
    (["algorithm.gspo_clip_ratio_high=-1"], "algorithm.gspo_clip_ratio_low"),
    (["algorithm.entropy_advantage_kappa=0"], "algorithm.entropy_advantage_coef"),
])
def test_bad_values_are_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_algorithm_config(load_config(None, overrides))


def test_kl_cov_on_policy_warning_through_validate():
    on_policy = load_config(None, ["algorithm.policy_loss=kl_cov", "data.batch_size=8", "data.mini_batch_size=8",
                                   "parallel.num_gpus=0"])
    with pytest.warns(UserWarning, match="on-policy"):
        validate(on_policy, check_model=False)
    off_policy = load_config(None, ["algorithm.policy_loss=kl_cov", "data.batch_size=16",
                                    "data.mini_batch_size=8", "parallel.num_gpus=0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(off_policy, check_model=False)
    with pytest.raises(ConfigError, match="registered"):
        validate(load_config(None, ["algorithm.policy_loss=dapo", "parallel.num_gpus=0"]), check_model=False)


def test_gspo_warns_without_its_sequence_normalisation():
    msgs = check_algorithm_config(load_config(None, ["algorithm.policy_loss=gspo"]))
    assert any("seq-mean-token-mean" in m for m in msgs)


def test_rollout_n_one_warns_for_group_estimators():
    msgs = check_algorithm_config(load_config(None, ["rollout.n=1", "algorithm.advantage=rloo"]))
    assert any("rollout.n=1" in m for m in msgs)


def test_public_entry_uses_schema_defaults():
    lp, old, adv, mask = _batch()
    for name in list_policy_losses():
        a, _ = policy_loss(name, lp, old, adv, mask)
        b, _ = get_policy_loss(name)(lp, old, adv, mask, norm=LossNormalizer.from_mask(mask), selected=None,
                                      hp=AlgorithmConfig())
        assert torch.equal(a, b)


def test_no_hyperparameter_default_repeated_in_algorithms():
    """The numbers that are algorithm defaults appear in schema.py only, not in megacov/algorithms
    (0, 1/2 and 1 are too common in formulas to tell apart)."""
    defaults = AlgorithmConfig()
    numeric = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(AlgorithmConfig)
               if isinstance(getattr(defaults, f.name), float) and getattr(defaults, f.name) not in (0.0, 0.5, 1.0)}
    assert "clip_cov_ratio" in numeric and "entropy_target" in numeric
    for path in ALGO_DIR.glob("*.py"):
        code = re.sub(r'("""|\'\'\').*?\1', "", path.read_text(), flags=re.DOTALL)  # docstrings may cite papers
        code = "\n".join(line.split("#")[0] for line in code.splitlines())
        # bare integers (``x ** 2``, ``/ 2``) are arithmetic, not a repeated default like 2.0 or 0.28
        literals = {float(x) for x in re.findall(r"(?<![\w.])\d+\.?\d*(?:e-?\d+)?(?![\w.])", code)
                    if not x.isdigit()}
        clash = {k: v for k, v in numeric.items() if v in literals}
        assert not clash, f"{path.name} repeats schema default(s) {clash}"
