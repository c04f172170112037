"""The hybrid sampling schedule: lambda ramps, seeded decisions, resume, phases, validation."""

import json
import math
import subprocess
import sys

import pytest

from hpd.train.schedule import Schedule, StepPlan, lambda_at
from hpd.train.schedule_config import Objective, ScheduleConfig, to_step


def make(total_steps=100, seed=0, method="hpd", method_params=None, **fields) -> Schedule:
    config = ScheduleConfig.from_dict(fields)
    return Schedule(config, method=method, method_params=method_params or {}, total_steps=total_steps, seed=seed)


def errors_of(**fields) -> str:
    with pytest.raises(ValueError) as e:
        ScheduleConfig.from_dict(fields)
    return str(e.value)


# ---------------------------------------------------------------------- lambda(step)
def ramp(kind, step, total=100, start=0.0, end=1.0, ramp_start=0.2, ramp_end=0.6):
    return lambda_at(kind, step, total, start=start, end=end, ramp_start=ramp_start, ramp_end=ramp_end)


def test_step_bounds_are_fractions_up_to_one_and_steps_above():
    assert to_step(0, 100) == 0
    assert to_step(0.1, 100) == 10
    assert to_step(1, 100) == 100 and to_step(1.0, 100) == 100
    assert to_step(250, 1000) == 250
    assert to_step(0.25, 10) == 3  # 2.5 rounds half up


def test_constant_lambda():
    assert [ramp("constant", s, start=0.3, end=0.3) for s in (0, 50, 99, 500)] == [0.3] * 4


def test_linear_lambda_endpoints_midpoint_and_clamping():
    # fractions 0.2 and 0.6 of 100 steps: the ramp runs over steps 20..60
    assert ramp("linear", 0) == 0.0
    assert ramp("linear", 19) == 0.0
    assert ramp("linear", 20) == 0.0
    assert ramp("linear", 30) == 0.25
    assert ramp("linear", 40) == 0.5
    assert ramp("linear", 60) == 1.0
    assert ramp("linear", 99) == 1.0
    assert ramp("linear", 40, start=0.25, end=0.75) == 0.5
    assert ramp("linear", 40, start=1.0, end=0.5) == 0.75  # ramps may fall
    # absolute steps give the same ramp
    assert ramp("linear", 40, total=1000, ramp_start=20, ramp_end=60) == 0.5


def test_cosine_lambda_endpoints_midpoint_and_clamping():
    assert ramp("cosine", 10) == 0.0
    assert ramp("cosine", 20) == 0.0
    assert ramp("cosine", 40) == 0.5
    assert ramp("cosine", 40, start=0.25, end=0.75) == 0.5
    assert ramp("cosine", 30) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert ramp("cosine", 30) < ramp("linear", 30)  # slow start
    assert ramp("cosine", 60) == 1.0 and ramp("cosine", 80) == 1.0
    values = [ramp("cosine", s) for s in range(100)]
    assert values == sorted(values)


def test_zero_length_ramp_is_a_step():
    assert ramp("linear", 49, ramp_start=0.5, ramp_end=0.5) == 0.0
    assert ramp("linear", 50, ramp_start=0.5, ramp_end=0.5) == 1.0


def test_lambda_at_rejects_adaptive_and_unknown_kinds():
    with pytest.raises(ValueError, match="adaptive"):
        ramp("adaptive", 0)
    with pytest.raises(ValueError, match="allowed constant, linear, cosine"):
        ramp("exp", 0)


def test_schedule_lambda_follows_the_config():
    s = make(lambda_schedule="linear", lambda_start=0.0, lambda_end=0.5, ramp_start=0.1, ramp_end=0.6)
    assert [s.plan(t).lam for t in (0, 10, 35, 60, 99)] == [0.0, 0.0, 0.25, 0.5, 0.5]
    assert make(lambda_start=0.3).plan(42).lam == 0.3


# ---------------------------------------------------------------------- seeded decisions
def test_same_seed_same_plans_and_different_seeds_differ():
    plans = lambda seed: [make(200, seed=seed, lambda_start=0.5).plan(t) for t in range(200)]
    assert plans(7) == plans(7)
    assert [p.on_policy for p in plans(7)] != [p.on_policy for p in plans(8)]


def test_plan_depends_on_the_step_only_not_on_call_order():
    s = make(lambda_start=0.5)
    forward = [s.plan(t) for t in range(100)]
    backward = [s.plan(t) for t in reversed(range(100))][::-1]
    assert forward == backward


def test_on_policy_rate_is_near_lambda():
    s = make(5000, seed=3, lambda_start=0.3)
    rate = sum(s.plan(t).on_policy for t in range(5000)) / 5000
    assert abs(rate - 0.3) < 0.03
    assert not any(make(500, lambda_start=0.0).plan(t).on_policy for t in range(500))
    assert all(make(500, lambda_start=1.0).plan(t).on_policy for t in range(500))


def test_a_rising_lambda_keeps_earlier_on_policy_steps():
    # one coin per step: a step on-policy at lambda stays on-policy at any larger lambda
    low = [make(300, lambda_start=0.2).plan(t).on_policy for t in range(300)]
    high = [make(300, lambda_start=0.6).plan(t).on_policy for t in range(300)]
    assert all(h for lo, h in zip(low, high) if lo)


# ---------------------------------------------------------------------- adaptive lambda and resume
ADAPTIVE = dict(lambda_schedule="adaptive", lambda_start=0.0, lambda_end=0.3, adaptive_step=0.1)


def test_adaptive_lambda_rises_only_when_eval_loss_rises_and_stops_at_lambda_end():
    s = make(**ADAPTIVE)
    s.observe_eval(9, 2.0)  # first evaluation: nothing to compare with
    assert s.plan(10).lam == 0.0
    s.observe_eval(19, 1.5)  # fell
    assert s.plan(20).lam == 0.0
    s.observe_eval(29, 1.5)  # equal: not a rise
    assert s.plan(30).lam == 0.0
    s.observe_eval(39, 1.7)  # rose
    assert s.plan(39).lam == 0.0  # the step evaluated after keeps its lambda
    assert s.plan(40).lam == 0.1
    s.observe_eval(49, 1.6)
    assert s.plan(50).lam == 0.1
    for step, loss in [(59, 1.8), (69, 1.9), (79, 2.0), (89, 2.1)]:
        s.observe_eval(step, loss)
    assert s.plan(60).lam == 0.2
    assert s.plan(70).lam == 0.3
    assert s.plan(99).lam == 0.3  # never above lambda_end


def test_adaptive_lambda_ignores_non_finite_losses_and_needs_increasing_steps():
    s = make(**ADAPTIVE)
    s.observe_eval(9, 1.0)
    s.observe_eval(19, float("nan"))
    s.observe_eval(29, 0.9)
    assert s.plan(30).lam == 0.0
    with pytest.raises(ValueError, match="steps must increase"):
        s.observe_eval(29, 2.0)


def test_observing_evals_leaves_non_adaptive_lambda_alone():
    s = make(lambda_start=0.2)
    s.observe_eval(9, 1.0)
    s.observe_eval(19, 5.0)
    assert s.plan(20).lam == 0.2


def test_resume_through_json_gives_the_same_later_plans():
    losses = {9: 2.0, 19: 2.1, 29: 1.9, 39: 2.2, 49: 2.3, 59: 2.0, 69: 2.4}
    straight = make(100, seed=5, **ADAPTIVE)
    first = make(100, seed=5, **ADAPTIVE)
    for step in range(100):
        if step == 40:  # checkpoint, then a fresh process resumes
            resumed = make(100, seed=5, **ADAPTIVE)
            resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
            first = resumed
        assert first.plan(step) == straight.plan(step)
        if step in losses:
            first.observe_eval(step, losses[step])
            straight.observe_eval(step, losses[step])
    assert first.state_dict() == straight.state_dict()
    assert straight.plan(99).lam == 0.3


def test_load_state_dict_rejects_a_foreign_state():
    with pytest.raises(ValueError, match="expected last_eval_step"):
        make().load_state_dict({"lam": 0.5})


# ---------------------------------------------------------------------- objectives and sampling
def methods(plan: StepPlan) -> dict:
    return {o.method: o.weight for o in plan.objectives}


def test_without_phases_the_run_method_trains_with_weight_one():
    s = make(method="jsd", method_params={"beta": 0.3})
    assert s.plan(0).objectives == (Objective("jsd", 1.0, {"beta": 0.3}),)
    assert make(method="skew_rkl").plan(0).objectives[0].params == {"alpha": 0.1}  # defaults filled in


def test_fkl_warmup_for_the_first_ten_percent_then_hpd():
    s = make(phases=[{"until": 0.1, "objectives": {"fkl": 1.0}}, {"objectives": {"hpd": 1.0}}])
    assert methods(s.plan(0)) == methods(s.plan(9)) == {"fkl": 1.0}
    assert methods(s.plan(10)) == methods(s.plan(99)) == {"hpd": 1.0}
    assert (s.plan(9).phase, s.plan(10).phase) == (0, 1)
    absolute = make(1000, phases=[{"until": 25, "objectives": {"fkl": 1}}, {"objectives": {"hpd": 1}}])
    assert methods(absolute.plan(24)) == {"fkl": 1.0} and methods(absolute.plan(25)) == {"hpd": 1.0}


def test_hpd_plus_a_tenth_of_sft():
    plan = make(phases=[{"objectives": {"hpd": 1.0, "sft": 0.1}}]).plan(50)
    assert plan.objectives == (Objective("hpd", 1.0, {}), Objective("sft", 0.1, {}))
    metrics = plan.as_metrics()
    assert metrics["schedule/w/hpd"] == 1.0 and metrics["schedule/w/sft"] == 0.1
    assert json.loads(json.dumps(metrics)) == metrics


def test_objective_params_and_inheritance_from_method_params():
    phases = [{"until": 0.5, "objectives": {"jsd": {"weight": 2.0, "beta": 0.25}}},
              {"objectives": {"jsd": {}}}]
    s = make(method="jsd", method_params={"beta": 0.75}, phases=phases)
    assert s.plan(0).objectives == (Objective("jsd", 2.0, {"beta": 0.25}),)
    assert s.plan(50).objectives == (Objective("jsd", 1.0, {"beta": 0.75}),)  # the run's method_params
    other = make(method="hpd", phases=[{"objectives": {"jsd": 1.0}}])
    assert other.plan(0).objectives[0].params == {"beta": 0.5}  # the method's default


def test_sample_auto_always_never():
    phases = [{"until": 0.5, "objectives": {"fkl": 1.0}}, {"objectives": {"hpd": 1.0, "sft": 0.1}}]
    auto = make(phases=phases)
    assert (auto.plan(0).sample, auto.plan(50).sample) == (False, True)
    always, never = make(phases=phases, sample="always"), make(phases=phases, sample="never")
    assert always.plan(0).sample and always.plan(50).sample
    assert not never.plan(0).sample and not never.plan(50).sample


def test_as_metrics_records_every_decision():
    plan = make(lambda_start=1.0).plan(3)
    assert plan.as_metrics() == {"schedule/lambda": 1.0, "schedule/on_policy": 1, "schedule/sample": 1,
                                 "schedule/phase": 0, "schedule/w/hpd": 1.0}


# ---------------------------------------------------------------------- validation
def test_unknown_keys_list_the_known_ones():
    message = errors_of(lamda_start=0.5)
    assert "lamda_start" in message and "known keys: lambda_schedule, lambda_start" in message


def test_errors_name_the_field_and_the_allowed_values_all_at_once():
    message = errors_of(lambda_schedule="exp", sample="sometimes", lambda_start=1.5, adaptive_step=0)
    assert "lambda_schedule='exp': allowed constant, linear, cosine, adaptive" in message
    assert "sample='sometimes': allowed auto, always, never" in message
    assert "lambda_start=1.5: must be a number in [0, 1]" in message
    assert "adaptive_step=0: must be a number in (0, 1]" in message


@pytest.mark.parametrize("fields, expected", [
    (dict(lambda_schedule="linear"), "lambda_end is required when lambda_schedule=linear"),
    (dict(lambda_start=0.1, lambda_end=0.5), "lambda_end=0.5: lambda_schedule=constant keeps lambda_start"),
    (dict(lambda_schedule="adaptive", lambda_start=0.5, lambda_end=0.2), "adaptive lambda only rises"),
    (dict(lambda_schedule="linear", lambda_end=1.0, ramp_start=0.8, ramp_end=0.2), "ramp_start=0.8 comes after"),
    (dict(ramp_end=2.5), "ramp_end=2.5: must be a fraction of total steps in [0, 1] or a whole step"),
    (dict(ramp_start="10%"), "ramp_start='10%'"),
    (dict(phases={"hpd": 1.0}), "phases: expected a list"),
    (dict(phases=[{"objectives": {"hpd": 1}, "until": 0.5}]), "phases[0].until: the last phase runs to the end"),
    (dict(phases=[{"objectives": {"fkl": 1}}, {"objectives": {"hpd": 1}}]), "phases[0].until is required"),
    (dict(phases=[{"until": 0.1, "objective": {"fkl": 1}}, {"objectives": {"hpd": 1}}]),
     "phases[0]: unknown key(s) objective; known keys: until, objectives"),
    (dict(phases=[{"objectives": {"kl": 1}}]), "phases[0].objectives.kl: unknown method 'kl'; allowed: sft"),
    (dict(phases=[{"objectives": {"jsd": {"beta": 2}}}]), "phases[0].objectives.jsd: jsd: beta=2.0 is out of range"),
    (dict(phases=[{"objectives": {"jsd": {"gamma": 2}}}]), "phases[0].objectives.jsd: jsd: unknown parameter"),
    (dict(phases=[{"objectives": {"jsd": {"temperature": 2}}}]), "temperature is set once for the run"),
    (dict(phases=[{"objectives": {"sft": 0}}]), "phases[0].objectives.sft: weight=0: must be a number > 0"),
    (dict(phases=[{"objectives": {}}]), "phases[0].objectives: expected a non-empty mapping"),
    (dict(phases=[{"until": 0.5, "objectives": {"fkl": 1}}, {"until": 0.2, "objectives": {"rkl": 1}},
                  {"objectives": {"hpd": 1}}]), "phases[1].until=0.2 must come after phases[0].until=0.5"),
])
def test_config_errors_name_the_field(fields, expected):
    assert expected in errors_of(**fields)


@pytest.mark.parametrize("fields, expected", [
    (dict(lambda_schedule="linear", lambda_end=1.0, ramp_end=500), "ramp_end=500 is past the end of the run"),
    (dict(lambda_schedule="linear", lambda_end=1.0, ramp_start=50, ramp_end=0.2), "ramp_start=50 comes after"),
    (dict(phases=[{"until": 0.001, "objectives": {"fkl": 1}}, {"objectives": {"hpd": 1}}]),
     "phases[0].until=0.001 is step 0 of 100"),
    (dict(phases=[{"until": 100, "objectives": {"fkl": 1}}, {"objectives": {"hpd": 1}}]),
     "phases[1] would never run"),
    (dict(phases=[{"until": 50, "objectives": {"fkl": 1}}, {"until": 0.3, "objectives": {"rkl": 1}},
                  {"objectives": {"hpd": 1}}]), "phases[1].until=0.3 must come after phases[0].until=50"),
])
def test_errors_that_depend_on_the_run_length(fields, expected):
    config = ScheduleConfig.from_dict(fields)  # fine on its own
    with pytest.raises(ValueError, match="does not fit a run of 100 steps") as e:
        Schedule(config, method="hpd", method_params={}, total_steps=100, seed=0)
    assert expected in str(e.value)


def test_the_run_method_is_checked():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make(method="nope")
    with pytest.raises(ValueError, match="beta=3.0 is out of range"):
        make(method="jsd", method_params={"beta": 3})


def test_empty_section_and_nulls_mean_defaults():
    assert ScheduleConfig.from_dict(None) == ScheduleConfig()
    assert ScheduleConfig.from_dict({"sample": None, "phases": None}) == ScheduleConfig()


def test_import_has_no_side_effects():
    code = "import sys, hpd.train.schedule; print(sorted(m for m in ('torch', 'mlx', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
