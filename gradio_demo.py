"""A web chat demo for a MedGPT model (Gradio).

    python gradio_demo.py --base_model outputs/sft-merged
    python gradio_demo.py --base_model BASE --lora_model outputs/sft --port 7860
    python gradio_demo.py --base_model outputs/sft-merged --knowledge_base true --kb_dir my_docs/

Streams answers, keeps the conversation, and has a system-prompt box, sampling controls,
Stop and Clear buttons and example questions. Listens on 127.0.0.1 unless --host says otherwise;
a public share link only with --share true. Requests wait in a queue (--concurrency_limit at a
time) so several users do not crash it. With --knowledge_base true a second tab answers from a
folder of documents (--kb_dir), citing the passages it used (see chatpdf.py).

Answers come from a language model: they can be wrong and are not medical advice.
"""

from __future__ import annotations

import re

import threading
from dataclasses import dataclass, field

import gradio as gr

from medgpt.args import ModelArguments, parse_args, run_cli
from medgpt.safety_notes import safety_note
from medgpt.generation import DISCLAIMER, ChatModel, GenerationArguments
from medgpt.rag import RagArguments, answer_stream, open_knowledge_base

EXAMPLES = [
    "I have had a sore throat and a mild fever for two days. When should I see a doctor?",
    "What is the maximum daily dose of paracetamol for an adult, and who should take less?",
    "My blood test says HbA1c 6.1%. What does that mean?",
    "孩子发烧38.5℃，精神还好，家长应该怎么处理？",
    "请解释一下血常规里白细胞偏高可能意味着什么。",
]
EMPTY_ANSWER = "(The model ended its turn without any text. Ask again or rephrase the question.)"

REASONING_SHOWN = re.compile(r"^<details><summary>Reasoning</summary>.*?</details>\s*", re.S)
SAFETY_NOTE_SHOWN = re.compile(r"\n\n> (Emergency signs \(|急症信号（|Dose check \(|剂量核对（).*\Z", re.S)


def with_safety_note(content: str, note: str) -> str:
    """An answer with medgpt.safety_notes' note quoted below it (SAFETY_NOTE_SHOWN takes it off again)."""
    return content + "\n\n" + "\n".join("> " + line for line in note.splitlines())


@dataclass
class DemoArguments:
    """Where the demo listens."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0 exposes it to the network)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    share: bool = field(default=False, metadata={"help": "Create a public gradio.live link (off by default)."})
    concurrency_limit: int = field(default=1, metadata={"help": "Answers generated at the same time; others queue."})
    max_queue_size: int = field(default=64, metadata={"help": "Requests that may wait in the queue."})
    knowledge_base: bool = field(default=False, metadata={
        "help": "Add a Knowledge base tab that answers from the documents in --kb_dir with cited sources."})


@dataclass
class _Answer:
    """One answer being generated for a browser session, so Stop and Clear can end it."""

    stop: threading.Event = field(default_factory=threading.Event)  # ends the generation (set at its end too)
    done: threading.Event = field(default_factory=threading.Event)  # set once the answer sent its last update
    stopped_by_user: bool = False

    def stop_now(self) -> None:
        self.stopped_by_user = True
        self.stop.set()


def _text(content) -> str:
    """Message content from the chat widget: a string, or a list of parts with text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    return ""


def build_demo(chat: ChatModel, defaults: GenerationArguments, args: DemoArguments, knowledge_base=None) -> gr.Blocks:
    with gr.Blocks(title="MedGPT") as demo:
        gr.Markdown("# MedGPT medical assistant")
        gr.Markdown(f"**{DISCLAIMER}**", elem_id="disclaimer")
        with gr.Tab("Chat"):
            chat_tab(chat, defaults)
        if knowledge_base is not None:
            with gr.Tab("Knowledge base", elem_id="kb-tab"):
                knowledge_base_tab(chat, defaults, knowledge_base)
    demo.queue(default_concurrency_limit=args.concurrency_limit, max_size=args.max_queue_size)
    return demo


def chat_tab(chat: ChatModel, defaults: GenerationArguments) -> None:
    chatbot = gr.Chatbot(elem_id="chatbot", height=440, label="Conversation")
    with gr.Row():
        question = gr.Textbox(placeholder="Ask a medical question…", show_label=False, elem_id="question", scale=6)
        send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        stop = gr.Button("Stop", elem_id="stop", scale=1)
        clear = gr.Button("Clear", elem_id="clear", scale=1)
    with gr.Accordion("Settings", open=False):
        system = gr.Textbox(label="System prompt", value=defaults.system_prompt or "", lines=2,
                            placeholder="Default: the model's own system prompt")
        temperature = gr.Slider(0.0, 1.5, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
        max_new_tokens = gr.Slider(16, 1024, value=defaults.max_new_tokens, step=16, label="Max new tokens")
    gr.Examples(EXAMPLES, inputs=question, label="Example questions")

    running: dict[str, _Answer] = {}  # session -> the answer it is generating

    def respond(message, history, system_prompt, temperature, top_p, max_new_tokens, request: gr.Request):
        if not message or not message.strip():
            yield history, ""
            return
        history = list(history or []) + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        messages = [{"role": m["role"], "content": SAFETY_NOTE_SHOWN.sub("", REASONING_SHOWN.sub("", _text(m["content"])))}
                    for m in history[:-1]]  # without the reasoning shown and MedGPT's safety note
        if system_prompt.strip():
            messages = [{"role": "system", "content": system_prompt.strip()}] + messages
        settings = GenerationArguments(
            max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
            top_k=defaults.top_k, repetition_penalty=defaults.repetition_penalty,
        )
        current = running[request.session_hash] = _Answer()
        try:
            answer, reasoning = "", ""
            for kind, piece in chat.stream_parts(messages, settings, stop_event=current.stop):
                if current.stopped_by_user:  # Stop or Clear: send nothing more
                    return
                if kind == "reasoning":  # shown apart, above the answer, and not sent back as history
                    reasoning += piece
                else:
                    answer += piece
                shown = f"<details><summary>Reasoning</summary>\n\n{reasoning.strip()}\n\n</details>\n\n" \
                    if reasoning.strip() else ""
                history[-1] = {"role": "assistant", "content": shown + answer}
                yield history, ""
            if not answer.strip() and not current.stopped_by_user:
                history[-1] = {"role": "assistant", "content": EMPTY_ANSWER}
                yield history, ""
            elif note := safety_note(message, answer):  # shown below the answer, not sent back to the model
                history[-1] = {"role": "assistant", "content": with_safety_note(history[-1]["content"], note)}
                yield history, ""
        finally:
            current.done.set()
            if running.get(request.session_hash) is current:
                del running[request.session_hash]

    def stop_answer(request: gr.Request):
        """End this session's generation now (Gradio's cancel alone cannot interrupt a running step)."""
        if current := running.get(request.session_hash):
            current.stop_now()

    def clear_chat(request: gr.Request):
        """Stop this session's answer and wait until it has sent its last update, so it cannot refill the chat."""
        if current := running.get(request.session_hash):
            current.stop_now()
            current.done.wait(timeout=30)
        return [], ""

    inputs = [question, chatbot, system, temperature, top_p, max_new_tokens]
    sent = send.click(respond, inputs, [chatbot, question])
    submitted = question.submit(respond, inputs, [chatbot, question])
    stop.click(stop_answer, None, None, cancels=[sent, submitted], concurrency_limit=None)
    clear.click(clear_chat, None, [chatbot, question], cancels=[sent, submitted], concurrency_limit=None)


def knowledge_base_tab(chat: ChatModel, defaults: GenerationArguments, knowledge_base) -> None:
    documents = sorted({c.source for c in knowledge_base.chunks})
    gr.Markdown(f"Answers from {len(documents)} documents ({len(knowledge_base.chunks)} passages), citing the "
                "passages used as [1], [2]. When nothing relevant is found the answer says so.")
    with gr.Row():
        question = gr.Textbox(placeholder="Ask the knowledge base…", show_label=False, elem_id="kb-question", scale=6)
        ask = gr.Button("Ask", variant="primary", elem_id="kb-ask", scale=1)
    answer = gr.Markdown(elem_id="kb-answer")
    with gr.Accordion("Retrieved passages", open=False):
        passages = gr.Markdown(elem_id="kb-passages")

    def respond(message):
        if not message or not message.strip():
            yield "", ""
            return
        hits = knowledge_base.search(message)
        shown = "\n\n".join(f"**[{n}] {h.chunk.where()}** (BM25 {h.bm25:.2f}, coverage {h.coverage:.2f})\n\n"
                             f"{h.chunk.text}" for n, h in enumerate(hits, 1)) or "No relevant passage."
        text = ""
        for piece in answer_stream(knowledge_base, chat, message, defaults, hits=hits):
            text += piece
            yield text.replace("\n", "  \n"), shown  # Markdown: keep the answer's and the sources' line breaks

    ask.click(respond, question, [answer, passages])
    question.submit(respond, question, [answer, passages])


def main(argv: list[str] | None = None) -> None:
    model_args, generation_args, demo_args, rag_args, _ = parse_args(
        (ModelArguments, GenerationArguments, DemoArguments, RagArguments), argv, description=__doc__
    )
    knowledge_base = open_knowledge_base(rag_args) if demo_args.knowledge_base else None
    chat = ChatModel.load(model_args)
    demo = build_demo(chat, generation_args, demo_args, knowledge_base)
    demo.launch(server_name=demo_args.host, server_port=demo_args.port, share=demo_args.share)


if __name__ == "__main__":
    run_cli(main)
