"""Answers get MedGPT's safety notes beside them, whatever the model wrote: the label limits of a common medicine
whose dose is asked or given, and the advice to call emergency services when an emergency sign is named."""

import json

from medgpt.safety_notes import dose_note, emergency_note, safety_note


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
    assert safety_note("I have a sore throat.", "Rest, fluids, and see a doctor if it lasts a week.") is None


def test_emergency_signs_get_the_advice_to_call_emergency_services():
    # the embedded model's answer after the pipeline, in a session's run
    answer = ("If you're feeling unwell, call your pharmacist immediately if you experience: Coughing up blood or "
              "mucus; Swelling of the face or tongue; Difficulty swallowing or choking")
    note = emergency_note("I have had a mild sore throat for two days.", answer)
    assert note.startswith("Emergency signs (MedGPT's note") and "call your local emergency number at once" in note
    assert "swelling of the face, lips, tongue or throat" in note and "coughing or vomiting blood" in note
    assert "choking" in note and "chest pain" not in note
    zh = emergency_note("我胸口痛，还喘不上气，怎么办？", "")
    assert zh.startswith("急症信号") and "胸痛或胸闷" in zh and "呼吸困难" in zh and "120" in zh
    both = safety_note("My child had a seizure after too much paracetamol, what is the maximum dose?", "")
    first, second = both.split("\n", 1)
    assert first.startswith("Emergency signs") and "seizure" in first and second.startswith("Dose check")


def test_batch_answers_carry_the_note(tiny_model_dir, tmp_path):
    import inference

    questions = tmp_path / "q.txt"
    questions.write_text("What is the maximum daily dose of paracetamol for a healthy adult?\nWhat is HbA1c?\n",
                         encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    inference.main(["--base_model", str(tiny_model_dir), "--data_file", str(questions), "--output_file", str(output),
                    "--temperature", "0", "--max_new_tokens", "4"])
    dose, other = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert "4 g (4,000 mg)" in dose["safety_note"] and "safety_note" not in other


def test_the_demo_shows_the_note_below_the_answer_and_keeps_it_out_of_the_conversation():
    from gradio_demo import SAFETY_NOTE_SHOWN, with_safety_note

    for question in ("How much paracetamol a day?", "扑热息痛一天最多吃多少？", "Chest pain: what now?", "胸痛怎么办？",
                     "Chest pain after 6 g of paracetamol?"):
        shown = with_safety_note("The answer.", safety_note(question, ""))
        assert "\n\n> " in shown and SAFETY_NOTE_SHOWN.sub("", shown) == "The answer."
