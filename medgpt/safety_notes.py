"""Safety notes MedGPT puts beside a model's answer: dose limits and emergency signs.

A small model states dose figures unreliably and can send an emergency to the wrong place: the embedded
demo model, after SFT, has answered that an adult may take "6 g of paracetamol every day", and told a user
with a sore throat to call the pharmacist for "swelling of the face or tongue". The chat (inference.py),
batch answers and the web demo therefore add, after an answer, marked as MedGPT's and not the model's:

- the label limits of paracetamol, ibuprofen or aspirin when the question or answer concerns their dose
  (common label and national-formulary limits for adults and children; a product's label may set lower);
- the advice to call emergency services now when the question or answer names an emergency sign.

The model's own text is left as it is.
"""

from __future__ import annotations

import re

# (names in questions and answers, note in English, note in Chinese)
MEDICINES = [
    (("paracetamol", "acetaminophen", "tylenol", "panadol", "对乙酰氨基酚", "扑热息痛", "泰诺林", "必理通"),
     "Paracetamol (acetaminophen), adults weighing at least 50 kg: 500 mg to 1 g every 4 to 6 hours, never more "
     "than 4 g (4,000 mg) in 24 hours; at most 2 to 3 g a day with liver disease, regular alcohol use or a weight "
     "under 50 kg. Children: by weight, 10 to 15 mg/kg a dose, at most 75 mg/kg (and 4 g) a day.",
     "对乙酰氨基酚（扑热息痛）：体重至少50公斤的成人每次500毫克至1克，间隔4至6小时，24小时内不超过4克（4000毫克）；"
     "肝病、经常饮酒或体重低于50公斤者每天不超过2至3克。儿童按体重：每次10至15毫克/公斤，每天不超过75毫克/公斤（且不超过4克）。"),
    (("ibuprofen", "advil", "motrin", "nurofen", "布洛芬", "芬必得", "美林"),
     "Ibuprofen, adults: 200 to 400 mg every 4 to 6 hours with food, at most 1,200 mg in 24 hours unless a doctor "
     "advises more. Children from 6 months: 5 to 10 mg/kg a dose, at most 40 mg/kg a day.",
     "布洛芬：成人每次200至400毫克，随餐服用，间隔4至6小时，除非医生另有建议，24小时内不超过1200毫克。"
     "6个月以上儿童：每次5至10毫克/公斤，每天不超过40毫克/公斤。"),
    (("aspirin", "阿司匹林"),
     "Aspirin for pain or fever, adults: 300 to 900 mg every 4 to 6 hours, at most 4 g in 24 hours. Not for "
     "children under 16 (risk of Reye's syndrome) unless a doctor prescribes it.",
     "阿司匹林（止痛、退热）：成人每次300至900毫克，间隔4至6小时，24小时内不超过4克。16岁以下儿童除非医生处方，"
     "不宜使用（有瑞氏综合征风险）。"),
]
ABOUT_DOSE = re.compile(r"\b(dose|doses|dosage|dosing|how much|how many|maximum|max|limit|per day|a day|daily)\b"
                        r"|\d\s*(mg|g|milligrams?|grams?|ml|tablets?)\b|剂量|用量|多少|最大|上限|每天|一天|\d\s*(毫克|克|片)",
                        re.IGNORECASE)
HEADERS = ("Dose check (MedGPT's table of label limits, not the model's answer; ask a pharmacist or doctor, and "
           "get emergency care at once after taking more than the limit, even without symptoms):",
           "剂量核对（来自MedGPT的说明书限量表，并非模型回答；请咨询药师或医生；如已超过限量服用，即使没有症状也应立即就医）：")


def _in_chinese(question: str) -> bool:
    """Whether a question holds CJK characters: its notes are then given in Chinese."""
    return bool(re.search(r"[\u4e00-\u9fff]", question))


def dose_note(question: str, answer: str) -> str | None:
    """The limits of the medicines named in a question or its answer, when either is about a dose (a dose
    word, or an amount such as "500 mg"); None otherwise. In Chinese when the question is."""
    text = f"{question}\n{answer}"
    lowered = text.lower()
    named = [medicine for medicine in MEDICINES if any(name in lowered for name in medicine[0])]
    if not named or not ABOUT_DOSE.search(text):
        return None
    chinese = _in_chinese(question)
    lines = [HEADERS[chinese]] + [f"- {medicine[2] if chinese else medicine[1]}" for medicine in named]
    return "\n".join(lines)


# emergency signs: (phrases that name it, in lower case; the sign in English; in Chinese)
EMERGENCY_SIGNS = [
    (("chest pain", "chest pressure", "chest tightness", "胸痛", "胸闷", "胸口痛"), "chest pain or pressure", "胸痛或胸闷"),
    (("difficulty breathing", "trouble breathing", "shortness of breath", "short of breath", "can't breathe",
      "cannot breathe", "struggling to breathe", "呼吸困难", "喘不上气"), "trouble breathing", "呼吸困难"),
    (("swelling of the face", "swelling of the lips", "swelling of the tongue", "swelling of the throat",
      "face or tongue", "lips or tongue", "tongue or throat", "swollen tongue", "swollen throat", "面部肿胀",
      "嘴唇肿", "舌头肿", "喉咙肿"), "swelling of the face, lips, tongue or throat", "面部、嘴唇、舌头或喉咙肿胀"),
    (("choking",), "choking", "窒息"),
    (("face drooping", "facial droop", "slurred speech", "weakness on one side", "numbness on one side",
      "one side of the body", "口角歪斜", "言语不清", "一侧肢体"), "signs of a stroke (face drooping, weakness on one side, "
     "slurred speech)", "中风征象（口角歪斜、一侧肢体无力、言语不清）"),
    (("coughing up blood", "coughing blood", "vomiting blood", "咳血", "咯血", "呕血"), "coughing or vomiting blood",
     "咳血或呕血"),
    (("unconscious", "unresponsive", "fainting", "fainted", "passed out", "seizure", "convulsion", "昏迷", "晕厥",
      "抽搐", "惊厥"), "fainting, unresponsiveness or a seizure", "晕厥、意识不清或抽搐"),
    (("severe bleeding", "heavy bleeding", "bleeding that will not stop", "bleeding that won't stop", "出血不止",
      "大出血"), "bleeding that does not stop", "出血不止"),
]


def emergency_note(question: str, answer: str) -> str | None:
    """The advice to call emergency services now, when a question or its answer names an emergency sign; None
    otherwise. In Chinese when the question is."""
    lowered = f"{question}\n{answer}".lower()
    chinese = _in_chinese(question)
    signs = [sign[2] if chinese else sign[1] for sign in EMERGENCY_SIGNS if any(p in lowered for p in sign[0])]
    if not signs:
        return None
    if chinese:
        return (f"急症信号（MedGPT的提示，并非模型回答）：{'、'.join(signs)}。如果正在发生，请立即拨打急救电话（中国120），"
                "不要等待药师或门诊预约。")
    return (f"Emergency signs (MedGPT's note, not the model's answer): {'; '.join(signs)}. If any is happening now, "
            "call your local emergency number at once (120 in China, 911 in the US, 112 in Europe); do not wait "
            "for a pharmacist or an appointment.")


def safety_note(question: str, answer: str) -> str | None:
    """The notes for an answer (emergency signs first, then dose limits), or None."""
    notes = [note for note in (emergency_note(question, answer), dose_note(question, answer)) if note]
    return "\n".join(notes) or None
