"""The one table of data files the tasks read: relative path, sha256, download URLs, source.

Checksums and sources are those of ``shared/data/README.md``. URLs are pinned to a commit where
the host allows it; ``orderlab data fetch TASK`` tries them in order and checks the sha256. A task
lists the paths it reads in its ``data_files`` attribute.
"""

from __future__ import annotations

from orderlab.data import DataFile
from orderlab.errors import OrderlabError

_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
    "http://yann.lecun.com/exdb/mnist/",
)
_MNIST_SOURCE = "http://yann.lecun.com/exdb/mnist/ (mirrors: ossci-datasets.s3.amazonaws.com/mnist, storage.googleapis.com/cvdf-datasets/mnist)"
_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_FASHION_SOURCE = (
    "the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist; files in "
    "/usr/share/datasets/fashion-mnist/) or github.com/zalandoresearch/fashion-mnist"
)
_WIKITEXT_RAW = "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/"
_WIKITEXT_SOURCE = "github.com/pytorch/examples, word_language_model/data/wikitext-2/ (commit 77f55b9)"
_M4_RAW = "https://raw.githubusercontent.com/Mcompetitions/M4-methods/6c1067e5a57161249b17289a565178dc7a3fb3ca/Dataset/"
_M4_SOURCE = "github.com/Mcompetitions/M4-methods, Dataset/Train and Dataset/Test (commit 6c1067e)"
_CDGRAB_RAW = "https://raw.githubusercontent.com/GarlGuo/CD-GraB/dc056f397925b8974a2ff90057d70550134b41ea/"
HMDA_FEATURES_SOURCE = (
    "there is no public copy of the HMDA features: CD-GraB's data/HMDA/features-processed-NY-2017.pt (git blob "
    "d7391ecf4df571594f4db2460eea31d0aafc0305, a torch.save'd tuple (X_train, X_test)) is not in its "
    "repository's downloadable files and no preprocessing script rebuilds it. Provide your own copy: "
    "hmda/features-processed-NY-2017.pt (that tuple; read with torch.load(weights_only=True)) or "
    "hmda/features-processed-NY-2017.npz (float arrays X_train [195285, d] and X_test [48822, d], rows "
    "in the order of the shipped labels hmda/targets-processed-NY-2017.npz)"
)


def _idx_files(
    folder: str,
    mirrors: tuple[str, ...],
    source: str,
    digests: dict[str, str],
    also: dict[str, str] | None = None,
) -> list[DataFile]:
    """One ``DataFile`` per idx archive; ``also`` maps a name to another accepted sha256."""
    also = also or {}
    return [
        DataFile(
            f"{folder}/{name}",
            sha256,
            tuple(m + name for m in mirrors),
            source,
            tuple(also.get(name, "").split()),
        )
        for name, sha256 in digests.items()
    ]


_TABLE: list[DataFile] = [
    *_idx_files(
        "mnist",
        _MNIST_MIRRORS,
        _MNIST_SOURCE,
        {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        # the shared data folder's train images: the same content (verified), re-gzipped (gzip -9 -n)
        also={
            "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"
        },
    ),
    *_idx_files(
        "fashion-mnist",
        _FASHION_MIRRORS,
        _FASHION_SOURCE,
        {
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
    ),
    *[
        DataFile(f"wikitext-2/{name}", sha256, (_WIKITEXT_RAW + name,), _WIKITEXT_SOURCE)
        for name, sha256 in {
            "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        }.items()
    ],
    DataFile(
        "m4/Weekly-train.csv",
        "d478d3f6ed673e6ed3c2cb0fbed5425f72eedd51318ebebeb0b5ecfcefc37714",
        (_M4_RAW + "Train/Weekly-train.csv",),
        _M4_SOURCE,
    ),
    DataFile(
        "m4/Weekly-test.csv",
        "3b2bc4be8e636e802260dcd843ca3c5da40536a1fbe1ecb3229a97dae4f44688",
        (_M4_RAW + "Test/Weekly-test.csv",),
        _M4_SOURCE,
    ),
    DataFile(
        "hmda/targets-processed-NY-2017.npz",
        "2b434c2fa8cb9ed5ae3996588cacb077b87603ab48f555b242848bd2bcb497ca",
        (),
        "orderlab's shared data folder (CD-GraB's targets-processed-NY-2017.pt as numpy arrays "
        "y_train, y_test); `orderlab data fetch hmda-logreg` downloads the .pt instead",
    ),
    DataFile(
        "hmda/targets-processed-NY-2017.pt",
        "9e5f8df65ab94dcad7812ab14313c01d127f6786b35ea2750a5904c9cb617d5c",
        (_CDGRAB_RAW + "data/HMDA/targets-processed-NY-2017.pt",),
        "github.com/GarlGuo/CD-GraB, data/HMDA/targets-processed-NY-2017.pt (commit dc056f3)",
        alternative_to="hmda/targets-processed-NY-2017.npz",
    ),
    DataFile("hmda/features-processed-NY-2017.npz", None, (), HMDA_FEATURES_SOURCE),
    DataFile(
        "hmda/features-processed-NY-2017.pt",
        None,
        (),
        HMDA_FEATURES_SOURCE,
        git_blob_sha1="d7391ecf4df571594f4db2460eea31d0aafc0305",
        alternative_to="hmda/features-processed-NY-2017.npz",
    ),
    DataFile(
        "mnist1d/mnist1d_data.npz",
        "c33e1c51ad6d7b4548f8019b536e5bf40f0cf805c1b83b2b3045e8a79045408a",
        (),
        "the mnist1d package (pip install mnist1d; generated offline when this file is absent) or "
        "github.com/greydanus/mnist1d (its mnist1d_data.pkl, as numpy arrays)",
        optional=True,
    ),
    DataFile(
        "sklearn/digits.csv.gz",
        "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
        (
            "https://raw.githubusercontent.com/scikit-learn/scikit-learn/main/sklearn/datasets/data/digits.csv.gz",
        ),
        "the scikit-learn wheel (sklearn/datasets/data/digits.csv.gz)",
    ),
]

#: every data file by its path under the data directory
FILES: dict[str, DataFile] = {file.relative: file for file in _TABLE}


def files_of(task_name: str) -> list[DataFile]:
    """The table entries of the files task ``task_name`` reads (its ``data_files``).

    Raises:
        OrderlabError: unknown task name (listing the known ones).
    """
    from orderlab.tasks import TASKS  # the registry imports this module: look it up at call time

    if task_name not in TASKS:
        raise OrderlabError(f"task {task_name!r} is unknown; known: {', '.join(sorted(TASKS))}")
    return [FILES[relative] for relative in TASKS[task_name].data_files]


def tasks_by_file() -> dict[str, list[str]]:
    """For each file of the table, the names of the tasks that read it."""
    from orderlab.tasks import TASKS

    users: dict[str, list[str]] = {relative: [] for relative in FILES}
    for name, cls in sorted(TASKS.items()):
        for relative in cls.data_files:
            users[relative].append(name)
    return users
