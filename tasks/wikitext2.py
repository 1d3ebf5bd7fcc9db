"""WikiText-2 word-level language modelling with a small LSTM, laid out as CD-GraB trains it.

Vocabulary: ``line.split() + ['<eos>']`` over train, valid and test in that order (33,278 words,
all of them in train), as GraB's and CD-GraB's ``Corpus`` build it.

Training layout (``arrange``): the training token stream is cut into ``B = num_workers ×
microbatch_size`` equal columns (``batchify``: column b holds tokens ``[b·T, (b+1)·T)``,
``T = len // B``, the remainder dropped), and each column into ``C = (T - 1) // bptt`` chunks of
``bptt`` tokens (input) with the next tokens as targets. Worker w owns columns
``[w·mb, (w+1)·mb)``; its unit c (``unit: microbatch``, ``microbatch_size`` consecutive examples) is
chunk c of its ``mb`` columns, so the example at index ``w·C·mb + c·mb + j`` is chunk c of column
``w·mb + j``. An ordering permutes the chunks a worker visits; a step is one chunk of its columns.

Hidden state: the LSTM keeps its hidden state from one forward call to the next, in visiting
order, detached between chunks, as CD-GraB's ``d_LM_train`` does (``H = repackage_hidden(H)``
before every chunk, whatever chunk the sorter picked). After reordering, the carried state comes
from a chunk that is usually not the chunk's predecessor in the text; that is the published
behaviour, kept so results compare. ``reset_hidden_each_chunk: true`` is the strict variant: every
chunk (in training and evaluation) starts from a zero state. ``reset_state()`` (or
``orderlab.tasks.reset_model_state``) clears the state; call it at the start of every epoch.

Evaluation (``evaluate_sums``): streams are read in ``bptt`` windows with the state carried along,
as CD-GraB's ``evaluate_one_model`` does; the validation set is ``valid.txt`` batchified into
``eval_columns`` streams (one row per stream), so splitting its rows between workers keeps whole
streams. The metric is perplexity, ``exp`` of the mean token loss (``finalize_metric``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from orderlab.errors import OrderlabError
from orderlab.tasks import EvalSums, TaskData, TaskDefaults, data_file, register_task, reset_model_state

TRAIN, VALID, TEST = "wikitext-2/train.txt", "wikitext-2/valid.txt", "wikitext-2/test.txt"
VOCAB_SIZE = 33_278  # of the checksummed files with line.split() + ['<eos>']
TRAIN_TOKENS = "train_tokens"  # TaskData.extras key: the whole training stream [num_tokens] int64
_EVAL_ROWS = 32  # streams evaluated together (logits: rows × bptt × vocabulary floats)


@dataclass(frozen=True)
class Corpus:
    """Token ids of the three splits, int64 [num_tokens] each, and the vocabulary size."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab_size: int


@functools.cache
def load_corpus(data_dir: Path) -> Corpus:
    """Tokenize train, valid and test (vocabulary grown in that order), once per directory.

    Raises:
        OrderlabError: a file is missing or corrupt.
    """
    vocabulary: dict[str, int] = {}

    def tokenize(relative: str) -> torch.Tensor:
        ids: list[int] = []
        with data_file(data_dir, relative).open(encoding="utf-8") as handle:
            for line in handle:
                ids += [vocabulary.setdefault(word, len(vocabulary)) for word in line.split() + ["<eos>"]]
        return torch.tensor(ids, dtype=torch.int64)

    train, valid, test = tokenize(TRAIN), tokenize(VALID), tokenize(TEST)
    return Corpus(train, valid, test, len(vocabulary))


def batchify(tokens: torch.Tensor, num_columns: int) -> torch.Tensor:
    """tokens [T'] -> columns [num_columns, T], column b = tokens[b·T : (b+1)·T], T = T' // num_columns."""
    length = len(tokens) // num_columns
    return tokens[: num_columns * length].view(num_columns, length)


def chunk_columns(columns: torch.Tensor, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """columns [B, T] -> (inputs, targets), each [C, B, bptt] with C = (T - 1) // bptt.

    inputs[c, b] = columns[b, c·bptt : (c+1)·bptt]; targets are the same positions shifted by one.
    """
    num_chunks = (columns.shape[1] - 1) // bptt
    span = num_chunks * bptt
    inputs = columns[:, :span].reshape(len(columns), num_chunks, bptt).transpose(0, 1)
    targets = columns[:, 1 : span + 1].reshape(len(columns), num_chunks, bptt).transpose(0, 1)
    return inputs, targets


def streams_from_chunks(rows: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Chunk-major rows [C·k, L] of k streams -> the streams [k, C·L] (inverse of the training layout)."""
    num_chunks = len(rows) // num_streams
    return rows.reshape(num_chunks, num_streams, -1).transpose(0, 1).reshape(num_streams, -1)


class LstmLanguageModel(nn.Module):
    """Embedding -> LSTM -> linear decoder to vocabulary logits, carrying its hidden state across calls.

    Like CD-GraB's ``LSTMModel`` (encoder and decoder initialised uniform(-0.1, 0.1), decoder bias
    0), batch-first. ``forward(tokens [N, L]) -> logits [N, L, vocab_size]`` starts from the state
    left by the previous call when it has the same N (detached: no gradient flows into earlier
    chunks), else from zeros; with ``reset_each_chunk`` always from zeros.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        reset_each_chunk: bool,
    ) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, embedding_size)
        self.rnn = nn.LSTM(
            embedding_size,
            hidden_size,
            num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.reset_each_chunk = reset_each_chunk
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_state(self) -> None:
        """Start the next forward call from a zero hidden state."""
        self.state = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        state = self.state
        if self.reset_each_chunk or (state is not None and state[0].shape[1] != tokens.shape[0]):
            state = None
        output, (hidden, cell) = self.rnn(self.drop(self.encoder(tokens)), state)
        if not self.reset_each_chunk:
            self.state = (hidden.detach(), cell.detach())
        return self.decoder(self.drop(output))


@register_task("wikitext2-lstm")
class WikiText2Lstm(TaskDefaults):
    """2-layer LSTM (embedding = hidden = 32, no dropout) on WikiText-2, bptt 35; metric perplexity.

    d = 2,179,966 parameters (embedding 1,064,896; LSTM 16,896; decoder 1,098,174). The units are
    bptt chunks of a worker's corpus columns, so only ``unit: microbatch`` applies.
    """

    metric_name = "perplexity"
    supported_units = ("microbatch",)
    data_files = (TRAIN, VALID, TEST)

    def __init__(
        self,
        bptt: int = 35,
        embedding_size: int = 32,
        hidden_size: int = 32,
        num_layers: int = 2,
        dropout: float = 0.0,
        reset_hidden_each_chunk: bool = False,
        eval_columns: int = 10,
        train_tokens: int | None = None,
        eval_tokens: int | None = None,
    ) -> None:
        if train_tokens is not None and train_tokens < 2 * bptt:
            raise OrderlabError(
                f"task.options.train_tokens={train_tokens} must be at least 2 × bptt = {2 * bptt}"
            )
        if eval_tokens is not None and eval_tokens < 2 * eval_columns:
            raise OrderlabError(
                f"task.options.eval_tokens={eval_tokens} must be at least 2 × eval_columns = {2 * eval_columns}"
            )
        if min(bptt, embedding_size, hidden_size, num_layers, eval_columns) < 1 or not 0 <= dropout < 1:
            raise OrderlabError(
                "task.options of wikitext2-lstm: bptt, embedding_size, hidden_size, num_layers and "
                "eval_columns must be >= 1 and 0 <= dropout < 1"
            )
        self.bptt, self.embedding_size, self.hidden_size = bptt, embedding_size, hidden_size
        self.num_layers, self.dropout, self.eval_columns = num_layers, dropout, eval_columns
        self.reset_hidden_each_chunk = reset_hidden_each_chunk
        self.train_tokens = train_tokens  # a documented subset: the first train_tokens tokens of train.txt
        # likewise the first eval_tokens of valid.txt and of test.txt (smoke runs: the full
        # validation pass costs about 15 s on one core)
        self.eval_tokens = eval_tokens

    def load(self, data_dir: Path) -> TaskData:
        """The corpus, with the training examples laid out for one worker and one column.

        Call ``arrange`` for the trial's worker count and microbatch size. Validation: ``valid.txt``
        as ``eval_columns`` streams, inputs and targets [eval_columns, T - 1] int64.
        """
        corpus = load_corpus(data_dir)
        if corpus.vocab_size != VOCAB_SIZE:  # the files are checksummed: this would be a tokenizer bug
            raise OrderlabError(f"WikiText-2 vocabulary has {corpus.vocab_size} words, expected {VOCAB_SIZE}")
        val_columns = batchify(corpus.valid[: self.eval_tokens], self.eval_columns)
        empty = torch.empty(0, self.bptt, dtype=torch.int64)
        train = corpus.train if self.train_tokens is None else corpus.train[: self.train_tokens]
        data = TaskData(empty, empty, val_columns[:, :-1], val_columns[:, 1:], {TRAIN_TOKENS: train})
        return self.arrange(data, num_workers=1, microbatch_size=1)

    def arrange(self, data: TaskData, num_workers: int, microbatch_size: int) -> TaskData:
        """Training examples for ``num_workers`` workers of ``microbatch_size`` columns each.

        Example ``w·C·mb + c·mb + j`` is (input [bptt], target [bptt]) of chunk c of column
        ``w·mb + j`` of the corpus batchified into ``B = num_workers·mb`` columns; C chunks per column.

        Raises:
            OrderlabError: the columns are too short for one chunk.
        """
        num_columns = num_workers * microbatch_size
        inputs, targets = chunk_columns(batchify(data.extras[TRAIN_TOKENS], num_columns), self.bptt)
        num_chunks = len(inputs)
        if num_chunks == 0:
            raise OrderlabError(
                f"wikitext2-lstm: {num_columns} corpus columns (train.batch_size) leave less than one chunk of "
                f"task.options.bptt={self.bptt} tokens per column; lower train.batch_size or bptt"
            )

        def layout(chunks: torch.Tensor) -> torch.Tensor:  # [C, B, bptt] -> [W·C·mb, bptt]
            by_worker = chunks.reshape(num_chunks, num_workers, microbatch_size, self.bptt).transpose(0, 1)
            return by_worker.reshape(num_workers * num_chunks * microbatch_size, self.bptt)

        return TaskData(layout(inputs), layout(targets), data.val_inputs, data.val_targets, data.extras)

    def make_model(self) -> nn.Module:
        return LstmLanguageModel(
            VOCAB_SIZE,
            self.embedding_size,
            self.hidden_size,
            self.num_layers,
            self.dropout,
            self.reset_hidden_each_chunk,
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy: outputs [N, L, V] logits, targets [N, L] int64."""
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Sum over rows of the row's mean token loss; its mean becomes perplexity in ``finalize_metric``."""
        return float(self.loss(outputs, targets)) * len(targets)

    def finalize_metric(self, val_loss_mean: float, metric_mean: float) -> float:
        """Perplexity: exp of the mean token loss."""
        return math.exp(metric_mean)

    @torch.no_grad()
    def evaluate_sums(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_streams: int | None = None
    ) -> EvalSums:
        """Token loss sums over streams read in ``bptt`` windows with the hidden state carried.

        Args:
            inputs, targets: [S, L] int64, one stream per row (the validation layout); or, with
                ``num_streams`` = k, chunk-major rows [C·k, bptt] of k streams (a worker's training
                shard, k = microbatch_size), evaluated as the k streams in text order.

        Returns:
            (token loss sum, the same sum, number of tokens); the model's state is reset before and after.
        """
        if num_streams is not None:
            inputs, targets = (
                streams_from_chunks(inputs, num_streams),
                streams_from_chunks(targets, num_streams),
            )
        loss_sum = 0.0
        for first in range(0, len(inputs), _EVAL_ROWS):
            reset_model_state(model)
            rows = slice(first, first + _EVAL_ROWS)
            for start in range(0, inputs.shape[1], self.bptt):
                window = slice(start, start + self.bptt)
                logits = model(inputs[rows, window])
                loss_sum += float(
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        targets[rows, window].reshape(-1),
                        reduction="sum",
                    )
                )
        reset_model_state(model)
        return EvalSums(loss_sum, loss_sum, targets.numel())

    @torch.no_grad()
    def test_metrics(self, model: nn.Module, data_dir: Path) -> dict[str, float]:
        """Test perplexity: ``test.txt`` (its first ``eval_tokens``) as ``eval_columns`` streams, read
        like the validation set.

        Returns:
            ``perplexity``, ``loss`` (mean token cross-entropy) and ``num_tokens``.
        """
        test = load_corpus(data_dir).test[: self.eval_tokens]
        columns = batchify(test, self.eval_columns).to(next(model.parameters()).device)
        sums = self.evaluate_sums(model, columns[:, :-1], columns[:, 1:])
        mean = sums.loss_sum / sums.count
        return {"perplexity": math.exp(mean), "loss": mean, "num_tokens": sums.count}
