"""MNIST-1D (Greydanus & Kobak, "Scaling down deep learning", 2020): 1-D "digits" of 40 points.

Each example is one of ten hand-made 1-D templates, padded, dilated, scaled, translated, given
correlated and iid noise and sheared; 5,000 examples by default, the first 80% for training
(4,000) and the rest (1,000) for testing. Small enough to train in seconds on a CPU, yet a CNN
(about 94% test accuracy in the paper) and an MLP (about 68%) differ clearly.

Data: generated offline with the `mnist1d` package (`make_dataset` with the package's standard
`get_dataset_args()`, `num_samples` and `seed` from the task's options); nothing is fetched from
the network. The first generation is cached in DATA_DIR/mnist1d/mnist1d_n{num_samples}_seed{seed}.npz
together with every generation setting, the package's version and a SHA-256 of the arrays:

- cached settings that differ from what is asked (e.g. another mnist1d version): regenerated;
- a cache that cannot be read or whose checksum does not match: TaskError naming the file, which
  should be deleted (it is regenerated on the next load);
- a data_dir that cannot be written: TaskError naming it.

Models, as in the MNIST-1D repository (notebooks/models.py):
- `cnn` (ConvBase): Conv1d(1,25,5,stride 2,pad 1) - ReLU - Conv1d(25,25,3,stride 2,pad 1) - ReLU -
  Conv1d(25,25,3,stride 2,pad 1) - ReLU - flatten (25 x 5) - Linear(125, 10): 5,210 parameters.
- `mlp` (MLPBase): Linear(40,100) - ReLU - [h + ReLU(Linear(100,100) h)] - Linear(100,10): 15,210
  parameters. The middle layer is added to its input, as in the repository's MLPBase.
Both take inputs of shape [N, 40].
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from critbatch.tasks import ClassificationTask, TaskError, register_task

MODELS = ("cnn", "mlp")
CLASSES = 10
ARRAYS = ("x", "y", "x_test", "y_test")
CACHE_FORMAT = 1  # bump when the cache layout changes


def train_examples(num_samples: int, train_split: float = 0.8) -> int:
    """Training examples that make_dataset produces, computed exactly as it does: num_samples // 10
    examples of each of the 10 classes, the first int(len(ys) * train_split) of them for training."""
    return int((num_samples // CLASSES) * CLASSES * train_split)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


NOT_INSTALLED = ("mnist1d: the `mnist1d` package is not installed; pip install mnist1d==0.0.2.post1 "
                 "(or pip install -e . in this repository)")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnist1d")
    except PackageNotFoundError as exc:
        raise TaskError(NOT_INSTALLED) from exc


def _mnist1d_data():
    """The package's data module, imported only when data is generated (it pulls in matplotlib)."""
    try:
        import mnist1d.data
        import mnist1d.utils
    except ImportError as exc:
        raise TaskError(f"{NOT_INSTALLED} ({exc})") from exc
    return mnist1d.data, mnist1d.utils


class MNIST1DConv(nn.Module):
    """ConvBase of the MNIST-1D repository: three strided 1-D convolutions and a linear classifier."""

    def __init__(self, channels: int = 25, length: int = 40, classes: int = CLASSES):
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, length)),                                      # [N, 40] -> [N, 1, 40]
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),         # -> [N, C, 19]
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # -> [N, C, 10]
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # -> [N, C, 5]
            nn.Flatten(),                                        # channel-major, as ConvBase's .view(N, -1)
            nn.Linear(channels * _conv_length(length), classes),
        )

    def forward(self, x):
        return self.net(x)


def _conv_length(length: int) -> int:
    for kernel in (5, 3, 3):  # stride 2, padding 1 each
        length = (length + 2 - kernel) // 2 + 1
    return length


class MNIST1DMLP(nn.Module):
    """MLPBase of the MNIST-1D repository: h1 = relu(W1 x); h2 = h1 + relu(W2 h1); logits = W3 h2."""

    def __init__(self, hidden: int = 100, length: int = 40, classes: int = CLASSES):
        super().__init__()
        self.linear1 = nn.Linear(length, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.relu(self.linear1(x))
        h = h + self.relu(self.linear2(h))
        return self.linear3(h)


@register_task("mnist1d")
class MNIST1D(ClassificationTask):
    """MNIST-1D with the repository's CNN or MLP; the training split (4,000 examples by default)
    is `inputs` [N, 40] float32 and `targets` [N] int64, the test split `test_inputs`/`test_targets`."""

    def __init__(self, data_dir: str = "data", num_samples: int = 5000, seed: int = 42, model: str = "mlp",
                 channels: int = 25, hidden: int = 100):
        if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
            raise TaskError(f"mnist1d: data_dir must be a directory name, got {data_dir!r}")
        if not _is_int(num_samples) or num_samples < CLASSES:
            raise TaskError(f"mnist1d: num_samples must be an integer >= {CLASSES} (make_dataset makes "
                            f"num_samples // 10 examples of each of the 10 classes), got {num_samples!r}")
        if not _is_int(seed) or not 0 <= seed < 2 ** 32:
            raise TaskError(f"mnist1d: seed (the data generation seed) must be an integer in [0, 2**32), "
                            f"got {seed!r}")
        if model not in MODELS:
            raise TaskError(f"mnist1d: model must be one of {list(MODELS)}, got {model!r}")
        for name, value in (("channels", channels), ("hidden", hidden)):
            if not _is_int(value) or value < 1:
                raise TaskError(f"mnist1d: {name} must be an integer >= 1, got {value!r}")
        self.data_dir, self.num_samples, self.seed = str(data_dir), int(num_samples), int(seed)
        self.model, self.channels, self.hidden = model, int(channels), int(hidden)
        self.train_size = train_examples(self.num_samples)   # known without generating anything
        self.test_inputs: torch.Tensor | None = None
        self.test_targets: torch.Tensor | None = None

    # ------------------------------------------------------------ data

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @property
    def cache_file(self) -> Path:
        return self.root / "mnist1d" / f"mnist1d_n{self.num_samples}_seed{self.seed}.npz"

    def dataset_args(self) -> dict:
        """Every setting make_dataset uses: the package's standard ones with num_samples and seed
        from the options (its download `url` is dropped: nothing is downloaded)."""
        data, _ = _mnist1d_data()
        args = data.get_dataset_args(as_dict=True)
        args.pop("url", None)
        args.update(num_samples=self.num_samples, seed=self.seed)
        return args

    def settings(self) -> dict:
        """What the cached arrays depend on; a cache made with other settings is regenerated."""
        return {"format": CACHE_FORMAT, "mnist1d_version": _package_version(), "args": self.dataset_args()}

    def generate(self) -> dict[str, np.ndarray]:
        """The arrays of mnist1d's make_dataset for these settings. make_dataset reseeds numpy's and
        Python's global generators; their states are restored afterwards, so generating has no
        effect on other code's random numbers."""
        package_data, package_utils = _mnist1d_data()
        args = self.dataset_args()
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = package_data.make_dataset(package_utils.ObjectView(dict(args)))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {name: np.ascontiguousarray(data[name]) for name in ARRAYS}

    def _unwritable(self, exc: OSError) -> TaskError:
        return TaskError(
            f"mnist1d: cannot write the generated data under data_dir={self.data_dir!r} "
            f"({self.root.resolve()}): {exc}. Set task.data_dir (paths.data_dir) to a writable directory, "
            "or make this one writable.")

    def _corrupt(self, reason: str) -> TaskError:
        return TaskError(f"mnist1d: the cached data file {self.cache_file} is corrupted ({reason}); delete it, "
                         "and the data is generated again on the next load")

    def read_cache(self) -> dict[str, np.ndarray] | None:
        """The cached arrays, or None when there is no cache or it was made with other settings.
        Raises TaskError naming the file when it cannot be read or fails its checksum."""
        path = self.cache_file
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                arrays = {name: stored[name] for name in ARRAYS}
        except Exception as exc:  # zip, npy or json errors, missing entries: all mean "unreadable"
            raise self._corrupt(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(meta, dict) or "settings" not in meta or "sha256" not in meta:
            raise self._corrupt("no settings or checksum recorded")
        if _checksum(arrays) != meta["sha256"]:
            raise self._corrupt("its arrays do not match their recorded SHA-256")
        if meta["settings"] != self.settings():
            return None  # made with other settings: regenerate, never train on other data
        return arrays

    def write_cache(self, arrays: dict[str, np.ndarray]) -> None:
        """Write atomically: a temporary file in the same directory, then os.replace, so a reader
        (or a concurrent run of a sweep) never sees a half-written file."""
        folder = self.cache_file.parent
        meta = json.dumps({"settings": self.settings(), "sha256": _checksum(arrays)}, sort_keys=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=self.cache_file.name + ".", suffix=".tmp")
        except OSError as exc:
            raise self._unwritable(exc) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, meta=np.array(meta), **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise self._unwritable(exc) from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def arrays(self) -> dict[str, np.ndarray]:
        """The dataset's arrays: from the cache when it holds these settings, else generated and cached."""
        arrays = self.read_cache()
        if arrays is None:
            arrays = self.generate()
            self.write_cache(arrays)
        return arrays

    def check_data(self) -> None:
        # Called before a sweep queues anything: generating and caching takes a second or two, and
        # proves that data_dir is writable (or that a valid cache is already there).
        self.arrays()

    def load(self, device) -> None:
        arrays = self.arrays()
        x, y = arrays["x"], arrays["y"]
        if x.ndim != 2 or x.shape[1] != 40 or len(y) != len(x) or len(x) != self.train_size:
            raise TaskError(f"mnist1d: expected {self.train_size} training examples of 40 points, got arrays "
                            f"{x.shape} and {y.shape} from {self.cache_file}; delete that file to regenerate it")
        self.inputs = torch.as_tensor(x, dtype=torch.float32).to(device).contiguous()
        self.targets = torch.as_tensor(y, dtype=torch.long).to(device)
        self.test_inputs = torch.as_tensor(arrays["x_test"], dtype=torch.float32).to(device).contiguous()
        self.test_targets = torch.as_tensor(arrays["y_test"], dtype=torch.long).to(device)

    # ------------------------------------------------------------ model

    def make_model(self) -> nn.Module:
        if self.model == "cnn":
            return MNIST1DConv(channels=self.channels)
        return MNIST1DMLP(hidden=self.hidden)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
