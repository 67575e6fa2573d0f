"""engine.rewards: answer extraction, number normalisation, accuracy/format rewards, the registry and the weighted
combination (TRL's reward-function signature and None semantics)."""

import functools
import warnings

import pytest

from engine.rewards import (
    REWARDS,
    accuracy_reward,
    answer_tag_reward,
    compute_rewards,
    extract_answer,
    format_reward,
    load_reward,
    normalize_number,
    overlong_penalty,
    reward_name,
)


# A user's reward function, loaded by import path in the tests below.
def my_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


NOT_CALLABLE = 42


# --------------------------------------------------------------------------------------------- extract_answer
@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer>42</answer>", "42"),
    ("<answer>1</answer> then <answer> 2 </answer>", "2"),  # the last tag wins, stripped
    ("<answer>\\boxed{7}</answer>", "7"),  # a box inside the tag is unwrapped
    ("so \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),  # nested braces
    ("\\boxed{1} no wait \\boxed{2}", "2"),
    ("\\boxed{\\boxed{5}}", "5"),
    ("\\boxed {x^{2}}", "x^{2}"),
    ("He pays 2*3=6\n#### 1,234", "1,234"),
    ("#### 5\n\n#### 6 ", "6"),
    ("<answer>9</answer> and \\boxed{8} and #### 7", "9"),  # priority: tags > boxed > ####
    ("\\boxed{8} and #### 7", "8"),
    ("the answer is 17", None),  # no fallback by default
    ("", None),
    ("<answer></answer>", None),
    ("<answer>12", None),  # truncated: an unclosed tag is not an answer
    ("\\boxed{12", None),
    ([{"role": "assistant", "content": "<answer>3</answer>"}], "3"),  # conversational completion
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_fallback_last_number():
    assert extract_answer("first 3 then $1,234.50 done.", fallback_last_number=True) == "$1,234.50"
    assert extract_answer("x is -5", fallback_last_number=True) == "-5"
    assert extract_answer("nothing here", fallback_last_number=True) is None
    assert extract_answer("<answer>4</answer> 5", fallback_last_number=True) == "4"  # still lowest priority


# --------------------------------------------------------------------------------------------- normalize_number
@pytest.mark.parametrize("text, expected", [
    ("1,234", "1234"), ("$1,234.00", "1234"), ("-5", "-5"), ("+7", "7"), ("3.50", "3.5"), ("3.5", "3.5"),
    ("72.", "72"), ("  18 ", "18"), ("5.5.", "5.5"), ("50%", "50"), ("\\$5", "5"), ("-$5", "-5"), ("$-5", "-5"),
    ("-0", "0"), ("0.0", "0"), (".5", "0.5"), ("1e3", "1000"), ("3/4", "0.75"), ("6/8", "0.75"), ("2/6", "1/3"),
    ("\\frac{3}{4}", "0.75"), ("-\\dfrac{1}{3}", "-1/3"), ("4/2", "2"), ("1 000", "1000"), ("007", "7"),
    ("1,234,567.89", "1234567.89"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1,23", "12,3456", "1/0", "1/2/3", "x=5", "NaN", "inf", "1e99999", None,
                                  "5 apples"])
def test_normalize_number_rejects(text):
    assert normalize_number(text) is None


# --------------------------------------------------------------------------------------------- accuracy_reward
def test_accuracy_reward_gsm8k_ground_truth():
    gold = "She sells 16-3-4=<<16-3-4=9>>9 eggs.\n9*2=$<<9*2=18>>18\n#### 18"
    completions = [
        "<think>9 eggs at $2</think><answer>18</answer>",
        "<think>...</think><answer>$18.00</answer>",
        "<think>...</think><answer>17</answer>",
        "The answer is 18",  # no stated answer: 0 without the fallback
        "\\boxed{18}",
        "#### 18",
    ]
    rewards = accuracy_reward(prompts=["q"] * 6, completions=completions, answer=[gold] * 6)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert accuracy_reward(["q"], ["The answer is 18"], answer=[gold], fallback_last_number=True) == [1.0]


def test_accuracy_reward_formats_and_strings():
    prompts = ["q"] * 7
    completions = ["<answer>1,234</answer>", "<answer>3.5</answer>", "<answer>0.75</answer>", "<answer>Paris</answer>",
                   "<answer>paris</answer>", "<answer> -5 </answer>", "<answer>5</answer>"]
    answers = ["#### 1,234", "3.50", "\\frac{3}{4}", "Paris", "Paris", "-5", "-5"]
    assert accuracy_reward(prompts, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    # a numeric ground truth never matches a non-numeric answer; a missing ground truth gives None (reward skipped)
    assert accuracy_reward(["q", "q"], ["<answer>five</answer>", "<answer>5</answer>"], answer=["5", None]) == [0.0, None]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        accuracy_reward(["q", "q"], ["a", "b"], answer=["1"])
    assert accuracy_reward(["q"], ["<answer>2</answer>"], solution=["#### 2"]) == [1.0]  # TRL's column name
    with pytest.raises(ValueError, match=r"'answer' \(or 'solution'\) column; the columns passed are \['id'\]"):
        accuracy_reward(["q"], ["<answer>2</answer>"], id=[0])


# --------------------------------------------------------------------------------------------- format rewards
@pytest.mark.parametrize("completion, expected", [
    ("<think>12+3</think><answer>15</answer>", 1.0),
    ("  <think>\nstep 1\nstep 2\n</think>\n\n<answer> 15 </answer>\n ", 1.0),  # whitespace tolerant, multi-line
    ("<think></think><answer>15</answer>", 1.0),  # empty reasoning allowed
    ("<answer>15</answer>", 0.0),  # missing think
    ("<think>x</think>", 0.0),  # missing answer
    ("<think>x</think><answer> </answer>", 0.0),  # blank answer
    ("<think>x</think><answer>15</answer> and more", 0.0),  # text after the answer
    ("Sure! <think>x</think><answer>15</answer>", 0.0),  # text before
    ("<think>x</think> so <answer>15</answer>", 0.0),  # text between
    ("<think>a<think>b</think></think><answer>1</answer>", 0.0),  # nested think
    ("<think>x</think><answer><answer>1</answer></answer>", 0.0),  # nested answer
    ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
    ("<think>x</think><answer>15", 0.0),  # truncated
    ("<answer>15</answer><think>x</think>", 0.0),  # wrong order
])
def test_format_reward(completion, expected):
    assert format_reward(["p"], [completion]) == [expected]


def test_format_reward_conversational():
    msg = [{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}]
    assert format_reward(["p"], [msg]) == [1.0]


def test_answer_tag_reward():
    completions = ["x <answer>1</answer> y", "<answer>1</answer><answer>2</answer>", "no tags", "<answer>1",
                   "<answer>1</answer></answer>"]
    assert answer_tag_reward(["p"] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------- load_reward
def test_load_reward_by_name_and_path():
    assert load_reward("accuracy") is accuracy_reward
    assert load_reward("format") is format_reward
    assert set(REWARDS) >= {"accuracy", "format"}
    assert load_reward("tests.engine.rewards.test_rewards:my_reward") is my_reward
    assert load_reward("tests.engine.rewards.test_rewards.my_reward") is my_reward  # TRL's dotted form
    assert load_reward("engine.rewards.format:format_reward") is format_reward
    assert load_reward(my_reward) is my_reward


@pytest.mark.parametrize("spec, error, message", [
    ("no_such_reward", ValueError, "unknown reward 'no_such_reward'.*accuracy"),
    ("", ValueError, "registry name"),
    ("tests.engine.no_such_module:fn", ModuleNotFoundError, "cannot import module 'tests.engine.no_such_module'"),
    ("tests.engine.rewards.test_rewards:no_such_fn", AttributeError, "has no attribute 'no_such_fn'"),
    ("tests.engine.rewards.test_rewards:NOT_CALLABLE", TypeError, "'NOT_CALLABLE' is a int, not a callable"),
    (":fn", ValueError, "module:function"),
])
def test_load_reward_errors(spec, error, message):
    with pytest.raises(error, match=message):
        load_reward(spec)


# --------------------------------------------------------------------------------------------- compute_rewards
def _maybe(prompts, completions, **kwargs):
    """1.0 on even rows, None on odd ones."""
    return [1.0 if i % 2 == 0 else None for i in range(len(completions))]


def test_compute_rewards_weights_and_columns():
    completions = ["<think>a</think><answer>3</answer>", "<answer>3</answer>", "<think>a</think><answer>4</answer>"]
    totals, per_fn = compute_rewards(["accuracy", format_reward], [1.0, 0.5], ["q"] * 3, completions,
                                     {"answer": ["3", "3", "3"]})
    assert per_fn == {"accuracy_reward": [1.0, 1.0, 0.0], "format_reward": [1.0, 0.0, 1.0]}
    assert totals == [1.5, 1.0, 0.5]
    totals, _ = compute_rewards([format_reward], None, ["q"] * 3, completions, {})  # weights default to 1.0
    assert totals == [1.0, 0.0, 1.0]


def test_compute_rewards_none_is_skipped():
    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    def nan_on_first(prompts, completions, **kwargs):
        return [float("nan")] + [2.0] * (len(completions) - 1)

    totals, per_fn = compute_rewards([_maybe, nan_on_first], [2.0, 1.0], ["q"] * 3, ["a", "b", "c"])
    assert per_fn["_maybe"] == [1.0, None, 1.0]
    assert per_fn["nan_on_first"] == [None, 2.0, 2.0]  # NaN is read as None, as TRL's nansum does
    assert totals == [2.0, 2.0, 4.0]
    with pytest.warns(RuntimeWarning, match=r"returned None for rows \[1\]"):
        totals, _ = compute_rewards([_maybe, never], None, ["q"] * 2, ["a", "b"])
    assert totals == [1.0, 0.0]  # a row with no reward at all counts as 0.0


def test_compute_rewards_names_and_kinds():
    async def async_reward(prompts, completions, **kwargs):
        return [0.25] * len(completions)

    half = functools.partial(my_reward)
    assert reward_name(half) == "my_reward"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        totals, per_fn = compute_rewards([my_reward, half, async_reward], None, ["q", "q"], ["ab", "abc"])
    assert list(per_fn) == ["my_reward", "my_reward_2", "async_reward"]
    assert totals == [4.25, 6.25]


def test_compute_rewards_errors():
    def short(prompts, completions, **kwargs):
        return [1.0]

    def wrong_type(prompts, completions, **kwargs):
        return ["high", "low"]

    with pytest.raises(ValueError, match=r"reward function 'short' returned 1 rewards for 2 completions"):
        compute_rewards([short], None, ["q", "q"], ["a", "b"])
    with pytest.raises(TypeError, match="'wrong_type' returned 'high'"):
        compute_rewards([wrong_type], None, ["q", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        compute_rewards([my_reward, my_reward], [1.0], ["q"], ["a"])
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        compute_rewards([my_reward], None, ["q"], ["a", "b"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values"):
        compute_rewards([my_reward], None, ["q", "q"], ["a", "b"], {"answer": ["1"]})


# ------------------------------------------------------------------------------------- DAPO's overlong punishment
@pytest.mark.parametrize("length, want", [
    (0, 0.0), (11, 0.0), (12, 0.0),  # up to max_tokens - buffer_len = 12: no punishment
    (13, -0.125), (14, -0.25), (15, -0.375), (16, -0.5),  # linear over the buffer of 4, down to -factor at 16
    (40, -0.5),  # beyond max_tokens (not produced by the generator): the floor
])
def test_overlong_penalty_by_hand(length, want):
    assert overlong_penalty([length], max_tokens=16, buffer_len=4, penalty_factor=0.5) == [pytest.approx(want)]


def test_overlong_penalty_off_and_bad_arguments():
    assert overlong_penalty([5, 16], max_tokens=16, buffer_len=0) == [0.0, 0.0]
    for kwargs, message in ((dict(max_tokens=16, buffer_len=16), "buffer_len must be in"),
                            (dict(max_tokens=0, buffer_len=0), "max_tokens must be >= 1"),
                            (dict(max_tokens=16, buffer_len=4, penalty_factor=-1), "penalty_factor must be >= 0")):
        with pytest.raises(ValueError, match=message):
            overlong_penalty([1], **kwargs)
    with pytest.raises(ValueError, match=r"lengths\[1\] must be >= 0"):
        overlong_penalty([1, -2], max_tokens=16, buffer_len=4)
