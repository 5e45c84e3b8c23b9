"""The RL stage's checks that need no rollout: bad recipes fail before one, reward failures are named,
over-long prompts are dropped and counted, and the rollout alerts fire (rl/data.py, rl/rollouts.py)."""

import json

import pytest

from conftest import write_recipe
from core.recipe import parse_recipe
from rewards.functions import REWARD_FUNCS
from rl.config import GRPOConfig
from rl.data import NamedReward, RewardFunctionError, RLDataError, drop_long_prompts
from rl.rollouts import RolloutMonitor
from rl.train import run


def recipe(tmp_path, **fields) -> GRPOConfig:
    # The model path does not exist: these runs must fail on the recipe before anything is loaded.
    base = {"model_name_or_path": str(tmp_path / "no-model"), "output_dir": str(tmp_path / "out"),
            "max_completion_length": 8, "num_generations": 2, "per_device_train_batch_size": 2}
    (cfg,) = parse_recipe(GRPOConfig, args=["--config", str(write_recipe(tmp_path, {**base, **fields}))])
    return cfg


def test_unknown_reward_name_fails_before_anything_loads(tmp_path):
    cfg = recipe(tmp_path, suite="arithmetic", reward_funcs=["accuracy", "acuracy"])
    with pytest.raises(RLDataError, match=r"unknown reward function\(s\) \['acuracy'\].*rewards: \["):
        run(cfg)


def test_source_without_answer_column_for_accuracy_fails_naming_it(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?"}) + "\n" for i in range(3)))
    cfg = recipe(tmp_path, sources=[{"path": str(data)}], reward_funcs=["accuracy"])
    with pytest.raises(RLDataError, match=r"reward 'accuracy' reads column 'answer', but source .*prompts.jsonl row 0 "
                                          r"has none \(fields: \['prompt'\]\)"):
        run(cfg)


def test_source_row_without_prompt_fails_naming_the_row(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n" + json.dumps({"answer": "3"}) + "\n")
    cfg = recipe(tmp_path, sources=[{"path": str(data)}], reward_funcs=["accuracy"])
    with pytest.raises(RLDataError, match=r"prompts.jsonl row 1: field 'prompt' must be"):
        run(cfg)


def test_reward_weights_and_knobs_are_checked(tmp_path):
    with pytest.raises(RLDataError, match=r"reward_weights has 1 values for 2 reward_funcs"):
        run(recipe(tmp_path, suite="arithmetic", reward_funcs=["accuracy", "format"], reward_weights=[1.0]))
    with pytest.raises(RLDataError, match=r"reward_kwargs for 'soft_overlong_punishment': unknown knob\(s\) \['cache'\]"):
        run(recipe(tmp_path, suite="arithmetic", reward_funcs=["soft_overlong_punishment"],
                   reward_kwargs={"soft_overlong_punishment": {"cache": 4}}))


@pytest.mark.parametrize("models, message", [
    ([{"path": "no-such-rm", "weight": 0.5}], r"reward_models\[0\]: path 'no-such-rm' is not a checkpoint directory"),
    ([{"weight": 0.5}], r"reward_models\[0\]: give either path .* or url"),
    ([{"path": "a", "url": "http://127.0.0.1:1"}], r"reward_models\[0\]: give either path .* or url"),
    ([{"path": "a", "wieght": 0.5}], r"reward_models\[0\]: unknown keys \['wieght'\]"),
])
def test_bad_reward_models_fail_before_anything_loads(tmp_path, models, message):
    with pytest.raises(ValueError, match=message):
        run(recipe(tmp_path, suite="arithmetic", reward_models=models))
    with pytest.raises(RLDataError, match=r"no rewards: reward_funcs is empty and there are no reward_models"):
        run(recipe(tmp_path, suite="arithmetic", reward_funcs=[]))


def test_suite_and_sources_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="give exactly one of `suite`"):
        recipe(tmp_path)


def test_reward_that_raises_or_returns_the_wrong_length_is_named():
    def broken(completions, **columns):
        raise KeyError("gold")

    def short(completions, **columns):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(RewardFunctionError, match=r"reward function 'mine' \(.*broken\) failed on a batch of 2 "
                                                  r"completions: KeyError: 'gold'"):
        NamedReward("mine", broken, {})(prompts=["a", "b"], completions=["1", "2"], trainer_state=None)
    with pytest.raises(RewardFunctionError, match=r"'mine'.*returned 1 values for 2 completions"):
        NamedReward("mine", short, {})(prompts=["a", "b"], completions=["1", "2"])
    # A real one, with TRL's extra arguments and a bound knob; conversational completions as TRL passes them.
    reward = NamedReward("soft_overlong_punishment", REWARD_FUNCS["soft_overlong_punishment"],
                         {"max_completion_len": 4, "soft_punish_cache": 2})
    assert reward.__name__ == "soft_overlong_punishment"
    assert reward(prompts=["a"] * 3, completions=[[{"role": "assistant", "content": "x"}]] * 3,
                  completion_ids=[[1, 2], [1, 2, 3], [1] * 5], log_metric=print) == [0.0, -0.5, -1.0]


class CharTokenizer:
    """One token per character; no chat template (string prompts stay text)."""

    chat_template = None

    def __call__(self, text):
        return {"input_ids": list(range(len(text)))}


def test_long_prompts_are_dropped_and_counted():
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (3, 10, 5, 11)]
    kept, lengths, dropped = drop_long_prompts(rows, CharTokenizer(), 8, {})
    assert [len(r["prompt"]) for r in kept] == [3, 5] and lengths == [3, 5] and dropped == 2
    assert drop_long_prompts(rows, CharTokenizer(), None, {})[2] == 0
    with pytest.raises(RLDataError, match="every prompt .4. is longer than max_prompt_length=2"):
        drop_long_prompts(rows, CharTokenizer(), 2, {})


def logs(step, clipped=0.0, zero_std=0.0, length=4.0, accuracy=0.5):
    return {"completions/clipped_ratio": clipped, "frac_reward_zero_std": zero_std,
            "completions/mean_length": length, "rewards/accuracy/mean": accuracy}


def test_alerts_fire_when_fractions_stay_near_one_and_on_length_hacking(tmp_path):
    monitor = RolloutMonitor(tmp_path, samples=2, window=3, fraction=0.95, accuracy_reward="accuracy",
                             printer=lambda *a: None)
    kinds = []
    # truncated for 3 logs in a row -> one alert; a dip below the fraction restarts the count
    for step, clipped in enumerate([1.0, 0.97, 0.5, 1.0, 1.0, 1.0], start=1):
        kinds += [(a.step, a.kind) for a in monitor.check(step, logs(step, clipped=clipped))]
    assert kinds == [(6, "truncated")]
    monitor = RolloutMonitor(tmp_path / "b", samples=2, window=3, fraction=0.95, accuracy_reward="accuracy",
                             printer=lambda *a: None)
    fired = [monitor.check(s, logs(s, zero_std=1.0, length=4.0 * 1.2 ** s, accuracy=0.5 - 0.01 * s))
             for s in range(1, 4)]
    assert [a.kind for a in fired[-1]] == ["zero_variance", "length_hacking"] and fired[:2] == [[], []]
    # Length growing while accuracy grows too is learning, not hacking.
    monitor = RolloutMonitor(tmp_path / "c", samples=2, window=3, fraction=0.95, accuracy_reward="accuracy",
                             printer=lambda *a: None)
    assert all(not monitor.check(s, logs(s, length=4.0 * 1.2 ** s, accuracy=0.1 * s)) for s in range(1, 6))
    lines = [json.loads(line) for line in (tmp_path / "b" / "alerts.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["zero_variance", "length_hacking"] and lines[1]["step"] == 3


def test_rollout_sample_and_alerts_continue_without_duplicates_on_resume(tmp_path):
    monitor = RolloutMonitor(tmp_path, samples=2, window=1, fraction=0.95, accuracy_reward="accuracy",
                             printer=lambda *a: None)
    for step in (1, 2, 3):
        monitor.record(step, logs(step, clipped=1.0), [{"prompt": "p", "completion": str(i)} for i in range(5)])
    RolloutMonitor(tmp_path, samples=2, window=1, fraction=0.95, accuracy_reward="accuracy",
                   printer=lambda *a: None, resume_step=2)
    steps = [json.loads(line)["step"] for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "alerts.jsonl").read_text().splitlines()] == [1, 2]


def test_overlong_penalty_follows_the_runs_completion_limit(tmp_path):
    from rl.data import reward_setup

    names, weights, kwargs = reward_setup(recipe(tmp_path, suite="arithmetic", max_completion_length=32))
    assert names == ["accuracy", "answer_consistency", "soft_overlong_punishment"] and weights == [1.0, 0.5, 0.1]
    # The suite evaluates with 8 tokens; this run generates up to 32: DAPO's L_max is the run's.
    assert kwargs["soft_overlong_punishment"] == {"max_completion_len": 32, "soft_punish_cache": 4}
    cfg = recipe(tmp_path, suite="arithmetic", max_completion_length=32,
                 reward_kwargs='{"soft_overlong_punishment": {"max_completion_len": 24, "soft_punish_cache": 8}}')
    assert reward_setup(cfg)[2]["soft_overlong_punishment"] == {"max_completion_len": 24, "soft_punish_cache": 8}
