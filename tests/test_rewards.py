"""GRPO rewards: option letters are parsed from free text in Chinese and English, tricky cases included."""

import pytest

from medgpt.rewards import (
    char_f1,
    choice_accuracy_reward,
    extract_choice,
    format_reward,
    open_answer_reward,
    open_answer_score,
)


@pytest.mark.parametrize("text, expected", [
    ("答案：B", "B"),
    ("答案:B", "B"),
    ("正确答案是C", "C"),
    ("分析……因此正确答案为 D。", "D"),
    ("应选E", "E"),
    ("The answer is (c).", "C"),
    ("The correct answer is B because ...", "B"),
    ("Answer: A", "A"),
    ("B. Metformin is first-line because ...", "B"),
    ("(D) Aspirin", "D"),
    ("I think **D** is right.", "D"),
    ("**答案：C**", "C"),
    ("C", "C"),
    ("A, C", "AC"),
    ("The correct options are A and C.", "AC"),
    ("答案：B、D", "BD"),
    ("答案：AC", "AC"),
    ("Answer: C and A", "AC"),
    ("（B）", "B"),
    ("答案：b", "B"),
    ("Not A. The answer is C.", "C"),
    ("The answer is not A; the answer is D.", "D"),
    ("答案不是A，正确答案是B", "B"),
    ("Answer: A\nWait, on reflection the answer is E.", "E"),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize("text", [
    "Aspirin and Clopidogrel are both antiplatelet drugs.",  # capitals inside words
    "A fever is a raised temperature.",  # the article "A"
    "I cannot tell without more information.",
    "",
    "这道题我不确定。",
    "Both CABG and PCI are options.",
])
def test_no_letter_found(text):
    assert extract_choice(text) == ""


def test_choice_accuracy_reward_handles_chat_completions_and_other_items():
    completions = [[{"role": "assistant", "content": "分析……\n答案：B"}], "The answer is (a)", "no idea", "答案：AC", "x"]
    assert choice_accuracy_reward(None, completions, answer=["B", "C", "A", "AC", "缺铁性贫血"]) == [1.0, 0.0, 0.0, 1.0, None]


def test_open_answer_reward():
    assert open_answer_score("患者符合缺铁性贫血的表现。\n答案：缺铁性贫血", "缺铁性贫血") == 1.0
    assert open_answer_score("Answer: type 2 diabetes mellitus", "Type 2 Diabetes") == 1.0
    assert open_answer_score("答案：巨幼细胞贫血", "缺铁性贫血") == pytest.approx(char_f1("巨幼细胞贫血", "缺铁性贫血"))
    assert 0 < open_answer_score("答案：巨幼细胞贫血", "缺铁性贫血") < 1
    assert open_answer_score("答案：胰岛素", "华法林") == 0.0
    assert open_answer_reward(None, ["答案：华法林"], answer=["华法林"]) == [1.0]
    assert open_answer_reward(None, ["答案：B"], answer=["B"]) == [None]


def test_format_reward():
    good = "Fever with neck stiffness suggests meningitis.\nAnswer: C"
    assert format_reward(None, [good, "Answer: C", "The answer is C", "推理过程……\n答案：B", "x" * 2000 + "\nAnswer: A"]) == \
        [1.0, 0.5, 0.0, 1.0, 0.5]
