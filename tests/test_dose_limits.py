"""Answers about a dose of a common medicine get the label limits beside them, whatever the model wrote."""

import json

from medgpt.dose_limits import dose_note


def test_a_wrong_dose_answer_gets_the_label_limit():
    # the embedded model's answer after SFT, in a session's pipeline run
    note = dose_note("How much paracetamol can an adult take in one day?",
                     "A common recommendation: 6g of paracetamol every day; 9g or 12g if you're pregnant.")
    assert note.startswith("Dose check (MedGPT's table") and "never more than 4 g (4,000 mg) in 24 hours" in note
    assert "ibuprofen" not in note.lower()
    # a question about a dose names the medicine: the note comes whatever the answer says
    assert "4 g" in dose_note("What is the maximum daily dose of acetaminophen?", "It depends.")
    # the medicine named only in the answer, with an amount
    assert "1,200 mg" in dose_note("My knee hurts after running.", "Take ibuprofen 800 mg three times a day.")


def test_chinese_questions_get_the_chinese_note():
    note = dose_note("孩子发烧38.5℃，可以吃多少布洛芬？", "每次5毫克。")
    assert note.startswith("剂量核对") and "每天不超过40毫克/公斤" in note and "Ibuprofen" not in note


def test_no_note_without_a_listed_medicine_or_a_dose():
    assert dose_note("What are the warning signs of a stroke?", "Face drooping, arm weakness: call 120.") is None
    assert dose_note("I have a sore throat.", "Paracetamol or ibuprofen can ease the pain.") is None


def test_batch_answers_carry_the_note(tiny_model_dir, tmp_path):
    import inference

    questions = tmp_path / "q.txt"
    questions.write_text("What is the maximum daily dose of paracetamol for a healthy adult?\nWhat is HbA1c?\n",
                         encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    inference.main(["--base_model", str(tiny_model_dir), "--data_file", str(questions), "--output_file", str(output),
                    "--temperature", "0", "--max_new_tokens", "4"])
    dose, other = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert "4 g (4,000 mg)" in dose["dose_note"] and "dose_note" not in other


def test_the_demo_shows_the_note_below_the_answer_and_keeps_it_out_of_the_conversation():
    from gradio_demo import DOSE_NOTE_SHOWN, with_dose_note

    for question in ("How much paracetamol a day?", "扑热息痛一天最多吃多少？"):
        shown = with_dose_note("The answer.", dose_note(question, ""))
        assert "\n\n> " in shown and DOSE_NOTE_SHOWN.sub("", shown) == "The answer."
